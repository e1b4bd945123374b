"""bf16 and fp16 ``pretrain_tst.py`` runs end to end on CPU, through the TST phase boundary.

Real ``torchrun`` launches on the sample corpus (the fixture of ``tests/test_pretrain.py``),
TST full mode (s=4, phase 1 = iterations 1-4), 8 iterations, no ``--distributed-backend``
(the default must pick gloo without CUDA and say so):

- bf16 on 1 rank with learned positions and on 2 ranks with TP=2 (+SP) and RoPE: the loss
  falls in both phases, every grad norm is finite and non-zero, and a run resumed from the
  iteration-3 checkpoint (before the boundary) reproduces iterations 4-8 bit for bit.
- bf16 on 2 ranks with PP=2 and learned positions, resumed from the 1-rank run's iteration-3
  checkpoint (resharded; the 1-rank run saves with ``--ckpt-fully-reshardable``, as a layout
  change of the optimizer state needs): iterations 4-8 match the 1-rank run (to bf16 rounding; the
  pipeline split changes no operation, only where the layers run).
- fp16 on 1 rank, same seed as the 1-rank bf16 run, ``--initial-loss-scale 4096
  --hysteresis 1``: the first grad norm is the bf16 run's within 5%, and an injected overflow
  at iteration 3 (``TST_FAULT_INJECT=overflow:3``) is skipped, counted as skipped (not as a
  NaN step), halves the loss scale, and training goes on.
"""

from __future__ import annotations

import math
import os

import pytest
from test_pretrain import TINY_MODEL, corpus, losses, run  # noqa: F401 (corpus: a fixture)

TST = ["--tst-bag-size", "4", "--tst-phase1-fraction", "0.5"]
LEARNED = ["--position-embedding-type", "learned_absolute"]
ROPE = ["--position-embedding-type", "rope"]
DIST_OPT = ["--use-distributed-optimizer"]


def _no_backend_flag(flags: list[str]) -> list[str]:
    """``TINY_MODEL`` without ``--distributed-backend gloo``: the default must choose it."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == "--distributed-backend":
            skip = True
        else:
            out.append(flag)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, monkeypatch_module):  # noqa: F811
    """All launches (launches dominate the cost): name -> (records, log)."""
    import test_pretrain

    monkeypatch_module.setattr(test_pretrain, "TINY_MODEL", _no_backend_flag(TINY_MODEL))
    tmp = tmp_path_factory.mktemp("precision_runs")
    out = {}
    bf16 = ["--bf16", *TST, *DIST_OPT]
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", *ROPE]
    for name, nproc, flags in (("bf16_1", 1, LEARNED), ("bf16_tp2", 2, tp2)):
        save = ["--save", str(tmp / name), "--save-interval", "3"]
        if name == "bf16_1":  # resumed at PP=2 below: the optimizer state must reshard
            save.append("--ckpt-fully-reshardable")
        out[name] = run(tmp, name, [*bf16, *flags, *save], nproc, corpus)
        resume = ["--load", str(tmp / name / "iter_0000003")]
        out[f"{name}_resume"] = run(tmp, f"{name}_resume", [*bf16, *flags, *resume], nproc, corpus)
    # PP=2 continues the 1-rank run from iteration 3 (a fresh PP=2 run draws other weights)
    pp2 = ["--pipeline-model-parallel-size", "2", *LEARNED]
    resume = ["--load", str(tmp / "bf16_1" / "iter_0000003")]
    out["bf16_pp2"] = run(tmp, "bf16_pp2", [*bf16, *pp2, *resume], 2, corpus)
    fp16 = ["--fp16", "--initial-loss-scale", "4096", "--hysteresis", "1", *TST, *DIST_OPT]
    os.environ["TST_FAULT_INJECT"] = "overflow:3"
    try:
        out["fp16_1"] = run(tmp, "fp16_1", [*fp16, *LEARNED], 1, corpus)
    finally:
        del os.environ["TST_FAULT_INJECT"]
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def grad_norms(records) -> dict[int, float | None]:
    return {r["iteration"]: r["grad_norm"] for r in records if "grad_norm" in r}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bf16_1", "bf16_tp2", "bf16_pp2"])
def test_bf16_learns_through_the_boundary(runs, name):
    records, log = runs[name]
    loss = losses(records)
    first = min(loss)
    assert sorted(loss) == list(range(first, 9))
    if first == 1:
        assert loss[4] < loss[1] - 0.1  # phase 1 learns
    assert loss[8] < loss[5]  # phase 2 learns
    assert "TST phase boundary at iteration 4" in log
    for iteration, norm in grad_norms(records).items():
        assert norm is not None and math.isfinite(norm) and norm > 0, (iteration, norm)
    assert "backend gloo" in log  # chosen without CUDA, and said


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bf16_1", "bf16_tp2"])
def test_bf16_resume_is_exact(runs, name):
    full, resumed = losses(runs[name][0]), losses(runs[f"{name}_resume"][0])
    assert sorted(resumed) == list(range(4, 9))
    assert resumed == {i: full[i] for i in resumed}
    assert "loaded checkpoint" in runs[f"{name}_resume"][1]


@pytest.mark.slow
def test_bf16_pipeline_resumes_the_single_rank_run(runs):
    single, pp2 = losses(runs["bf16_1"][0]), losses(runs["bf16_pp2"][0])
    assert sorted(pp2) == list(range(4, 9))
    assert "layout changed: resharded" in runs["bf16_pp2"][1]
    for iteration, loss in pp2.items():
        assert loss == pytest.approx(single[iteration], rel=2e-3), iteration


@pytest.mark.slow
def test_fp16_first_grad_norm_matches_bf16(runs):
    fp16, bf16 = grad_norms(runs["fp16_1"][0]), grad_norms(runs["bf16_1"][0])
    assert fp16[1] > 0
    assert fp16[1] == pytest.approx(bf16[1], rel=0.05)


@pytest.mark.slow
def test_fp16_overflow_is_skipped_counted_and_scaled_down(runs):
    records, _ = runs["fp16_1"]
    by_iteration = {r["iteration"]: r for r in records if "skipped_iterations" in r}
    assert [i for i, r in by_iteration.items() if r["skipped_iterations"]] == [3]
    assert all(r["nan_iterations"] == 0 for r in by_iteration.values())
    assert by_iteration[2]["loss_scale"] == 4096.0
    assert by_iteration[3]["loss_scale"] == 2048.0  # --hysteresis 1: halved at once
    assert by_iteration[3]["grad_norm"] is None  # no update
    assert "lm_loss" not in by_iteration[3]  # skipped steps log no loss
    loss = losses(records)
    assert loss[8] < loss[5] and loss[4] < loss[1]  # learns on (iteration 3 did not update)
