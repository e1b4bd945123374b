"""One-GPU acceptance check of the production path (run through ``examples/gpu_check.sh``).

Needs one CUDA GPU, PyTorch with CUDA and Megatron-Core 0.16.1; no Transformer Engine, no apex
(``--transformer-impl local``, mock data, the Llama-3 vocabulary size). Five ``pretrain_tst.py``
runs, then the two fused losses on CUDA:

Runs (a sixth, ``te_fp8``, when Transformer Engine is installed: see `plan`):

1. ``dense_learned``: the 600M config's shape (32 x 960, 128,256 vocabulary), bf16, learned
   positions, TST full (s=6) for 10 of 16 iterations, saves at iteration 8 (mid-run) and 16.
2. ``dense_resume``: continues 1. from its iteration-8 checkpoint (across the boundary):
   iterations 9-16 must repeat 1.'s losses exactly.
3. ``dense_rope``: the same with RoPE (the config's own), 12 + 12 iterations: phase-1 and
   phase-2 step time and MFU (medians after the first 3 steps of each phase).
4. ``fp16``: the dense shape in fp16 (initial loss scale 65536): some update happens with a
   grad norm > 0, the loss falls, overflow steps are skipped and counted.
5. ``moe``: 8 layers of 8 experts (top-2, alltoall dispatcher), local spec, through the
   boundary.
6. ``multi_hot_ce``: `tst_megatron.loss.multi_hot_cross_entropy` on bf16 logits
   ``[2048, 4, 128256]`` (s = 4 and 16) against a plain-torch reference (fp32 ``log_softmax``
   + gather, autograd), and one standard CE (Megatron-Core's ``vocab_parallel_cross_entropy``)
   on the same logits: loss/gradient error, time and ``max_memory_allocated`` each as a ratio
   to the standard CE.
7. ``fused_output``: `tst_megatron.loss.fused_output_multi_hot_cross_entropy` (bf16 hidden
   ``[4096, 1, 1024]``, output weight ``[128256, 1024]``, s = 1, 6, 16) against the unfused
   output layer + loss: time at most 1.15x, ``max_memory_allocated`` at most 0.3x, error
   against fp32 no worse than the unfused path's.

Every run must learn (the loss falls in both phases) with finite, non-zero grad norms. It
prints one summary table, writes ``summary.txt``, ``gpu_check.json`` and ``logs.tar.gz`` to
``--out`` (default ``$OUT``, else ``runs/gpu_check``) and exits 1 on any failure.
``--dry-run`` prints the commands and checks without running anything (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The shape of examples/configs/tst-600m.yaml (~561M parameters with the 128,256 vocabulary),
# spelled out: the config file sets --bf16, which the fp16 run could not undo.
DENSE_SHAPE = [
    "--num-layers", "32", "--hidden-size", "960", "--ffn-hidden-size", "2560",
    "--num-attention-heads", "15", "--num-query-groups", "5", "--seq-length", "2048",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--vocab-size", "128256",
    "--tst-bag-size", "6",
]  # fmt: skip
TRAINING = [
    "--mock-data", "--transformer-impl", "local", "--micro-batch-size", "4",
    "--global-batch-size", "8", "--lr", "6e-4", "--min-lr", "0", "--adam-beta2", "0.95",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--lr-decay-style", "WSD",
    "--lr-warmup-iters", "2", "--lr-wsd-decay-style", "linear", "--lr-wsd-decay-iters", "4",
    "--use-distributed-optimizer", "--log-interval", "1", "--log-throughput", "--eval-iters", "0",
]  # fmt: skip
DENSE = [*DENSE_SHAPE, *TRAINING]
MOE = [
    "--num-layers", "8", "--hidden-size", "1024", "--ffn-hidden-size", "2816",
    "--num-attention-heads", "16", "--num-query-groups", "4", "--seq-length", "2048",
    "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
    "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "1024",
    "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type", "alltoall",
    "--mock-data", "--vocab-size", "32000", "--transformer-impl", "local", "--bf16",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "6e-4",
    "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--use-distributed-optimizer",
    "--log-interval", "1", "--log-throughput", "--eval-iters", "0",
]  # fmt: skip
LEARNED = ["--position-embedding-type", "learned_absolute"]
CE_SHAPE = (2048, 4, 128_256)  # [L, b, V]
CE_BAG_SIZES = (4, 16)
FUSED_OUTPUT_SHAPE = (4096, 1024, 128_256)  # tokens, hidden, vocab
FUSED_OUTPUT_BAG_SIZES = (1, 6, 16)


@dataclass
class Run:
    """One ``pretrain_tst.py`` launch on one GPU."""

    name: str
    flags: list[str]
    phase1_fraction: float  # the config files give a fraction: the CLI must too
    train_iters: int

    @property
    def phase1_iters(self) -> int:
        return math.floor(self.phase1_fraction * self.train_iters)  # TSTConfig's rule

    def command(self, out: Path, python: str = sys.executable) -> list[str]:
        return [
            python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "pretrain_tst.py", *self.flags,
            "--tst-phase1-fraction", str(self.phase1_fraction),
            "--train-iters", str(self.train_iters),
            "--metrics-jsonl", str(out / f"{self.name}.jsonl"),
        ]  # fmt: skip


def plan(out: Path, transformer_engine: bool = False) -> list[Run]:
    """The runs, in order (the resume needs the first one's checkpoint).

    With Transformer Engine installed (an NGC container) a sixth run, ``te_fp8``, trains the
    dense shape with the TE spec and FP8 GEMMs (hybrid E4M3/E5M2, delayed scaling).
    """
    ckpt = out / "ckpt_dense_learned"
    te = [
        Run("te_fp8", [*DENSE, "--bf16", "--transformer-impl", "transformer_engine", "--fp8-format",
                       "hybrid", "--fp8-recipe", "delayed"], 0.5, 24),
    ]  # fmt: skip
    return [
        Run("dense_learned", [*DENSE, "--bf16", *LEARNED, "--save", str(ckpt),
                              "--save-interval", "8"], 0.625, 16),
        Run("dense_resume", [*DENSE, "--bf16", *LEARNED, "--load", str(ckpt / "iter_0000008")],
            0.625, 16),
        Run("dense_rope", [*DENSE, "--bf16"], 0.5, 24),
        Run("fp16", [*DENSE, *LEARNED, "--fp16", "--initial-loss-scale", "65536"], 0.5, 12),
        Run("moe", [*MOE, "--tst-bag-size", "6"], 0.5, 16),
        *(te if transformer_engine else []),
    ]  # fmt: skip


@dataclass
class Summary:
    rows: list[tuple[str, str, bool]] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def check(self, name: str, value: str, ok: bool) -> None:
        self.rows.append((name, value, bool(ok)))

    @property
    def passed(self) -> bool:
        return all(ok for _, _, ok in self.rows)

    def table(self) -> str:
        width = max(len(name) for name, _, _ in self.rows)
        lines = [f"{'check':{width}}  result  value", "-" * (width + 40)]
        lines += [f"{n:{width}}  {'PASS' if ok else 'FAIL':6}  {v}" for n, v, ok in self.rows]
        lines.append(f"overall: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_learning(summary: Summary, run: Run, rows: list[dict]) -> None:
    """Loss falls in both phases; every updated step's grad norm finite and > 0."""
    steps = {r["iteration"]: r for r in rows if "iteration_time_s" in r}
    loss = {i: r["lm_loss"] for i, r in steps.items() if "lm_loss" in r}
    phase1 = [loss[i] for i in sorted(loss) if i <= run.phase1_iters]
    phase2 = [loss[i] for i in sorted(loss) if i > run.phase1_iters]
    falls = len(phase1) >= 2 and len(phase2) >= 2 and phase1[-1] < phase1[0]
    falls = falls and phase2[-1] < phase2[0]
    text = (
        f"phase 1 {phase1[0]:.3f}->{phase1[-1]:.3f}, phase 2 {phase2[0]:.3f}->{phase2[-1]:.3f}"
        if phase1 and phase2
        else f"{len(loss)} logged losses"
    )
    summary.check(f"{run.name}: loss falls", text, falls)
    norms = [r.get("grad_norm") for r in steps.values() if "lm_loss" in r]
    good = bool(norms) and all(n is not None and math.isfinite(n) and n > 0 for n in norms)
    shown = [f"{n:.3g}" if n is not None else "None" for n in norms[:3]]
    summary.check(f"{run.name}: grad norm finite > 0", f"first {', '.join(shown)}", good)


def phase_speed(summary: Summary, run: Run, rows: list[dict]) -> None:
    steps = [r for r in rows if "iteration_time_s" in r]
    for phase in (1, 2):
        times = [r for r in steps if r["phase"] == phase][3:]
        if not times:
            summary.check(f"{run.name}: phase {phase} step time", "no steps", False)
            continue
        seconds = statistics.median(r["iteration_time_s"] for r in times)
        mfu = [r["mfu"] for r in times if "mfu" in r]
        tflops = statistics.median(r["tflops_per_gpu"] for r in times)
        mfu_text = f", MFU {100 * statistics.median(mfu):.1f}% of BF16 peak" if mfu else ""
        summary.numbers[f"{run.name}_phase{phase}"] = {
            "step_s": seconds,
            "tflops_per_gpu": tflops,
            "mfu": statistics.median(mfu) if mfu else None,
        }
        summary.check(
            f"{run.name}: phase {phase} step time",
            f"{1e3 * seconds:.0f} ms, {tflops:.0f} TFLOP/s/GPU{mfu_text}",
            True,
        )


def check_runs(summary: Summary, runs: list[Run], out: Path, results: dict) -> None:
    data = {run.name: records(out / f"{run.name}.jsonl") for run in runs}
    by_name = {run.name: run for run in runs}
    for run in runs:
        code, seconds = results[run.name]
        summary.check(f"{run.name}: exit code", f"{code} ({seconds:.0f} s)", code == 0)
    for name in ("dense_learned", "dense_rope", "fp16", "moe", "te_fp8"):
        if name in by_name:
            check_learning(summary, by_name[name], data[name])
    full = {r["iteration"]: r["lm_loss"] for r in data["dense_learned"] if "lm_loss" in r}
    resumed = {r["iteration"]: r["lm_loss"] for r in data["dense_resume"] if "lm_loss" in r}
    same = sorted(resumed) == list(range(9, 17)) and all(resumed[i] == full.get(i) for i in resumed)
    diff = max((abs(resumed[i] - full[i]) for i in resumed if i in full), default=float("nan"))
    summary.check("dense_resume: iterations 9-16 exact", f"max |dloss| {diff:.3g}", same)
    fp16 = [r for r in data["fp16"] if "iteration_time_s" in r]
    skipped = sum(r.get("skipped_iterations", 0) for r in fp16)
    scale = fp16[-1].get("loss_scale") if fp16 else None
    summary.check("fp16: overflow steps skipped", f"{skipped} skipped, final scale {scale}",
                  bool(fp16) and skipped < len(fp16))  # fmt: skip
    for name in ("dense_rope", "te_fp8"):
        if name in by_name:
            phase_speed(summary, by_name[name], data[name])


def _measure_cuda(fn, leaves: tuple, repeats: int = 5) -> tuple:
    """Forward + backward of ``fn(*leaves)`` (a loss tensor) on CUDA: (loss fp32, gradients
    fp32 of ``leaves``, median ms of ``repeats``, peak bytes allocated above the inputs)."""
    import torch

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss = fn(*leaves)
        loss.sum().backward()  # one loss gradient on every position, as Megatron's schedule
        return loss

    for _ in range(2):  # warm-up: cuBLAS workspaces and kernels are not the loss's
        step()
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    result, grads = loss.detach().float(), [leaf.grad.float() for leaf in leaves]
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    for leaf in leaves:
        leaf.grad = None
    return result, grads, statistics.median(times), peak


def _relative_error(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def check_losses(summary: Summary) -> None:
    """The CUDA loss checks in one single-rank NCCL process group (Megatron's CE needs it)."""
    import torch
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29613")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        for check in (check_multi_hot_ce, check_fused_output_loss):
            try:
                check(summary)
            except Exception as err:  # report it in the table, like every other failure
                summary.check(check.__name__[len("check_") :], f"{type(err).__name__}: {err}",
                              False)  # fmt: skip
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def check_multi_hot_ce(summary: Summary) -> None:
    """The fused loss on CUDA against a plain-torch reference and one standard CE."""
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from tst_megatron.loss import multi_hot_cross_entropy

    torch.manual_seed(0)
    length, batch, vocab = CE_SHAPE
    logits = (torch.randn(CE_SHAPE, device="cuda") * 2).to(torch.bfloat16)

    def measure(fn, labels):
        """(loss [b, L] fp32, grad, median ms of fwd+bwd, peak bytes above the inputs)."""
        loss, (grad,), ms, peak = _measure_cuda(
            lambda leaf: fn(leaf, labels), (logits.detach().requires_grad_(),)
        )
        return loss, grad, ms, peak

    def standard(leaf, labels):
        return vocab_parallel_cross_entropy(leaf, labels).transpose(0, 1)  # [L, b] -> [b, L]

    def reference(leaf, targets):  # plain torch: fp32 log-softmax, gather the s targets
        logp = torch.log_softmax(leaf.float(), dim=-1).transpose(0, 1)  # [b, L, V]
        return -logp.gather(-1, targets).mean(-1)

    def plain_ce(leaf, labels):  # plain torch, fp32
        return torch.nn.functional.cross_entropy(
            leaf.float().flatten(0, 1), labels.flatten(), reduction="none"
        ).view(length, batch).transpose(0, 1)

    labels = torch.randint(0, vocab, (length, batch), device="cuda")
    ce_loss, ce_grad, ce_ms, ce_peak = measure(standard, labels)
    plain = measure(plain_ce, labels)
    ce_loss_err = ((ce_loss - plain[0]).abs().max() / plain[0].abs().max()).item()
    ce_grad_err = _relative_error(ce_grad, plain[1])
    summary.numbers["standard_ce"] = {
        "ms": ce_ms, "peak_bytes": ce_peak, "loss_rel_err": ce_loss_err, "grad_rel_err": ce_grad_err
    }  # fmt: skip
    for s in CE_BAG_SIZES:
        targets = torch.randint(0, vocab, (batch, length, s), device="cuda")
        fused = measure(lambda leaf, t: multi_hot_cross_entropy(leaf, t), targets)
        ref = measure(reference, targets)
        loss_err = ((fused[0] - ref[0]).abs().max() / ref[0].abs().max()).item()
        grad_err = _relative_error(fused[1], ref[1])
        time_ratio, mem_ratio = fused[2] / ce_ms, fused[3] / ce_peak
        summary.numbers[f"multi_hot_s{s}"] = {
            "loss_rel_err": loss_err, "grad_rel_err": grad_err, "ms": fused[2],
            "peak_bytes": fused[3], "time_over_ce": time_ratio, "memory_over_ce": mem_ratio,
            "reference_time_over_ce": ref[2] / ce_ms, "reference_memory_over_ce": ref[3] / ce_peak,
        }  # fmt: skip
        summary.check(
            f"multi_hot_ce s={s}: error vs plain torch",
            f"loss {loss_err:.1e}, grad {grad_err:.1e} (one CE: {ce_loss_err:.1e}, "
            f"{ce_grad_err:.1e}; ratio {loss_err / max(ce_loss_err, 1e-12):.2f}, "
            f"{grad_err / max(ce_grad_err, 1e-12):.2f})",
            loss_err < 1e-4 and grad_err < 2e-2,
        )
        summary.check(
            f"multi_hot_ce s={s}: time / one CE",
            f"{time_ratio:.2f}x ({fused[2]:.1f} vs {ce_ms:.1f} ms; reference "
            f"{ref[2] / ce_ms:.2f}x)",
            time_ratio <= 1.5,
        )
        summary.check(
            f"multi_hot_ce s={s}: max_memory_allocated / one CE",
            f"{mem_ratio:.2f}x ({fused[3] / 2**30:.2f} vs {ce_peak / 2**30:.2f} GiB; reference "
            f"{ref[3] / ce_peak:.2f}x)",
            mem_ratio <= 1.1,
        )


def check_fused_output_loss(summary: Summary) -> None:
    """`--tst-fused-output-loss` on CUDA, bf16: output layer + loss fused vs unfused.

    Same inputs as ``benchmarks/fused_output_loss.py`` (hidden ``[4096, 1, 1024]``, output
    weight ``[128256, 1024]``): time and peak memory of fwd+bwd as ratios to the unfused
    path (output GEMM, then Megatron's CE or the multi-hot CE), and both paths' errors
    against the unfused path in fp32 (the fused one may not be less accurate).
    """
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from tst_megatron.loss import fused_output_multi_hot_cross_entropy, multi_hot_cross_entropy

    tokens, hidden, vocab = FUSED_OUTPUT_SHAPE
    torch.manual_seed(0)
    x32 = torch.randn(tokens, 1, hidden, device="cuda")
    w32 = torch.randn(vocab, hidden, device="cuda") * 0.02
    x16, w16 = x32.to(torch.bfloat16), w32.to(torch.bfloat16)

    def unfused(x, w, targets):
        logits = torch.matmul(x, w.t())  # [tokens, 1, V], as the output layer computes it
        if targets.dim() == 2:
            return vocab_parallel_cross_entropy(logits, targets.t()).t()
        return multi_hot_cross_entropy(logits, targets)

    def run(fn, x, w, targets):
        leaves = (x.detach().requires_grad_(), w.detach().requires_grad_())
        return _measure_cuda(lambda a, b: fn(a, b, targets), leaves)

    for s in FUSED_OUTPUT_BAG_SIZES:
        targets = torch.randint(0, vocab, (1, tokens, s), device="cuda")
        targets = targets[..., 0] if s == 1 else targets
        fused = run(fused_output_multi_hot_cross_entropy, x16, w16, targets)
        plain = run(unfused, x16, w16, targets)
        exact = run(unfused, x32, w32, targets)
        errors = {  # worst of loss, hidden-state gradient, weight gradient
            name: max(_relative_error(got[0], exact[0]), _relative_error(got[1][0], exact[1][0]),
                      _relative_error(got[1][1], exact[1][1]))
            for name, got in (("fused", fused), ("unfused", plain))
        }  # fmt: skip
        time_ratio, mem_ratio = fused[2] / plain[2], fused[3] / plain[3]
        summary.numbers[f"fused_output_s{s}"] = {
            "ms": fused[2], "unfused_ms": plain[2], "peak_bytes": fused[3],
            "unfused_peak_bytes": plain[3], "time_over_unfused": time_ratio,
            "memory_over_unfused": mem_ratio, "error": errors["fused"],
            "unfused_error": errors["unfused"],
        }  # fmt: skip
        summary.check(
            f"fused_output s={s}: error vs fp32",
            f"{errors['fused']:.1e} (unfused bf16: {errors['unfused']:.1e})",
            errors["fused"] <= 1.5 * errors["unfused"] + 1e-3,
        )
        summary.check(
            f"fused_output s={s}: time / unfused",
            f"{time_ratio:.2f}x ({fused[2]:.1f} vs {plain[2]:.1f} ms)",
            time_ratio <= 1.15,
        )
        summary.check(
            f"fused_output s={s}: max_memory_allocated / unfused",
            f"{mem_ratio:.2f}x ({fused[3] / 2**30:.2f} vs {plain[3] / 2**30:.2f} GiB)",
            mem_ratio <= 0.3,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="Print the plan; run nothing.")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    parser.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"),
                        help="Scratch directory for checkpoints and logs.")  # fmt: skip
    parser.add_argument("--python", default=sys.executable)
    opts = parser.parse_args(argv)
    work, out = Path(opts.work), Path(opts.out)
    from tst_megatron.training.arguments import transformer_engine_installed

    runs = plan(work, transformer_engine=transformer_engine_installed())
    if opts.dry_run:
        for run in runs:
            print(f"# {run.name}")
            print(shlex.join(run.command(work, opts.python)))
        print(f"# multi_hot_ce: bf16 logits {list(CE_SHAPE)}, s in {list(CE_BAG_SIZES)}, "
              "vs plain torch and one vocab_parallel_cross_entropy (in this process)")  # fmt: skip
        tokens, hidden, vocab = FUSED_OUTPUT_SHAPE
        print(f"# fused_output: bf16 hidden [{tokens}, 1, {hidden}], output weight [{vocab}, "
              f"{hidden}], s in {list(FUSED_OUTPUT_BAG_SIZES)}, fused vs unfused (in this "
              "process)")  # fmt: skip
        return 0
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS: the resume is exact
    }
    summary, results = Summary(), {}
    started = time.time()
    for run in runs:
        log = work / f"{run.name}.log"
        print(f"=== {run.name}: {shlex.join(run.command(work, opts.python))}", flush=True)
        begin = time.time()
        with open(log, "w") as handle:
            code = subprocess.call(run.command(work, opts.python), cwd=ROOT, env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)  # fmt: skip
        results[run.name] = (code, time.time() - begin)
        print(f"    exit {code} after {time.time() - begin:.0f} s; tail:", flush=True)
        print("    " + "\n    ".join(log.read_text().splitlines()[-3:]), flush=True)
    check_runs(summary, runs, work, results)
    check_losses(summary)
    summary.numbers["wall_s"] = time.time() - started
    summary.check("total wall time", f"{summary.numbers['wall_s']:.0f} s (budget 480 s)",
                  summary.numbers["wall_s"] <= 480)  # fmt: skip
    header = _environment()
    text = header + "\n" + summary.table()
    print(text)
    (out / "summary.txt").write_text(text + "\n")
    report = {"environment": header, "rows": summary.rows, "numbers": summary.numbers}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for run in runs:
            for suffix in (".log", ".jsonl"):
                path = work / f"{run.name}{suffix}"
                if path.exists():
                    tar.add(path, arcname=path.name)
    return 0 if summary.passed else 1


def _environment() -> str:
    import torch

    from tst_megatron.mcore_compat import MCORE_VERSION

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"gpu_check {time.strftime('%Y-%m-%d %H:%M')}: {gpu}; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}); megatron-core {MCORE_VERSION}; python "
        f"{sys.version.split()[0]}"
    )


if __name__ == "__main__":
    sys.exit(main())
