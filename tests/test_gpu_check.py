"""examples/gpu_check.sh without a GPU: the dry run, the planned commands, the checks' logic.

The script cannot run in CI (no GPU). What can be proven here: ``--dry-run`` prints every run;
every planned ``pretrain_tst.py`` command line parses and validates (no typo reaches the GPU
machine); and the summary logic passes good records and fails bad ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tst_megatron.testing import gpu_check
from tst_megatron.training import arguments
from tst_megatron.training.arguments import parse_args, validate_args

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["dense_learned", "dense_resume", "dense_rope", "fp16", "moe"]


def test_dry_run_prints_every_run_and_needs_no_gpu():
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "gpu_check.sh"), "--dry-run"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in NAMES:
        assert f"# {name}\n" in proc.stdout
    assert proc.stdout.count("pretrain_tst.py") == len(NAMES)
    assert "# multi_hot_ce: bf16 logits [2048, 4, 128256]" in proc.stdout
    assert "# fused_output: bf16 hidden [4096, 1, 1024], output weight [128256, 1024]" in (
        proc.stdout
    )


def _pretrain_args(run: gpu_check.Run, tmp_path: Path) -> list[str]:
    command = run.command(tmp_path)
    return command[command.index("pretrain_tst.py") + 1 :]


@pytest.mark.parametrize("transformer_engine", [False, True])
def test_every_planned_command_validates(tmp_path, monkeypatch, transformer_engine):
    monkeypatch.setattr(arguments, "transformer_engine_installed", lambda: transformer_engine)
    runs = gpu_check.plan(tmp_path, transformer_engine=transformer_engine)
    assert [r.name for r in runs] == NAMES + (["te_fp8"] if transformer_engine else [])
    for run in runs:
        args = parse_args(_pretrain_args(run, tmp_path))
        validate_args(args, world_size=1)
        assert args.tst.phase1_iterations(args.train_iters) == run.phase1_iters, run.name
        assert args.bf16 != args.fp16, run.name
        assert args.transformer_impl == ("transformer_engine" if run.name == "te_fp8" else "local")
    dense = parse_args(_pretrain_args(runs[0], tmp_path))
    validate_args(dense, world_size=1)
    assert dense.save_interval < dense.train_iters  # a mid-run save
    resume = runs[1].command(tmp_path)
    assert str(tmp_path / "ckpt_dense_learned" / "iter_0000008") in resume


def _write_good_records(runs, work: Path) -> None:
    for run in runs:
        first = 9 if run.name == "dense_resume" else 1
        rows = []
        for i in range(first, run.train_iters + 1):
            phase = 1 if i <= run.phase1_iters else 2
            row = {
                "iteration": i, "phase": phase, "lm_loss": 11.0 - 0.1 * i + (phase == 2),
                "grad_norm": 1.0, "iteration_time_s": 0.25, "tflops_per_gpu": 300.0,
                "mfu": 0.3, "skipped_iterations": 0, "nan_iterations": 0,
            }  # fmt: skip
            if run.name == "fp16":
                row["loss_scale"] = 65536.0
            rows.append(row)
        (work / f"{run.name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def _summary(runs, work: Path) -> gpu_check.Summary:
    summary = gpu_check.Summary()
    gpu_check.check_runs(summary, runs, work, {run.name: (0, 30.0) for run in runs})
    return summary


def test_the_checks_pass_good_runs_and_fail_bad_ones(tmp_path):
    runs = gpu_check.plan(tmp_path)
    _write_good_records(runs, tmp_path)
    good = _summary(runs, tmp_path)
    assert good.passed, good.table()
    assert good.numbers["dense_rope_phase1"]["mfu"] == 0.3

    fp16 = tmp_path / "fp16.jsonl"
    rows = [json.loads(line) for line in fp16.read_text().splitlines()]
    fp16.write_text("\n".join(json.dumps({**r, "grad_norm": 0.0}) for r in rows))
    resume = tmp_path / "dense_resume.jsonl"
    rows = [json.loads(line) for line in resume.read_text().splitlines()]
    rows[3]["lm_loss"] += 1e-6
    resume.write_text("\n".join(json.dumps(r) for r in rows))
    bad = _summary(runs, tmp_path)
    failed = {name for name, _, ok in bad.rows if not ok}
    assert failed == {"fp16: grad norm finite > 0", "dense_resume: iterations 9-16 exact"}
    assert "overall: FAIL" in bad.table()
