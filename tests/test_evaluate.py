"""tools/evaluate.py gives exactly the validation loss the trainer logs for the same weights.

A tiny TST run (phase 1 = iterations 1-2) validates and saves at iteration 3 and at its end
(iteration 4), by a real launch. ``tools/evaluate.py --load`` of each checkpoint with the
run's data and batch flags and no model flags (`Evaluator`: the model chunks, the weights,
the validation samples; no optimizer, no training samples) must print the trainer's
``valid_lm_loss`` bit for bit: the same samples through the same `forward_step` / loss path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launches import MOCK, MODEL, launch

ROOT = Path(__file__).resolve().parents[1]
EVAL = ["--micro-batch-size", "2", "--eval-iters", "3"]
RUN = [
    *MODEL, *EVAL, "--global-batch-size", "4", "--lr", "3e-3", "--train-iters", "4",
    "--log-interval", "1", "--eval-interval", "3", "--save-interval", "3",
    "--tst-bag-size", "2", "--tst-phase1-fraction", "0.5",
]  # fmt: skip


def evaluate(load: Path) -> subprocess.Popen:
    """evaluate.py of ``load``: the run's data, seed (the mock windows) and batch flags only."""
    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--load", str(load),
           "--mock-data", "--seed", "5", *EVAL, "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip


@pytest.mark.slow
def test_evaluate_gives_the_trainers_validation_loss(tmp_path):
    save = tmp_path / "run"
    run = launch(tmp_path, "run", ["--save", str(save)], data=MOCK, base=RUN)
    assert run.returncode == 0, run.log[-3000:]
    logged = {r["iteration"]: r["valid_lm_loss"] for r in run.records if "valid_lm_loss" in r}
    assert sorted(logged) == [3, 4] and logged[3] != logged[4]
    procs = {it: evaluate(save / f"iter_{it:07d}") for it in logged}
    for iteration, proc in procs.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
        record = json.loads(output.strip().splitlines()[-1])
        assert record["iteration"] == iteration and record["samples"] == 6
        assert record["lm_loss"] == logged[iteration]  # bit for bit
        assert f"validation loss at iteration {iteration} | lm loss value: " in output
        assert "model weights only" in output and "optimizer" not in output
