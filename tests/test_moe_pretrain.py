"""pretrain_tst.py end to end with MoE: an EP=2 run through the TST phase boundary, resumed.

Run A (2 ranks, expert parallel 2) trains 4 steps, TST phase 1 for 2, with aux-loss-free
expert bias, load-balancing and z losses, per-token loss, selective recomputation, manual
garbage collection and every timer (``--timing-log-level 2``), saving at steps 2 and 4.
Run C resumes A's step-2 checkpoint at the same layout and must reproduce steps 3-4 and the
step-4 expert bias bit for bit. Run B (1 rank, EP=1) loads A's step-4 checkpoint resharded
and saves it again: the expert bias comes through exactly. Checked also: the MoE metrics and
timers in the log and the JSONL, and the imbalance next to the boundary loss line.

B loads the model only (``--no-load-optim``): Megatron-Core's optimizer state of a MoE model
is a chain of two optimizers (dense and expert parameters) when EP > 1 and a single one at
EP = 1, with different checkpoint keys, so an EP change cannot carry the optimizer state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.support.multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--seq-length", "32", "--swiglu", "--normalization", "RMSNorm",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--position-embedding-type", "rope", "--transformer-impl", "local",
    "--distributed-backend", "gloo", "--seed", "5", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--mock-data", "--vocab-size", "512", "--eod-mask-loss",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
    "--train-iters", "4", "--log-interval", "1", "--eval-iters", "0",
    "--tst-bag-size", "4", "--tst-phase1-iters", "2",
]  # fmt: skip
MOE = [
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
    "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
    "--calculate-per-token-loss", "--recompute-activations",
]  # fmt: skip


def launch(tmp: Path, name: str, nproc: int, extra: list[str]) -> tuple[list[dict], str]:
    metrics = tmp / f"{name}.jsonl"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-port", str(free_port()), str(ROOT / "pretrain_tst.py"),
        *MODEL, *MOE, "--metrics-jsonl", str(metrics), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"run {name} failed:\n" + output[-4000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()], output


def expert_bias(checkpoint: Path, tmp: Path) -> torch.Tensor:
    """The ``[layers, experts]`` expert-bias buffer stored in a torch_dist checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(checkpoint), str(out))
    state = torch.load(out, weights_only=False)
    (key,) = [k for k in state if k.endswith("router.expert_bias")]
    return state[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_pretrain")
    ep2 = ["--expert-model-parallel-size", "2"]
    a = launch(
        tmp, "ep2", 2,
        [*ep2, "--timing-log-level", "2", "--manual-gc", "--manual-gc-interval", "2",
         "--save", str(tmp / "ep2"), "--save-interval", "2"],
    )  # fmt: skip
    c = launch(
        tmp, "ep2_resumed", 2,
        [*ep2, "--load", str(tmp / "ep2" / "iter_0000002"), "--save", str(tmp / "ep2_resumed")],
    )  # fmt: skip
    b = launch(
        tmp, "ep1", 1,
        ["--timing-log-level", "1", "--timing-log-option", "max", "--no-load-optim",
         "--load", str(tmp / "ep2" / "iter_0000004"), "--save", str(tmp / "ep1")],
    )  # fmt: skip
    return {"ep2": a, "ep2_resumed": c, "ep1": b, "dir": tmp}


def losses(records) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}


@pytest.mark.slow
def test_moe_metrics_and_timers_in_log_and_jsonl_through_the_boundary(runs):
    records, log = runs["ep2"]
    steps = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    assert [r["phase"] for r in steps] == [1, 1, 2, 2]
    for record in steps:
        for name in ("load_balancing_loss", "z_loss", "expert_load_max_over_mean"):
            assert record[name] > 0, name
            assert {f"moe/{name}_layer_0", f"moe/{name}_layer_1"} <= set(record)
        assert 1.0 <= record["expert_load_max_over_mean"] <= 2.0  # 4 experts, top-2
        for timer in ("batch-generator", "forward-backward", "all-grads-sync", "optimizer",
                      "forward-compute", "backward-compute"):  # fmt: skip
            assert record[f"time_ms/{timer}"] > 0, timer
    saves = [r for r in records if "time_ms/save-checkpoint" in r]
    assert [r["iteration"] for r in saves] == [2, 4]
    for field in (
        "load_balancing_loss: ",
        "z_loss: ",
        "expert_load_max_over_mean: ",
        "per layer: ",
    ):
        assert log.count(field) >= 4, field
    assert log.count("(min, max) time across ranks (ms):") >= 6  # 4 steps + 2 saves
    for timer in ("forward-backward", "all-grads-sync", "optimizer", "batch-generator",
                  "forward-compute", "save-checkpoint"):  # fmt: skip
        assert f"    {timer} ." in log, timer
    boundary = next(line for line in log.splitlines() if "phase 2, iteration 3: lm loss" in line)
    assert "expert load max/mean (mean over MoE layers)" in boundary
    assert "before the switch" in boundary and "after" in boundary
    assert "manual garbage collection: automatic collector off; collecting every 2 steps" in log


@pytest.mark.slow
def test_expert_bias_moves_and_survives_resume_and_ep2_to_ep1_reshard(runs):
    tmp = runs["dir"]
    at2 = expert_bias(tmp / "ep2" / "iter_0000002", tmp)
    at4 = expert_bias(tmp / "ep2" / "iter_0000004", tmp)
    assert at2.shape == (2, 4) and at2.abs().sum() > 0  # moved from zero in two steps
    assert not torch.equal(at2, at4)  # and kept moving
    assert torch.equal(expert_bias(tmp / "ep2_resumed" / "iter_0000004", tmp), at4)
    assert torch.equal(expert_bias(tmp / "ep1" / "iter_0000004", tmp), at4)
    _, log = runs["ep1"]
    assert "layout changed: resharded" in log
    assert "max time across ranks (ms):" in log and "    load-checkpoint ." in log


@pytest.mark.slow
def test_resumed_run_reproduces_the_losses(runs):
    original, resumed = losses(runs["ep2"][0]), losses(runs["ep2_resumed"][0])
    assert sorted(resumed) == [3, 4]
    assert resumed == {i: original[i] for i in (3, 4)}  # bit for bit on CPU
