"""One-GPU acceptance check of the production path (run through ``examples/gpu_check.sh``).

Needs one CUDA GPU, PyTorch with CUDA and Megatron-Core 0.16.1 (``--transformer-impl local``,
mock data, the Llama-3 vocabulary size). Every check is a row of the summary, PASS, FAIL or
SKIP with its reason, also the checks this machine cannot run:

1. ``dense_learned``: the 600M config's shape (32 x 960, 128,256 vocabulary), bf16, learned
   positions, TST full (s=6) for 10 of 16 iterations, saves at iteration 8 (mid-run) and 16.
2. ``dense_resume``: continues 1. from its iteration-8 checkpoint (across the boundary):
   iterations 9-16 must repeat 1.'s losses exactly.
3. ``dense_rope``: the same with RoPE (the config's own), 12 + 12 iterations: phase-1 and
   phase-2 step time and MFU (medians after the first 3 steps of each phase); the phase-2 MFU
   must reach `MFU_FLOOR`.
4. ``fp16``: the dense shape in fp16 (initial loss scale 65536): some update happens with a
   grad norm > 0, the loss falls, overflow steps are skipped and counted.
5. ``moe``: 8 layers of 8 experts (top-2, alltoall dispatcher), local spec, through the
   boundary.
6. ``te_fp8``: the dense shape with Transformer Engine's spec and FP8 GEMMs (hybrid, delayed
   scaling); SKIP without Transformer Engine, FAIL with ``--require-te``.
7. ``megatron_fsdp``: one GPU, ``--use-megatron-fsdp``; SKIP while pretrain_tst.py has no
   such flag.
8. ``nccl_tp2``: two ranks over NCCL (TP=2 + sequence parallel, 16 heads of 1024); SKIP with
   one GPU (a first multi-GPU run must check what it cannot: docs/gpu.md).
9. ``losses`` (one child process): `tst_megatron.loss.multi_hot_cross_entropy` on bf16 logits
   ``[2048, 4, 128256]`` (s = 4 and 16) against plain torch and one Megatron-Core CE, and
   `tst_megatron.loss.fused_output_multi_hot_cross_entropy` (bf16 hidden ``[4096, 1, 1024]``,
   output weight ``[128256, 1024]``, s = 1, 6, 16) against the unfused output layer + loss:
   errors, time and ``max_memory_allocated`` ratios, and which weight-gradient accumulation
   path ran (apex's ``wgrad_gemm_accum_fp32``, torch's fp32-accumulating ``addmm``, or the
   slow fallback, a FAIL).
10. ``apex``: whether apex's CUDA kernels are importable (SKIP without them).

Every run must learn (the loss falls in both phases) with finite, non-zero grad norms. Each
check runs in a child process with a timeout (a hung one is cut and its row says FAIL
(timeout); the rows before it stay); a check that would start with less than its timeout left
in ``--budget-s`` is cut to what is left. The summary is written as it goes: ``summary.txt``
(one line per row, appended and flushed), the child logs under ``logs/``, then the table and
``gpu_check.json``, all in ``--out`` (default ``$OUT``, else ``runs/gpu_check``). Exit 1 on
any FAIL. ``--dry-run`` runs nothing (no GPU needed): it prints and writes every row, the
SKIP ones with their reasons and the others with their commands.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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


MFU_FLOOR = 0.20  # dense_rope phase 2: the local (no-TE) spec of a 561M model, bf16
RUN_TIMEOUT_S = 150.0  # one pretrain_tst.py run (start-up and torch.compile included)
LOSSES_TIMEOUT_S = 180.0
BUDGET_S = 560.0  # the whole check: under the device tool's 600 s per command
PASS, FAIL, SKIP, DRY = "PASS", "FAIL", "SKIP", "DRY"


@dataclass
class Run:
    """One ``pretrain_tst.py`` launch (``nproc`` ranks, one GPU each)."""

    name: str
    flags: list[str]
    phase1_fraction: float  # the config files give a fraction: the CLI must too
    train_iters: int
    nproc: int = 1
    env: dict[str, str] = field(default_factory=dict)

    @property
    def phase1_iters(self) -> int:
        return math.floor(self.phase1_fraction * self.train_iters)  # TSTConfig's rule

    def command(self, out: Path, python: str = sys.executable) -> list[str]:
        return [
            python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(self.nproc), "pretrain_tst.py", *self.flags,
            "--tst-phase1-fraction", str(self.phase1_fraction),
            "--train-iters", str(self.train_iters),
            "--metrics-jsonl", str(out / f"{self.name}.jsonl"),
        ]  # fmt: skip


def plan(out: Path, transformer_engine: bool = False, megatron_fsdp: bool = False,
         gpus: int = 1) -> list[Run]:  # fmt: skip
    """The runs this machine can make, in order (the resume needs the first one's checkpoint):
    ``te_fp8`` with Transformer Engine, ``megatron_fsdp`` once pretrain_tst.py has
    ``--use-megatron-fsdp``, ``nccl_tp2`` with two GPUs (`unavailable` says why not)."""
    ckpt = out / "ckpt_dense_learned"
    runs = [
        Run("dense_learned", [*DENSE, "--bf16", *LEARNED, "--save", str(ckpt),
                              "--save-interval", "8"], 0.625, 16),
        Run("dense_resume", [*DENSE, "--bf16", *LEARNED, "--load", str(ckpt / "iter_0000008")],
            0.625, 16),
        Run("dense_rope", [*DENSE, "--bf16"], 0.5, 24),
        Run("fp16", [*DENSE, *LEARNED, "--fp16", "--initial-loss-scale", "65536"], 0.5, 12),
        Run("moe", [*MOE, "--tst-bag-size", "6"], 0.5, 16),
    ]  # fmt: skip
    if transformer_engine:
        runs.append(Run("te_fp8", [*DENSE, "--bf16", "--transformer-impl", "transformer_engine",
                                   "--fp8-format", "hybrid", "--fp8-recipe", "delayed"],
                        0.5, 24))  # fmt: skip
    if megatron_fsdp:  # Megatron-LM: FSDP wants more than one hardware queue
        runs.append(Run("megatron_fsdp", [*DENSE, "--bf16", "--use-megatron-fsdp"], 0.5, 8,
                        env={"CUDA_DEVICE_MAX_CONNECTIONS": "8"}))  # fmt: skip
    if gpus >= 2:
        tp2 = ["--hidden-size", "1024", "--num-attention-heads", "16", "--num-query-groups", "4",
               "--tensor-model-parallel-size", "2", "--sequence-parallel"]  # fmt: skip
        runs.append(Run("nccl_tp2", [*DENSE, "--bf16", *tp2], 0.5, 8, nproc=2))
    return runs


def unavailable(transformer_engine: bool, megatron_fsdp: bool, gpus: int,
                apex: bool) -> dict[str, str]:  # fmt: skip
    """The checks this machine cannot run, each with the reason (its SKIP row)."""
    reasons = {}
    if not transformer_engine:
        reasons["te_fp8"] = ("Transformer Engine is not installed: the TE spec and FP8 GEMMs "
                             "are not checked (an NGC PyTorch container has it)")  # fmt: skip
    if not megatron_fsdp:
        reasons["megatron_fsdp"] = "pretrain_tst.py has no --use-megatron-fsdp yet"
    if gpus < 2:
        visible = f"{gpus} GPU{'' if gpus == 1 else 's'} visible"
        reasons["nccl_tp2"] = (f"{visible}: NCCL across ranks (TP/DP/PP/EP collectives) is "
                               "not checked; see docs/gpu.md, 'A first multi-GPU run'")  # fmt: skip
    if not apex:
        reasons["apex"] = ("apex's CUDA kernels (fused_weight_gradient_mlp_cuda, "
                           "fused_layer_norm_cuda) are not importable: Megatron-Core and the "
                           "fused output loss use their torch paths")  # fmt: skip
    return reasons


class Summary:
    """The rows (check, value, PASS/FAIL/SKIP), printed and appended to ``path`` (flushed
    and synced) as each one is added, so that a cut run leaves every row before the cut."""

    def __init__(self, path: Path | None = None, rows_path: Path | None = None) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.numbers: dict = {}
        self.path, self.rows_path = path, rows_path

    def add(self, name: str, value: str, status: str, write: bool = True) -> None:
        self.rows.append((name, value, status))
        if not write:
            return
        line = f"{status:4}  {name}: {value}"
        print(line, flush=True)
        if self.path is not None:
            _append(self.path, line)
        if self.rows_path is not None:
            _append(self.rows_path, json.dumps([name, value, status]))

    def check(self, name: str, value: str, ok: bool) -> None:
        self.add(name, value, PASS if ok else FAIL)

    def skip(self, name: str, reason: str, required: bool = False) -> None:
        """A check not run: SKIP, or FAIL where it was required (``--require-te``)."""
        self.add(name, reason + (" (required)" if required else ""), FAIL if required else SKIP)

    def write_line(self, text: str) -> None:
        print(text, flush=True)
        if self.path is not None:
            _append(self.path, text)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(status != FAIL for _, _, status in self.rows)

    def table(self) -> str:
        width = max(len(name) for name, _, _ in self.rows)
        lines = [f"{'check':{width}}  result  value", "-" * (width + 40)]
        lines += [f"{n:{width}}  {status:6}  {v}" for n, v, status in self.rows]
        counts = {s: sum(row[2] == s for row in self.rows) for s in (PASS, FAIL, SKIP, DRY)}
        shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        lines.append(f"overall: {'PASS' if self.passed else 'FAIL'} ({shown})")
        return "\n".join(lines)


def _append(path: Path, line: str) -> None:
    with open(path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


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


def phase_speed(summary: Summary, run: Run, rows: list[dict], judge_mfu: bool = False) -> None:
    """Step time, TFLOP/s and MFU per phase; with ``judge_mfu`` the phase-2 MFU against
    `MFU_FLOOR`."""
    steps = [r for r in rows if "iteration_time_s" in r]
    for phase in (1, 2):
        times = [r for r in steps if r["phase"] == phase][3:]
        if not times:
            summary.check(f"{run.name}: phase {phase} step time", "no steps", False)
            continue
        seconds = statistics.median(r["iteration_time_s"] for r in times)
        mfu = [r["mfu"] for r in times if "mfu" in r]
        tflops = statistics.median(r["tflops_per_gpu"] for r in times)
        median_mfu = statistics.median(mfu) if mfu else None
        mfu_text = f", MFU {100 * median_mfu:.1f}% of BF16 peak" if median_mfu is not None else ""
        summary.numbers[f"{run.name}_phase{phase}"] = {
            "step_s": seconds, "tflops_per_gpu": tflops, "mfu": median_mfu,
        }  # fmt: skip
        summary.check(
            f"{run.name}: phase {phase} step time",
            f"{1e3 * seconds:.0f} ms, {tflops:.0f} TFLOP/s/GPU{mfu_text}",
            True,
        )
        if judge_mfu and phase == 2:
            name = f"{run.name}: phase 2 MFU >= {100 * MFU_FLOOR:.0f}%"
            if median_mfu is None:
                summary.skip(name, "no MFU logged: this GPU's BF16 peak is unknown "
                                   "(tst_megatron.training.flops.PEAK_TFLOPS_BF16)")  # fmt: skip
            else:
                summary.check(name, f"{100 * median_mfu:.1f}%", median_mfu >= MFU_FLOOR)


def check_run(summary: Summary, run: Run, out: Path, reference: dict[str, Run]) -> None:
    """The rows of one finished run (exit 0): learning, and what is particular to it."""
    rows = records(out / f"{run.name}.jsonl")
    if run.name != "dense_resume":
        check_learning(summary, run, rows)
    if run.name == "dense_resume":
        full = {r["iteration"]: r["lm_loss"]
                for r in records(out / "dense_learned.jsonl") if "lm_loss" in r}  # fmt: skip
        resumed = {r["iteration"]: r["lm_loss"] for r in rows if "lm_loss" in r}
        same = sorted(resumed) == list(range(9, 17))
        same = same and all(resumed[i] == full.get(i) for i in resumed)
        diff = max((abs(resumed[i] - full[i]) for i in resumed if i in full),
                   default=float("nan"))  # fmt: skip
        summary.check("dense_resume: iterations 9-16 exact", f"max |dloss| {diff:.3g}", same)
    if run.name == "fp16":
        steps = [r for r in rows if "iteration_time_s" in r]
        skipped = sum(r.get("skipped_iterations", 0) for r in steps)
        scale = steps[-1].get("loss_scale") if steps else None
        summary.check("fp16: overflow steps skipped", f"{skipped} skipped, final scale {scale}",
                      bool(steps) and skipped < len(steps))  # fmt: skip
    if run.name in ("dense_rope", "te_fp8"):
        phase_speed(summary, run, rows, judge_mfu=run.name == "dense_rope")


@dataclass
class Step:
    """One child process of the check: its command, its time limit, and the rows it adds
    once it ends (``evaluate(summary, finished)``; ``finished`` is False after a timeout)."""

    name: str
    command: list[str]
    timeout_s: float
    evaluate: Callable[[Summary, bool], None] | None = None
    needs: str | None = None  # a step that must have passed first
    env: dict[str, str] = field(default_factory=dict)


def run_steps(steps: list[Step], summary: Summary, logs: Path, env: dict[str, str],
              budget_s: float = BUDGET_S, cwd: Path | None = None) -> None:  # fmt: skip
    """Run ``steps`` in order, each cut at its timeout (and at what is left of ``budget_s``);
    one ``NAME: exit code`` row each, then its own rows. A cut step's process group is
    killed, its row says FAIL (timeout), and the next step starts."""
    logs.mkdir(parents=True, exist_ok=True)
    start, passed = time.monotonic(), set()
    for step in steps:
        left = budget_s - (time.monotonic() - start)
        if step.needs and step.needs not in passed:
            summary.skip(f"{step.name}: exit code", f"not run: it needs {step.needs}, which "
                                                    "did not pass")  # fmt: skip
            continue
        if left < 10:
            left_text = f"not run: {left:.0f} s left of --budget-s {budget_s:g}"
            summary.check(f"{step.name}: exit code", left_text, False)
            continue
        timeout = min(step.timeout_s, left)
        log = logs / f"{step.name}.log"
        summary.write_line(f"=== {step.name} (timeout {timeout:.0f} s): "
                           f"{shlex.join(step.command)}")  # fmt: skip
        begin = time.monotonic()
        with open(log, "w") as handle:
            proc = subprocess.Popen(step.command, cwd=cwd, env={**env, **step.env},
                                    stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
                _kill_group(proc)
        seconds = time.monotonic() - begin
        if code is None:
            summary.check(f"{step.name}: exit code", f"timeout: cut after {seconds:.0f} s "
                                                     f"(log logs/{log.name})", False)  # fmt: skip
        else:
            summary.check(f"{step.name}: exit code", f"{code} ({seconds:.0f} s)", code == 0)
            if code == 0:
                passed.add(step.name)
        if step.evaluate is not None and (code == 0 or step.name == "losses"):
            step.evaluate(summary, code is not None)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the step's process group (torchrun and its ranks) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_losses(summary: Summary) -> None:
    """The CUDA loss checks in one single-rank NCCL process group (Megatron's CE needs it)."""
    import torch
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
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
        return (
            torch.nn.functional.cross_entropy(
                leaf.float().flatten(0, 1), labels.flatten(), reduction="none"
            )
            .view(length, batch)
            .transpose(0, 1)
        )

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
    from tst_megatron.loss.fused_output import SEPARATE_ACCUMULATION, weight_grad_accumulation

    device = torch.device("cuda", torch.cuda.current_device())
    path = weight_grad_accumulation(device, torch.bfloat16)
    summary.numbers["fused_output_accumulation"] = path
    slow = " (neither apex's kernel nor torch's fp32-accumulating addmm runs here)"
    summary.check("fused_output: weight-gradient accumulation path",
                  path + (slow if path == SEPARATE_ACCUMULATION else ""),
                  path != SEPARATE_ACCUMULATION)  # fmt: skip
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


def detect() -> dict:
    """What this machine has: Transformer Engine, ``--use-megatron-fsdp``, GPUs, apex."""
    import torch

    from tst_megatron.settings import Environment
    from tst_megatron.training.arguments import build_parser

    apex = all(importlib.util.find_spec(name) is not None
               for name in ("fused_weight_gradient_mlp_cuda", "fused_layer_norm_cuda"))  # fmt: skip
    return {
        "transformer_engine": Environment.detect().transformer_engine,
        "megatron_fsdp": "--use-megatron-fsdp" in build_parser()._option_string_actions,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "apex": apex,
    }


def planned_rows(step: str) -> list[tuple[str, str]]:
    """The rows ``step`` adds after its exit-code row, with what each must show (the dry run
    prints them)."""
    learning = [(f"{step}: loss falls", "in phase 1 and in phase 2"),
                (f"{step}: grad norm finite > 0", "every updated step")]  # fmt: skip
    speed = [(f"{step}: phase {p} step time", "median after 3 steps, TFLOP/s, MFU")
             for p in (1, 2)]  # fmt: skip
    if step == "dense_resume":
        return [("dense_resume: iterations 9-16 exact", "losses equal dense_learned's")]
    if step == "fp16":
        return [*learning, ("fp16: overflow steps skipped", "fewer skipped than steps")]
    if step == "dense_rope":
        mfu = (f"dense_rope: phase 2 MFU >= {100 * MFU_FLOOR:.0f}%",
               f"median MFU of phase 2 at least {MFU_FLOOR:g} of the BF16 peak")  # fmt: skip
        return [*learning, *speed, mfu]
    if step == "te_fp8":
        return [*learning, *speed]
    if step == "losses":
        rows = [("fused_output: weight-gradient accumulation path",
                 "apex wgrad_gemm_accum_fp32 or torch.addmm(out_dtype=fp32), not the "
                 "fallback")]  # fmt: skip
        for s in CE_BAG_SIZES:
            rows += [(f"multi_hot_ce s={s}: error vs plain torch", "loss < 1e-4, grad < 2e-2"),
                     (f"multi_hot_ce s={s}: time / one CE", "<= 1.5x"),
                     (f"multi_hot_ce s={s}: max_memory_allocated / one CE", "<= 1.1x")]  # fmt: skip
        for s in FUSED_OUTPUT_BAG_SIZES:
            rows += [(f"fused_output s={s}: error vs fp32", "<= 1.5x unfused bf16's + 1e-3"),
                     (f"fused_output s={s}: time / unfused", "<= 1.15x"),
                     (f"fused_output s={s}: max_memory_allocated / unfused",
                      "<= 0.3x")]  # fmt: skip
        return rows
    return learning


def steps_for(runs: list[Run], work: Path, out: Path, python: str,
              timeout_s: float = RUN_TIMEOUT_S) -> list[Step]:  # fmt: skip
    """The runs, then the loss checks (a child process), as `Step`s."""
    logs = out / "logs"

    def rows_of(run: Run) -> Callable[[Summary, bool], None]:
        return lambda summary, finished: check_run(summary, run, logs, {})

    steps = [
        Step(run.name, run.command(logs, python), timeout_s, rows_of(run),
             needs="dense_learned" if run.name == "dense_resume" else None, env=run.env)
        for run in runs
    ]  # fmt: skip
    child = [python, "-m", "tst_megatron.testing.gpu_check", "--child", "losses", "--out",
             str(out)]  # fmt: skip
    steps.append(Step("losses", child, LOSSES_TIMEOUT_S,
                      lambda summary, finished: _ingest_losses(summary, logs)))  # fmt: skip
    return steps


def _losses_child(out: Path) -> int:
    """``--child losses``: the loss checks, each row appended to the summary as it comes."""
    logs = out / "logs"
    summary = Summary(out / "summary.txt", rows_path=logs / "losses_rows.jsonl")
    check_losses(summary)
    (logs / "losses_numbers.json").write_text(json.dumps(summary.numbers))
    return 0


def _ingest_losses(summary: Summary, logs: Path) -> None:
    """The rows (and numbers) the loss child wrote; they are in summary.txt already."""
    rows = logs / "losses_rows.jsonl"
    for line in rows.read_text().splitlines() if rows.exists() else []:
        name, value, status = json.loads(line)
        summary.add(name, value, status, write=False)
    numbers = logs / "losses_numbers.json"
    if numbers.exists():
        summary.numbers.update(json.loads(numbers.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="Print and write every row (SKIP ones with their reasons, the "
                        "others with their commands); run nothing.")  # fmt: skip
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check",
                        help="summary.txt, gpu_check.json and logs/ (default $OUT, else "
                        "runs/gpu_check).")  # fmt: skip
    parser.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"),
                        help="Scratch directory for checkpoints.")  # fmt: skip
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--require-te", action="store_true",
                        help="FAIL the Transformer Engine / FP8 check where TE is missing "
                        "(default: SKIP).")  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=RUN_TIMEOUT_S,
                        help="Time limit of each pretrain_tst.py run (then cut: FAIL "
                        "(timeout)).")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="Time limit of the whole check (runs are cut to what is "
                        "left).")  # fmt: skip
    parser.add_argument("--child", choices=["losses"], help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    out, work = Path(opts.out), Path(opts.work)
    if opts.child == "losses":
        return _losses_child(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text("")
    summary = Summary(out / "summary.txt")
    summary.write_line(_environment())
    found = detect()
    for name, reason in unavailable(**found).items():
        summary.skip(name, reason, required=name == "te_fp8" and opts.require_te)
    if found["apex"]:
        summary.check("apex", "fused_weight_gradient_mlp_cuda and fused_layer_norm_cuda "
                              "importable", True)  # fmt: skip
    runs = plan(work, found["transformer_engine"], found["megatron_fsdp"], found["gpus"])
    steps = steps_for(runs, work, out, opts.python, opts.timeout_s)
    started = time.monotonic()
    if opts.dry_run:
        for step in steps:
            summary.add(f"{step.name}: exit code", shlex.join(step.command), DRY)
            for name, criterion in planned_rows(step.name):
                summary.add(name, criterion, DRY)
        summary.add("total wall time", f"<= --budget-s {opts.budget_s:g} s", DRY)
    else:
        work.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS: the resume is exact
            "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "1"),
        }
        run_steps(steps, summary, out / "logs", env, opts.budget_s, cwd=ROOT)
        wall = time.monotonic() - started
        summary.numbers["wall_s"] = wall
        summary.check("total wall time", f"{wall:.0f} s (budget {opts.budget_s:g} s)",
                      wall <= opts.budget_s)  # fmt: skip
    summary.write_line(summary.table())
    report = {"rows": summary.rows, "numbers": summary.numbers, "found": found}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
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
