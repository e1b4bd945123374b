"""TST vs baseline at equal optimizer steps (= equal FLOPs) on the demo model, on CPU.

Runs ``pretrain_tst.py`` once per variant with the same YAML (examples/demo.yaml), seed,
data, batch size, LR schedule and number of steps. The data is a corpus directory holding
``train.jsonl.gz`` and ``valid.jsonl.gz`` (``--corpus-dir``; `data/scripts/build_docs_corpus.py`
builds one from Debian documentation packages), tokenised with the shipped tokenizer. The
script refuses a configuration in which any variant would read its training split more than
once: TST's claim is an equal-FLOPs gain on fresh data.

  baseline      no TST (``--tst-bag-size 1``: every step is plain next-token training)
  full          TST s=4 r=0.3: bag-averaged inputs + multi-hot CE (MCE) targets
  output-only   TST s=4 r=0.3: ordinary inputs + MCE targets (reads no extra data)
  input-only    TST s=4 r=0.3: bag-averaged inputs + next-token CE

A phase-1 step costs the same FLOPs as a baseline step at context L, so equal steps are
equal compute. Measured per variant in this one invocation, ratios against the baseline:
  final validation loss   standard next-token loss on the same held-out windows (the
                          trainer always evaluates in next-token mode, so it is comparable)
  data tokens             consumed by training, from the trainer's metrics
  step time               (a) in the training runs: median ms per step over the log
                          intervals, process CPU time and wall-clock (those include start-up
                          and evaluation); the runs are minutes apart, so on a shared machine
                          these mostly measure the load. (b) interleaved: one process builds
                          every variant's trainer and alternates short blocks of phase-1 steps
                          with blocks of baseline steps (``--timing-rounds``); the median of
                          the per-round ratios is the step-cost ratio, robust to load drift.

The trainer sources (pretrain_tst.py, tst_megatron/) are copied into the run directory
first, so every variant runs the same code even if the working tree changes meanwhile.

Stopping and resuming: each variant saves a checkpoint every ``--save-interval`` steps in
its run directory and loads it when started again; a variant that finished keeps its
``result.json`` and is not run again. So re-running the same command after an interruption
loses at most ``--save-interval`` steps (the copied trainer is reused when the run directory
already holds it, so a resumed variant runs the code it started with).

Prints the tables and writes ``docs/results/tst_vs_baseline.{json,png}``; the chart is the
validation-loss gap to the baseline against steps, and validation loss against data tokens.

Usage: python benchmarks/tst_vs_baseline.py --corpus-dir data/docs [--train-iters 400] ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODES = ("baseline", "full", "output-only", "input-only")
DEFAULT_MODES = ("baseline", "full", "output-only")
BOUNDARY_RE = re.compile(
    r"phase 2, iteration (\d+): lm loss ([0-9.eE+-]+) \(last phase-1 loss ([0-9.eE+-]+)\)"
)


# --- set-up ----------------------------------------------------------------------------
def preprocess(python: str, corpus_dir: Path, data_dir: Path) -> dict[str, Path]:
    """Tokenise the corpus once (reused by later invocations)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    prefixes = {}
    for split in ("train", "valid"):
        prefix = data_dir / f"{corpus_dir.name}_{split}"
        doc_prefix = Path(f"{prefix}_text_document")
        if not Path(f"{doc_prefix}.idx").is_file():
            source = str(corpus_dir / f"{split}.jsonl.gz")
            cmd = [python, "tools/preprocess_data.py", "--input", source]
            cmd += ["--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer"]
            cmd += ["--tokenizer-model", "data/sample", "--append-eod", "--workers", "2"]
            subprocess.run(cmd, check=True, cwd=ROOT)
        prefixes[split] = doc_prefix
    return prefixes


def corpus_tokens(doc_prefix: Path) -> int:
    """Tokens in a preprocessed split (the 8k-vocabulary sample corpus is stored as uint16)."""
    return Path(f"{doc_prefix}.bin").stat().st_size // 2


def snapshot_trainer(dest: Path, keep: bool) -> Path:
    """Copy pretrain_tst.py and tst_megatron/ to ``dest``; return the copied script.

    ``keep``: reuse an existing copy (a resumed benchmark runs the code it started with).
    """
    if keep and (dest / "pretrain_tst.py").is_file():
        return dest / "pretrain_tst.py"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "pretrain_tst.py", dest / "pretrain_tst.py")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "tst_megatron", dest / "tst_megatron", ignore=ignore)
    return dest / "pretrain_tst.py"


def source_state() -> dict:
    """Commit and a digest of the uncommitted trainer changes (recorded with the results)."""

    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return ""
        return done.stdout

    paths = ["pretrain_tst.py", "tst_megatron"]
    diff = git("diff", "HEAD", "--", *paths)
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *paths)
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "trainer_uncommitted_changes": bool(diff or untracked),
        "trainer_diff_sha256": hashlib.sha256((diff + untracked).encode()).hexdigest()[:16],
    }


def schedule_flags(config: dict, train_iters: int) -> list[str]:
    """``--train-iters`` plus the YAML's WSD decay window scaled to the same fraction."""
    flags = ["--train-iters", str(train_iters)]
    decay = config.get("lr-wsd-decay-iters")
    if decay is not None:
        warmup = int(config.get("lr-warmup-iters", 0))
        scaled = max(1, round(int(decay) * train_iters / int(config["train-iters"])))
        scaled = min(scaled, train_iters - warmup)
        if scaled < 1:
            raise SystemExit(f"error: --train-iters {train_iters} leaves no steps after warmup")
        flags += ["--lr-wsd-decay-iters", str(scaled)]
    return flags


def variant_flags(mode: str, bag_size: int, fraction: float) -> list[str]:
    if mode == "baseline":
        # The YAML sets tst keys; bag size 1 turns TST off (s = 1 is plain next-token CE).
        return ["--tst-bag-size", "1"]
    return [
        *("--tst-bag-size", str(bag_size), "--tst-phase1-fraction", str(fraction)),
        *("--tst-mode", mode),
    ]


def phase1_iters(mode: str, args) -> int:
    """Phase-1 steps, computed as the trainer does (floor(r * T))."""
    return 0 if mode == "baseline" else math.floor(args.phase1_fraction * args.train_iters)


def expected_data_tokens(mode: str, args, config: dict) -> int:
    """Data tokens a run reads (a window minus the token consecutive windows share)."""
    gbs, seq, s = int(config["global-batch-size"]), int(config["seq-length"]), args.bag_size
    phase1 = phase1_iters(mode, args)
    per_sample = seq + s - 1 if mode == "output-only" else s * (seq + 1) - 1
    return gbs * (phase1 * per_sample + (args.train_iters - phase1) * seq)


def default_eval_interval(args) -> int:
    """About 20 evaluations per run, with one exactly at the phase boundary."""
    target = max(1, args.train_iters // 20)
    p1 = math.floor(args.phase1_fraction * args.train_iters)
    if p1 < 1:
        return target
    return max(d for d in range(1, target + 1) if p1 % d == 0)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- one run ---------------------------------------------------------------------------
def run_variant(mode: str, args, config: dict, data: dict[str, Path], script: Path) -> dict:
    """Run (or resume, or reuse the finished result of) one variant."""
    out = args.run_dir / mode
    done = out / "result.json"
    if args.resume and done.is_file():
        result = json.loads(done.read_text())
        print(f"\n=== {mode}: finished earlier, reusing {done}", flush=True)
        return result
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    cmd = [args.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd += [str(script), "--yaml-config", str(args.yaml)]
    cmd += ["--train-data-path", str(data["train"]), "--valid-data-path", str(data["valid"])]
    cmd += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "data/sample"]
    cmd += ["--data-cache-path", str(out / "cache"), "--metrics-jsonl", str(metrics_path)]
    cmd += ["--seed", str(args.seed), "--eval-iters", str(args.eval_iters)]
    cmd += ["--eval-interval", str(args.eval_interval)]
    cmd += ["--save", str(out / "ckpt"), "--load", str(out / "ckpt"), "--allow-fresh-start"]
    cmd += ["--save-interval", str(args.save_interval)]
    cmd += schedule_flags(config, args.train_iters)
    cmd += variant_flags(mode, args.bag_size, args.phase1_fraction)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "2")
    print(f"\n=== {mode}: {' '.join(cmd)}", flush=True)
    load_start = load_average()
    cpu_start = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with open(out / "stdout.log", "a") as log:  # a resumed variant appends
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    text = (out / "stdout.log").read_text()
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise SystemExit(
            f"error: the {mode} run failed (exit {proc.returncode}); log tail:\n{tail}\n"
            f"full log: {out / 'stdout.log'}"
        )
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    # a resumed variant re-logs the steps after its last checkpoint: keep the last record
    train = list({r["iteration"]: r for r in records if "lm_loss" in r}.values())
    valid = list({r["iteration"]: r for r in records if "valid_lm_loss" in r}.values())
    if not train or not valid or valid[-1]["iteration"] != args.train_iters:
        raise SystemExit(f"error: {metrics_path} lacks training or final validation records")

    # Each training record covers the steps since the previous one, at that interval's
    # model-token throughput (global batch x L model tokens per step, in every phase).
    tokens_per_step = int(config["global-batch-size"]) * int(config["seq-length"])
    p1 = phase1_iters(mode, args)
    intervals, prev = [], 0  # (ms per step, steps, phase)
    for r in train:
        ms = 1e3 * tokens_per_step / r["model_tokens_per_s"]
        intervals.append((ms, r["iteration"] - prev, 1 if r["iteration"] <= p1 else 2))
        prev = r["iteration"]

    def median_ms(phase: int | None) -> float | None:
        values = [ms for ms, _, ph in intervals if phase is None or ph == phase]
        return statistics.median(values) if values else None

    result = {
        "mode": mode,
        "command": cmd,
        "phase1_iters": p1,
        "final_valid_loss": valid[-1]["valid_lm_loss"],
        "data_tokens": train[-1]["data_tokens"],
        "expected_data_tokens": expected_data_tokens(mode, args, config),
        "ms_per_step_median": median_ms(None),
        "ms_per_step_median_phase1": median_ms(1) if p1 else None,
        "ms_per_step_median_phase2": median_ms(2) if p1 else None,
        "train_step_time_s": sum(ms * n for ms, n, _ in intervals) / 1e3,
        "process_cpu_s": cpu,
        "wall_clock_s": wall,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "data_budget": [ln for ln in text.splitlines() if "data budget:" in ln][-1:],
        "repeat_warnings": [ln for ln in text.splitlines() if "equal-FLOPs gain" in ln],
        "valid": [[r["iteration"], r["valid_lm_loss"]] for r in valid],
        "train": [[r["iteration"], r["lm_loss"], r["phase"], r["data_tokens"]] for r in train],
    }
    boundary = BOUNDARY_RE.search(text)
    if boundary:
        result["boundary_step"] = {
            "first_phase2_iteration": int(boundary.group(1)),
            "first_phase2_train_loss": float(boundary.group(2)),
            "last_phase1_train_loss": float(boundary.group(3)),
        }
    done.write_text(json.dumps(result) + "\n")
    print(
        f"    final valid loss {result['final_valid_loss']:.4f} | data tokens "
        f"{result['data_tokens']:,} | median {result['ms_per_step_median']:.0f} ms/step | "
        f"CPU {cpu:.0f}s | wall {wall:.0f}s | load {load_start} -> {result['load_average_end']}",
        flush=True,
    )
    return result


# --- interleaved step timing -----------------------------------------------------------
def timing_worker(argv: list[str]) -> int:
    """Under torchrun: time phase-1 steps of each TST variant against baseline steps.

    argv: SNAPSHOT_DIR OUT_JSON ROUNDS STEPS BAG_SIZE MODES(comma) -- COMMON FLAGS...
    Every variant gets its own `Trainer` (model, optimizer, data stream) in this process;
    each round times ``STEPS`` steps of every variant, in a rotating order. TST variants
    run phase-1 steps (phase 1 is set to 90% of the nominal 1000 steps so it never ends).
    """
    snapshot, out_json, rounds, steps, bag, modes = argv[:6]
    common = argv[argv.index("--") + 1 :]
    sys.path.insert(0, snapshot)
    from tst_megatron.training.loop import Trainer, initialize_distributed
    from tst_megatron.training.run_config import settings_from_flags

    runs = {
        mode: settings_from_flags(common + variant_flags(mode, int(bag), 0.9), 1)
        for mode in modes.split(",")
    }
    first = next(iter(runs.values()))
    initialize_distributed(first.parallel, first.batch, first.reliability, first.schedule.seed)
    trainers, specs = {}, {}
    for mode, run in runs.items():
        trainers[mode] = Trainer(run)
        phase = 1 if run.tst.enabled else 2
        trainers[mode].set_phase(phase)
        specs[mode] = trainers[mode].phase_spec(phase)
    order = list(trainers)
    times: dict[str, list[float]] = {m: [] for m in order}
    for r in range(int(rounds) + 1):  # round 0 warms up and is dropped
        for mode in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            for _ in range(int(steps)):
                trainers[mode].train_step(specs[mode])
            if r:
                times[mode].append((time.perf_counter() - start) / int(steps) * 1e3)
    Path(out_json).write_text(json.dumps(times))
    return 0


def interleaved_timing(args, config: dict, data: dict[str, Path], script: Path) -> dict:
    """Run `timing_worker` once; per variant: median ms/step and median per-round ratio."""
    out = args.run_dir / "timing"
    out.mkdir(parents=True, exist_ok=True)
    common = [
        *("--yaml-config", str(args.yaml), "--seed", str(args.seed)),
        *("--train-data-path", str(data["train"]), "--valid-data-path", str(data["valid"])),
        *("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "data/sample"),
        *("--data-cache-path", str(out / "cache"), "--train-iters", "1000"),
        *("--lr-wsd-decay-iters", "100", "--eval-iters", "0"),
    ]
    cmd = [args.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd += [str(Path(__file__).resolve()), "--timing-worker", str(script.parent)]
    cmd += [str(out / "times.json"), str(args.timing_rounds), str(args.timing_steps)]
    cmd += [str(args.bag_size), ",".join(args.modes), "--", *common]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "2")
    print(f"\n=== interleaved step timing: {' '.join(cmd)}", flush=True)
    with open(out / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join((out / "stdout.log").read_text().splitlines()[-30:])
        raise SystemExit(f"error: the timing run failed (exit {proc.returncode}):\n{tail}")
    times = json.loads((out / "times.json").read_text())
    base = times["baseline"]
    summary = {}
    for mode, ms in times.items():
        ratios = [a / b for a, b in zip(ms, base, strict=True)]
        summary[mode] = {
            "ms_per_step_median": statistics.median(ms),
            "ratio_to_baseline_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ms_per_step_rounds": ms,
        }
    return summary


# --- report ----------------------------------------------------------------------------
def _f(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def main_table(results: list[dict]) -> str:
    base = results[0]
    lines = [
        "| variant | final valid loss | Δ loss vs baseline | data tokens | data tokens / "
        "baseline | median ms/step | step time / baseline | process CPU / baseline | "
        "wall-clock s |",
        "|" + "---|" * 9,
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['final_valid_loss']:.4f} "
            f"| {r['final_valid_loss'] - base['final_valid_loss']:+.4f} "
            f"| {r['data_tokens']:,} | {r['data_tokens'] / base['data_tokens']:.2f}× "
            f"| {r['ms_per_step_median']:.0f} "
            f"| {r['ms_per_step_median'] / base['ms_per_step_median']:.2f}× "
            f"| {r['process_cpu_s'] / base['process_cpu_s']:.2f}× | {r['wall_clock_s']:.0f} |"
        )
    return "\n".join(lines)


def boundary_table(results: list[dict]) -> str:
    """Next-token validation loss around the phase boundary, against the baseline."""
    base_valid = dict(map(tuple, results[0]["valid"]))
    lines = [
        "| variant | phase-1 steps | valid loss at end of phase 1 (baseline) | next valid "
        "point (baseline) | train loss: last phase-1 step → first phase-2 step | "
        "median ms/step phase 1 / phase 2 (same run) |",
        "|" + "---|" * 6,
    ]
    for r in results[1:]:
        p1, valid = r["phase1_iters"], dict(map(tuple, r["valid"]))
        after = min((it for it in valid if it > p1), default=None)
        step = r.get("boundary_step", {})
        ms1, ms2 = r["ms_per_step_median_phase1"], r["ms_per_step_median_phase2"]
        lines.append(
            f"| {r['mode']} | {p1} | {_f(valid.get(p1))} ({_f(base_valid.get(p1))}) "
            f"| it {after}: {_f(valid.get(after))} ({_f(base_valid.get(after))}) "
            f"| {_f(step.get('last_phase1_train_loss'))} → "
            f"{_f(step.get('first_phase2_train_loss'))} "
            f"| {_f(ms1, '.0f')} / {_f(ms2, '.0f')} = "
            f"{_f(ms1 / ms2 if ms1 and ms2 else None, '.2f')}× |"
        )
    return "\n".join(lines)


def timing_table(timing: dict, args) -> str:
    lines = [
        f"| variant (step kind) | median ms/step | step time / baseline: median of "
        f"{args.timing_rounds} rounds | min – max |",
        "|" + "---|" * 4,
    ]
    for mode, t in timing.items():
        kind = "standard" if mode == "baseline" else "phase 1"
        lines.append(
            f"| {mode} ({kind}) | {t['ms_per_step_median']:.0f} "
            f"| {t['ratio_to_baseline_median']:.2f}× "
            f"| {t['ratio_min']:.2f} – {t['ratio_max']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], output: Path, title: str) -> None:
    """Left: validation-loss gap to the baseline vs steps (equal FLOPs per step); right:
    validation loss vs training data tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_gap, ax_tok) = plt.subplots(1, 2, figsize=(14, 5.2))
    base = dict(map(tuple, results[0]["valid"]))
    for i, r in enumerate(results):
        color, p1 = f"C{i}", r["phase1_iters"]
        gap = [(it, loss - base[it]) for it, loss in r["valid"] if it in base]
        ax_gap.plot(*zip(*gap, strict=True), "o-", color=color, ms=3.5, lw=1.6, label=r["mode"])
        if p1:
            ax_gap.axvline(p1, color=color, ls=":", alpha=0.6)
        tokens_at = {t[0]: t[3] for t in r["train"]}
        tv = [(tokens_at[it], loss) for it, loss in r["valid"] if it in tokens_at]
        if tv:
            ax_tok.plot(*zip(*tv, strict=True), "o-", color=color, ms=3.5, label=r["mode"])
    ax_gap.axhline(0, color="black", lw=0.8)
    ax_gap.set_xlabel("step (equal FLOPs per step; dotted: phase boundary)")
    ax_gap.set_ylabel("validation loss - baseline's (nats; below 0: TST ahead)")
    ax_gap.set_title("validation-loss gap to the baseline")
    ax_tok.set_xlabel("training data tokens consumed")
    ax_tok.set_ylabel("validation loss (nats, next-token)")
    ax_tok.set_title("validation loss vs data tokens")
    lo = min(v[1] for r in results for v in r["valid"])
    ax_tok.set_ylim(lo - 0.15, lo + 3.0)
    for ax in (ax_gap, ax_tok):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--timing-worker"]:
        return timing_worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train-iters",
        type=int,
        default=400,
        help="optimizer steps per run (the YAML's WSD decay window is scaled to it)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        default=Path("data/sample"),
        help="train.jsonl.gz + valid.jsonl.gz (data/scripts/build_docs_corpus.py builds one)",
    )
    parser.add_argument(
        "--save-interval", type=int, default=100, help="checkpoint every N steps per variant"
    )
    parser.add_argument(
        "--fresh",
        dest="resume",
        action="store_false",
        help="start every variant anew (default: resume each from its run directory)",
    )
    parser.add_argument("--bag-size", type=int, default=4)
    parser.add_argument("--phase1-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--eval-iters",
        type=int,
        default=32,
        help="validation micro-batches per evaluation (the same windows every time)",
    )
    parser.add_argument(
        "--eval-interval", type=int, default=None, help="default: ~T/20, dividing r*T"
    )
    parser.add_argument(
        "--timing-rounds",
        type=int,
        default=8,
        help="interleaved timing rounds (0 = skip the interleaved step timing)",
    )
    parser.add_argument("--timing-steps", type=int, default=4, help="steps per variant and round")
    parser.add_argument("--yaml", type=Path, default=Path("examples/demo.yaml"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tst_vs_baseline"))
    parser.add_argument("--results-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    args.modes = ["baseline"] + [m for m in dict.fromkeys(args.modes) if m != "baseline"]
    if args.eval_interval is None:
        args.eval_interval = default_eval_interval(args)

    os.chdir(ROOT)
    args.run_dir = args.run_dir.resolve()
    config = yaml.safe_load(args.yaml.read_text())
    data = preprocess(args.python, args.corpus_dir.resolve(), args.run_dir / "data")
    train_tokens = corpus_tokens(data["train"])
    for mode in args.modes:
        need = expected_data_tokens(mode, args, config)
        if need > train_tokens:
            raise SystemExit(
                f"error: {mode} would read {need:,} tokens, more than the {train_tokens:,}-token "
                f"train split of {args.corpus_dir}: it would repeat data. Build a larger corpus "
                "(data/scripts/build_docs_corpus.py) or lower --train-iters"
            )
    source = source_state()
    script = snapshot_trainer(args.run_dir / "src", keep=args.resume)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.time()
    results = [run_variant(m, args, config, data, script) for m in args.modes]
    timing = interleaved_timing(args, config, data, script) if args.timing_rounds else None
    total = time.time() - t0

    title = (
        f"demo model ({args.yaml}), {args.train_iters} steps each, TST s={args.bag_size} "
        f"r={args.phase1_fraction}, seed {args.seed}, {args.corpus_dir.name} corpus "
        f"({train_tokens / 1e6:.1f}M training tokens, no variant repeats data)"
    )
    runs_s = sum(r["wall_clock_s"] for r in results)  # reused variants count their own run
    print(f"\n{title} (variant runs {runs_s / 60:.1f} min; this invocation {total / 60:.1f} min)"
          f"\n\n{main_table(results)}\n")  # fmt: skip
    print(boundary_table(results))
    if timing:
        print(f"\n{timing_table(timing, args)}")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    png = args.results_dir / "tst_vs_baseline.png"
    plot(results, png, title)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["run_dir"] = os.path.relpath(args.run_dir, ROOT)
    record = {
        "benchmark": "benchmarks/tst_vs_baseline.py",
        "argv": argv,
        "started": started,
        "total_s": total,
        "variant_runs_s": runs_s,
        "settings": settings,
        "model_yaml": config,
        "train_split_tokens": train_tokens,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "2"),
        },
        "trainer_source": source,
        "results": results,
        "table_markdown": main_table(results),
        "boundary_table_markdown": boundary_table(results),
        "interleaved_timing": timing,
        "timing_table_markdown": timing_table(timing, args) if timing else None,
    }
    out_json = args.results_dir / "tst_vs_baseline.json"
    out_json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {png} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
