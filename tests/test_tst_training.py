"""The trainer with the issue-13 options end to end: the fused output loss reproduces the
unfused run's losses for 20 steps (PP=2, tied embeddings, batch fold, power-law bag weights,
through the phase boundary), and the KL form of the phase-1 loss is logged.

Both runs are `tst_megatron.training.loop.Trainer` runs (argument parsing and validation,
model build, DDP, optimizer, data stream, schedule, metrics) inside one 2-rank launch of the
multi-rank harness, which saves two ``torchrun`` start-ups.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.multirank import run_multirank
from tst_megatron.config import PhaseSpec

ITERS, PHASE1 = 20, 10
ARGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
    "--seq-length 32 --max-position-embeddings 32 --swiglu --normalization RMSNorm "
    "--disable-bias-linear --position-embedding-type rope --transformer-impl local "
    "--distributed-backend gloo --seed 5 --hidden-dropout 0 --attention-dropout 0 "
    "--micro-batch-size 2 --global-batch-size 8 --lr 3e-3 --lr-warmup-iters 2 "
    "--log-interval 1 --eval-iters 0 --mock-data --vocab-size 512 "
    f"--train-iters {ITERS} --tst-bag-size 4 --tst-phase1-iters {PHASE1} "
    "--tst-fold batch --tst-bag-weighting power-law --pipeline-model-parallel-size 2"
).split()


def training_runs(out_dir: str) -> None:
    """Rank side: the unfused run, then the fused one, each from the same seed."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from tst_megatron.training.loop import Trainer, initialize_distributed
    from tst_megatron.training.run_config import settings_from_flags

    for name, extra in (("unfused", []), ("fused", ["--tst-fused-output-loss"])):
        run = settings_from_flags(
            [*ARGS, "--metrics-jsonl", str(Path(out_dir) / f"{name}.jsonl"), *extra], 2
        )
        ps.destroy_model_parallel()
        destroy_num_microbatches_calculator()
        initialize_distributed(run.parallel, run.batch, run.reliability, run.schedule.seed)
        Trainer(run).train()


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict[int, dict]]:
    out = tmp_path_factory.mktemp("tst_training")
    run_multirank(training_runs, 2, pp=2, args=(str(out),), timeout_s=300)
    result = {}
    for name in ("unfused", "fused"):
        lines = (out / f"{name}.jsonl").read_text().splitlines()
        result[name] = {r["iteration"]: r for r in map(json.loads, lines) if "lm_loss" in r}
    return result


@pytest.mark.slow
def test_fused_output_loss_reproduces_the_unfused_run(records):
    fused, unfused = records["fused"], records["unfused"]
    assert sorted(unfused) == sorted(fused) == list(range(1, ITERS + 1))
    for iteration, record in unfused.items():
        assert fused[iteration]["lm_loss"] == pytest.approx(record["lm_loss"], abs=1e-5), (
            iteration
        )
    assert len({round(r["lm_loss"], 4) for r in unfused.values()}) > ITERS // 2  # it trains


@pytest.mark.slow
def test_kl_form_and_batch_fold_data_are_recorded(records):
    by_step = records["unfused"]
    for iteration in range(1, PHASE1 + 1):  # the target entropy (about log 4) is > 0
        assert 0 < by_step[iteration]["lm_loss_kl"] < by_step[iteration]["lm_loss"] - 1.0
    for iteration in range(PHASE1 + 1, ITERS + 1):  # one target: KL form = CE
        assert by_step[iteration]["lm_loss_kl"] == by_step[iteration]["lm_loss"]
    # 8 samples per step, each 4 folded samples of 32/4 latent positions
    per_sample = PhaseSpec(4, "full", "batch").data_tokens_per_sample(32)
    assert by_step[PHASE1]["data_tokens"] == PHASE1 * 8 * per_sample
