"""RNG state in checkpoints: complete, and keyed so that every rank restores its own.

* In-process round trip at EP=2 (2 gloo ranks): each rank's Python, NumPy, torch and tracker
  states come back as that rank saved them (under expert parallelism the expert tracker
  differs per rank; keyed by (pp, tp) only, rank 1 would get rank 0's).
* End to end: a 2-rank MoE run at EP=2 with dropout 0.1 cut at iteration 3 and resumed
  reproduces the uninterrupted run's losses bit for bit, and its final checkpoint holds the
  same RNG state for each rank as the uninterrupted run's.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.launches import DP2, MODEL, TRAIN, TST, assert_same_losses, launch
from tests.support.multirank import run_multirank

MOE_EP2 = ["--num-experts", "4", "--moe-ffn-hidden-size", "64", "--expert-model-parallel-size",
           "2", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]  # fmt: skip


def same(a, b) -> bool:
    """Deep equality of RNG states (tuples, dicts, arrays, tensors)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _draw(count: int) -> None:
    """Advance every generator ``count`` times (as dropout and the data would)."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_expert_parallel_rng_tracker_name

    tracker = tensor_parallel.get_cuda_rng_tracker()
    for _ in range(count):
        random.random()
        np.random.rand()
        torch.rand(3)
        with tracker.fork():
            torch.rand(3)
        with tracker.fork(get_expert_parallel_rng_tracker_name()):
            torch.rand(3)


def rng_round_trip(directory: str) -> dict:
    """Save this rank's RNG state, scramble it, load it back; what came back (one rank)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from tst_megatron.training import rng_state

    rank = torch.distributed.get_rank()
    _draw(3 + 5 * rank)  # ranks' streams are at different points
    saved = rng_state.current_rng_state()
    dist_checkpointing.save({"rng": rng_state.sharded_rng_state()}, directory)
    _draw(7)
    loaded = dist_checkpointing.load({"rng": rng_state.sharded_rng_state()}, directory)
    rng_state.restore_rng_state(loaded["rng"])
    restored = rng_state.current_rng_state()
    return {
        "restored_own": all(same(saved[k], restored[k]) for k in saved if k != "cuda_rng_state"),
        "expert_rank": ps.get_expert_model_parallel_rank(),
        "expert_state": saved["rng_tracker_states"]["expert-parallel-rng"],
    }


def test_rng_round_trip_at_ep2_restores_each_rank_its_own(tmp_path):
    directory = tmp_path / "rng"
    directory.mkdir()
    results = run_multirank(rng_round_trip, 2, ep=2, args=(str(directory),), timeout_s=300)
    assert [r["expert_rank"] for r in results] == [0, 1]
    # the ranks' expert trackers differ: restoring rank 0's everywhere would be caught
    assert not torch.equal(results[0]["expert_state"], results[1]["expert_state"])
    assert all(r["restored_own"] for r in results)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rng")


def rng_shards(checkpoint: Path, tmp: Path) -> dict:
    """The saved per-rank RNG states of a checkpoint, read offline."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{checkpoint.parent.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if k.startswith("rng_state/")}


@pytest.mark.slow
def test_ep2_dropout_resume_is_bit_exact(tmp):
    base = [*MODEL, *TRAIN, *TST, *MOE_EP2]
    reference = launch(tmp, "ep2_reference", [*DP2, "--save", str(tmp / "ref")], nproc=2,
                       via="direct", base=base)  # fmt: skip
    assert reference.returncode == 0, reference.log[-3000:]
    cut = launch(tmp, "ep2_cut", [*DP2, "--save", str(tmp / "cut"), "--exit-interval", "3"],
                 nproc=2, via="direct", base=base)  # fmt: skip
    assert cut.returncode == 0, cut.log[-3000:]
    resumed = launch(tmp, "ep2_resumed",
                     [*DP2, "--load", str(tmp / "cut"), "--save", str(tmp / "cut")],
                     nproc=2, via="direct", base=base)  # fmt: skip
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert "at iteration 3 (phase 1, layout unchanged" in resumed.log
    assert_same_losses(cut, reference, range(1, 4))
    assert_same_losses(resumed, reference, range(4, 9))
    final_ref = rng_shards(tmp / "ref" / "iter_0000008", tmp)
    final_resumed = rng_shards(tmp / "cut" / "iter_0000008", tmp)
    assert len(final_ref) == 2  # one state per data-parallel (= expert) rank
    assert final_ref.keys() == final_resumed.keys()
    for key, state in final_ref.items():
        assert same(state, final_resumed[key]), key
