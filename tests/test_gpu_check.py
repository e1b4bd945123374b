"""examples/gpu_check.sh without a GPU: the dry run, the planned commands, the rows' logic,
the summary written as it goes, and a hung check cut by its timeout.

The script cannot run in CI (no GPU). What can be proven here: ``--dry-run`` prints and writes
(under ``$OUT``) every row, the SKIP ones with their reasons; every planned ``pretrain_tst.py``
command line parses and validates (no typo reaches the GPU machine); the rows pass good
records and fail bad ones (the MFU floor included); and the step runner appends each row to
the summary before the next step starts, cuts a step at its timeout and goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tst_megatron.kernels import KernelAvailability
from tst_megatron.settings import Environment
from tst_megatron.testing import gpu_check
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["dense_learned", "dense_resume", "dense_rope", "fp16", "moe"]
ALWAYS_SKIPPED_IN_CI = ["te_fp8", "nccl_tp2", "apex"]  # no TE, no GPU, no apex here


def _dry_run(out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", "OUT": str(out)}
    return subprocess.run(
        ["bash", str(ROOT / "examples" / "gpu_check.sh"), "--dry-run", *flags],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_dry_run_prints_and_writes_every_row_under_out(tmp_path):
    proc = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ALWAYS_SKIPPED_IN_CI:
        assert any(line.startswith(f"SKIP  {name}: ") for line in lines), name
    assert "SKIP  nccl_tp2: 0 GPUs visible: NCCL across ranks" in proc.stdout
    assert any(line.startswith(("SKIP  megatron_fsdp: ", "DRY   megatron_fsdp: exit code: "))
               for line in lines)  # fmt: skip
    for name in [*NAMES, "losses"]:
        assert any(line.startswith(f"DRY   {name}: exit code: ") for line in lines), name
    assert proc.stdout.count("pretrain_tst.py") >= 2 * len(NAMES)  # row and table
    assert "DRY   dense_rope: phase 2 MFU >= 20%: median MFU of phase 2 at least 0.2" in (
        proc.stdout
    )
    assert "DRY   fused_output: weight-gradient accumulation path: " in proc.stdout
    assert "overall: PASS" in proc.stdout
    summary = (tmp_path / "summary.txt").read_text()
    rows = [line for line in lines if line.startswith(("SKIP  ", "DRY   "))]
    assert rows and all(row in summary.splitlines() for row in rows)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {name for name, _, status in report["rows"] if status == "SKIP"} >= set(
        ALWAYS_SKIPPED_IN_CI
    )


def test_require_te_fails_instead_of_skipping(tmp_path):
    proc = _dry_run(tmp_path, "--require-te")
    assert proc.returncode == 1
    assert "FAIL  te_fp8: Transformer Engine is not installed" in proc.stdout
    assert "(required)" in proc.stdout and "overall: FAIL" in proc.stdout


def _pretrain_args(run: gpu_check.Run, tmp_path: Path) -> list[str]:
    command = run.command(tmp_path)
    return command[command.index("pretrain_tst.py") + 1 :]


@pytest.mark.parametrize("transformer_engine", [False, True])
def test_every_planned_command_validates(tmp_path, transformer_engine):
    env = Environment(kernels=KernelAvailability(cuda=False, transformer_engine=transformer_engine))
    fsdp = gpu_check.detect()["megatron_fsdp"]
    runs = gpu_check.plan(tmp_path, transformer_engine, megatron_fsdp=fsdp, gpus=2)
    extra = (["te_fp8"] if transformer_engine else []) + (["megatron_fsdp"] if fsdp else [])
    assert [r.name for r in runs] == [*NAMES, *extra, "nccl_tp2"]
    for run in runs:
        args = parse_args(_pretrain_args(run, tmp_path))
        if run.name == "megatron_fsdp":  # this host has no CUDA: refused for that alone
            with pytest.raises(ConfigError, match="--use-megatron-fsdp needs CUDA GPUs"):
                validate_args(args, world_size=run.nproc, env=env)
            continue
        validate_args(args, world_size=run.nproc, env=env)
        assert args.tst.phase1_iterations(args.train_iters) == run.phase1_iters, run.name
        assert args.bf16 != args.fp16, run.name
        assert args.transformer_impl == ("transformer_engine" if run.name == "te_fp8" else "local")
        assert f"--nproc-per-node {run.nproc}" in " ".join(run.command(tmp_path))
    dense = parse_args(_pretrain_args(runs[0], tmp_path))
    validate_args(dense, world_size=1, env=env)
    assert dense.save_interval < dense.train_iters  # a mid-run save
    resume = runs[1].command(tmp_path)
    assert str(tmp_path / "ckpt_dense_learned" / "iter_0000008") in resume


def _write_good_records(runs, logs: Path, mfu: float = 0.3) -> None:
    for run in runs:
        first = 9 if run.name == "dense_resume" else 1
        rows = []
        for i in range(first, run.train_iters + 1):
            phase = 1 if i <= run.phase1_iters else 2
            row = {
                "iteration": i, "phase": phase, "lm_loss": 11.0 - 0.1 * i + (phase == 2),
                "grad_norm": 1.0, "iteration_time_s": 0.25, "tflops_per_gpu": 300.0,
                "mfu": mfu, "skipped_iterations": 0, "nan_iterations": 0,
            }  # fmt: skip
            if run.name == "fp16":
                row["loss_scale"] = 65536.0
            rows.append(row)
        (logs / f"{run.name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def _summary(runs, logs: Path) -> gpu_check.Summary:
    summary = gpu_check.Summary()
    for run in runs:
        gpu_check.check_run(summary, run, logs, {})
    return summary


def _failed(summary: gpu_check.Summary) -> set[str]:
    return {name for name, _, status in summary.rows if status == gpu_check.FAIL}


def test_the_checks_pass_good_runs_and_fail_bad_ones(tmp_path):
    runs = gpu_check.plan(tmp_path)
    _write_good_records(runs, tmp_path)
    good = _summary(runs, tmp_path)
    assert good.passed, good.table()
    assert good.numbers["dense_rope_phase1"]["mfu"] == 0.3
    assert ("dense_rope: phase 2 MFU >= 20%", "30.0%", "PASS") in good.rows

    fp16 = tmp_path / "fp16.jsonl"
    rows = [json.loads(line) for line in fp16.read_text().splitlines()]
    fp16.write_text("\n".join(json.dumps({**r, "grad_norm": 0.0}) for r in rows))
    resume = tmp_path / "dense_resume.jsonl"
    rows = [json.loads(line) for line in resume.read_text().splitlines()]
    rows[3]["lm_loss"] += 1e-6
    resume.write_text("\n".join(json.dumps(r) for r in rows))
    bad = _summary(runs, tmp_path)
    assert _failed(bad) == {"fp16: grad norm finite > 0", "dense_resume: iterations 9-16 exact"}
    assert "overall: FAIL" in bad.table()


def test_mfu_below_the_floor_fails(tmp_path):
    runs = gpu_check.plan(tmp_path)
    _write_good_records(runs, tmp_path, mfu=0.12)
    slow = _summary(runs, tmp_path)
    assert _failed(slow) == {"dense_rope: phase 2 MFU >= 20%"}
    assert ("dense_rope: phase 2 MFU >= 20%", "12.0%", "FAIL") in slow.rows


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_summary_is_written_as_it_goes_and_a_hung_check_is_cut(tmp_path):
    """A step sees the rows of the steps before it in summary.txt; a step that hangs (a
    process group of two sleepers) is cut at its timeout with a FAIL (timeout) row, the one
    that needs it is skipped, and the next one still runs."""
    path = tmp_path / "summary.txt"
    summary = gpu_check.Summary(path)

    def marker(summary: gpu_check.Summary, finished: bool) -> None:
        summary.check("first: its own row", "written", finished)

    sees_first = (f"import sys; text = open({str(path)!r}).read(); "
                  "sys.exit(0 if 'PASS  first: its own row: written' in text else 3)")  # fmt: skip
    hang = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    steps = [
        gpu_check.Step("first", _python("pass"), 60, marker),
        gpu_check.Step("second", _python(sees_first), 60),
        gpu_check.Step("hung", _python(hang), 3),
        gpu_check.Step("after_hung", _python("pass"), 60, needs="hung"),
        gpu_check.Step("last", _python("pass"), 60),
    ]
    begin = time.monotonic()
    gpu_check.run_steps(steps, summary, tmp_path / "logs", dict(os.environ))
    assert time.monotonic() - begin < 60
    statuses = [(name, status) for name, _, status in summary.rows]
    assert statuses == [
        ("first: exit code", "PASS"), ("first: its own row", "PASS"),
        ("second: exit code", "PASS"), ("hung: exit code", "FAIL"),
        ("after_hung: exit code", "SKIP"), ("last: exit code", "PASS"),
    ]  # fmt: skip
    hung = next(value for name, value, _ in summary.rows if name == "hung: exit code")
    assert hung.startswith("timeout: cut after 3 s (log logs/hung.log)")
    written = [line for line in path.read_text().splitlines() if not line.startswith("===")]
    assert [line.split(":")[0] for line in written] == [
        "PASS  first", "PASS  first", "PASS  second", "FAIL  hung", "SKIP  after_hung",
        "PASS  last",
    ]  # fmt: skip
    assert (tmp_path / "logs" / "hung.log").exists()


def test_the_loss_child_rows_reach_the_summary_once(tmp_path):
    """The loss checks run in a child that appends its rows to summary.txt itself; the parent
    takes them into its verdict without writing them again."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = tmp_path / "summary.txt"
    child = gpu_check.Summary(path, rows_path=logs / "losses_rows.jsonl")
    child.check("fused_output: weight-gradient accumulation path", "separate GEMM + fp32 add",
                False)  # fmt: skip
    child.numbers["fused_output_accumulation"] = "separate GEMM + fp32 add"
    (logs / "losses_numbers.json").write_text(json.dumps(child.numbers))
    parent = gpu_check.Summary(path)
    gpu_check._ingest_losses(parent, logs)
    assert parent.rows == child.rows and not parent.passed
    assert parent.numbers["fused_output_accumulation"] == "separate GEMM + fp32 add"
    assert path.read_text().count("weight-gradient accumulation path") == 1
