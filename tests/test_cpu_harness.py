"""The CPU multi-rank harness reproduces the single-rank run exactly.

A tiny stock Megatron-Core ``GPTModel`` (hidden 64, 4 heads, 2 query groups, RoPE, RMSNorm,
SwiGLU, untied embeddings, fp32; 4 dense layers, or 2 MoE layers with 4 experts, top-2 and
query/key RMSNorm) takes one training step (4 micro-batches of ``[2, 32]`` tokens through
mcore's pipeline schedules, DDP and ``finalize_model_grads``) under each parallel layout. The
loss and every parameter's gradient must equal the single-rank run's. The single-rank weights
are copied into each layout (``load_full_params``) and the gradients gathered back to full
tensors (``gather_full_grads``, which also checks that replicated copies agree exactly).

Launches are grouped: one single-rank reference run, then one 2-rank and one 4-rank run that
each switch layouts in place (``switch_layout``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.multirank import (
    MultiRankError,
    gather_full_grads,
    gather_full_params,
    load_full_params,
    run_multirank,
    run_single,
    switch_layout,
)

SEQ_LEN = 32
MICRO_BATCH = 2
NUM_MICROBATCHES = 4
VOCAB = 1024
MODEL_SEED = 7
DATA_SEED = 11
# Tolerances, fp32. Gradients: max |parallel - single| per tensor, relative to that tensor's
# largest |single| entry (measured <= 1.1e-6; PP is bit-exact: same sums in the same order).
# Loss (~6.9): absolute (measured <= 1e-6).
GRAD_RTOL = 1e-5
LOSS_ATOL = 1e-5

DENSE, MOE = "dense", "moe"
# name -> (model kind, layout keywords of _build).
LAYOUTS_2_RANKS: dict[str, tuple[str, dict[str, Any]]] = {
    "tp2": (DENSE, {"tp": 2}),
    "tp2_sp": (DENSE, {"tp": 2, "sp": True}),
    "pp2": (DENSE, {"pp": 2}),
    "pp2_vpp2": (DENSE, {"pp": 2, "vpp": 2}),
    "cp2": (DENSE, {"cp": 2}),
    "dp2": (DENSE, {}),
    "ep2_alltoall": (MOE, {"ep": 2, "dispatcher": "alltoall"}),
    "ep2_allgather": (MOE, {"ep": 2, "dispatcher": "allgather"}),
}
LAYOUTS_4_RANKS: dict[str, tuple[str, dict[str, Any]]] = {
    "tp2_cp2": (DENSE, {"tp": 2, "cp": 2}),
    "tp2_sp_cp2": (DENSE, {"tp": 2, "sp": True, "cp": 2}),
    # mcore refuses MoE with TP but without SP in training.
    "ep2_tp2_sp_alltoall": (MOE, {"ep": 2, "tp": 2, "sp": True, "dispatcher": "alltoall"}),
    "ep2_tp2_sp_allgather": (MOE, {"ep": 2, "tp": 2, "sp": True, "dispatcher": "allgather"}),
}
LAYOUTS = {**LAYOUTS_2_RANKS, **LAYOUTS_4_RANKS}
# use_cpu_initialization builds each full weight and slices it, so with the same seed these
# layouts initialise exactly the single-rank weights; PP and EP build a different subset of
# the layers/experts per rank and draw different numbers.
LAYOUT_INDEPENDENT_INIT = {"tp2", "tp2_sp", "cp2", "dp2", "tp2_cp2", "tp2_sp_cp2"}
_PARALLEL_STATE_KEYS = ("tp", "pp", "cp", "ep", "vpp")


# --------------------------------------------------------------------------------------------
# Rank-side code (module level: pickled by reference into the rank processes)
# --------------------------------------------------------------------------------------------


def _build(kind: str, tp=1, pp=1, cp=1, ep=1, vpp=None, sp=False, dispatcher="alltoall"):
    """This rank's model chunks (one per virtual stage), each a DDP-wrapped GPTModel stage."""
    from megatron.core.models.gpt import GPTModel

    from tests.support.tiny_models import build_tiny_chunks, tiny_config

    # the MoE model also covers QK-norm: TP sums its grads by name, SP uses layers.norm.QKNorm
    config = tiny_config(
        moe=kind == MOE,
        num_layers=4 if kind == DENSE else 2,
        qk_layernorm=kind == MOE,
        dispatcher=dispatcher,
        tp=tp,
        pp=pp,
        cp=cp,
        ep=ep,
        vpp=vpp,
        sp=sp,
    )
    return build_tiny_chunks(config, GPTModel, vocab=VOCAB, seq_len=SEQ_LEN, seed=MODEL_SEED)


def _microbatches() -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's share of the global batch: ``tokens``/``labels`` ``[b, s]``."""
    from megatron.core import parallel_state as ps

    gen = torch.Generator().manual_seed(DATA_SEED)
    tokens = torch.randint(0, VOCAB, (NUM_MICROBATCHES, MICRO_BATCH, SEQ_LEN + 1), generator=gen)
    positions = torch.arange(SEQ_LEN).expand(MICRO_BATCH, SEQ_LEN)
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "position_ids": positions} for t in tokens]
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = NUM_MICROBATCHES // dp_size
    return batches[dp_rank * share : (dp_rank + 1) * share]


def _loss_func(per_token_loss: torch.Tensor):
    """``[b, s/cp]`` losses -> (local sum, local token count, CP-global mean for logging)."""
    from megatron.core import parallel_state as ps

    total = per_token_loss.float().sum()
    count = torch.tensor(per_token_loss.numel(), dtype=torch.int)
    report = torch.stack([total.detach(), count.float()])
    torch.distributed.all_reduce(report, group=ps.get_context_parallel_group())
    return total, count, {"loss": report[0] / report[1]}


def _forward_step(data_iterator, model):
    from megatron.core import parallel_state as ps

    from tst_megatron.mcore_compat import batch_on_this_cp_rank

    batch = batch_on_this_cp_rank(dict(next(data_iterator)), ps.get_context_parallel_group())
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, _loss_func


def _train_step(chunks) -> float:
    """One forward/backward over this rank's micro-batches; the global mean loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    microbatches = _microbatches()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=[iter(microbatches) for _ in chunks],
        model=chunks,
        num_microbatches=len(microbatches),
        seq_length=SEQ_LEN,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    # Ranks holding losses (last stage) hold equally many copies of each: average them all.
    stats = torch.tensor([float(sum(d["loss"] for d in losses)), float(len(losses))])
    torch.distributed.all_reduce(stats)
    return (stats[0] / stats[1]).item()


def reference_run(out_dir: str) -> dict[str, Any]:
    """Single rank: save each model's initial weights; return its loss and gradients."""
    results = {}
    for kind in (DENSE, MOE):
        chunks = _build(kind)
        torch.save(gather_full_params(chunks), Path(out_dir) / f"{kind}.pt")
        loss = _train_step(chunks)
        results[kind] = {"loss": loss, "grads": gather_full_grads(chunks)}
    return results


def _refuses_batched_p2p(chunks) -> bool:
    """Whether the interleaved schedule refuses ``batch_p2p_comm=True`` (wrong on gloo)."""
    config = chunks[0].config
    config.batch_p2p_comm = True
    try:
        _train_step(chunks)
    except ValueError as error:
        return "batch_p2p_comm=False" in str(error)
    finally:
        config.batch_p2p_comm = False
    return False


def layouts_run(params_dir: str, layouts: dict[str, tuple[str, dict[str, Any]]]):
    """For each layout: fresh-init difference, then loss and full gradients (rank 0 returns)."""
    from tst_megatron.cpu.shim import cpu_shim_installed, install_cpu_shim

    install_cpu_shim()  # idempotent: already installed by the launcher
    assert cpu_shim_installed()
    results = {}
    for name, (kind, layout) in layouts.items():
        switch_layout(**{k: v for k, v in layout.items() if k in _PARALLEL_STATE_KEYS})
        chunks = _build(kind, **layout)
        full_params = torch.load(Path(params_dir) / f"{kind}.pt")
        fresh = gather_full_params(chunks)
        init_diff = max((fresh[k] - full_params[k]).abs().max().item() for k in full_params)
        load_full_params(chunks, full_params)
        loss = _train_step(chunks)
        grads = gather_full_grads(chunks)
        results[name] = {"loss": loss, "grads": grads, "init_diff": init_diff}
        if layout.get("vpp"):
            results[name]["refuses_batched_p2p"] = _refuses_batched_p2p(chunks)
    return results if torch.distributed.get_rank() == 0 else None


def raise_on_rank_1() -> None:
    if torch.distributed.get_rank() == 1:
        raise ValueError("boom from rank 1")
    torch.distributed.barrier()  # rank 0 waits for a peer that is gone


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cpu_harness")


@pytest.fixture(scope="module")
def reference(params_dir) -> dict[str, Any]:
    return run_single(reference_run, args=(str(params_dir),), timeout_s=120)


@pytest.fixture(scope="module")
def results_2_ranks(params_dir, reference) -> dict[str, Any]:
    args = (str(params_dir), LAYOUTS_2_RANKS)
    return run_multirank(layouts_run, 2, args=args, timeout_s=240)[0]


@pytest.fixture(scope="module")
def results_4_ranks(params_dir, reference) -> dict[str, Any]:
    args = (str(params_dir), LAYOUTS_4_RANKS)
    return run_multirank(layouts_run, 4, tp=2, args=args, timeout_s=240)[0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(layout, reference, request):
    launch = "results_2_ranks" if layout in LAYOUTS_2_RANKS else "results_4_ranks"
    got = request.getfixturevalue(launch)[layout]
    ref = reference[LAYOUTS[layout][0]]
    assert got["loss"] == pytest.approx(ref["loss"], abs=LOSS_ATOL)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, ref_grad in ref["grads"].items():
        scale = ref_grad.abs().max().item()
        assert scale > 0, f"{name}: zero reference gradient proves nothing"
        error = (got["grads"][name] - ref_grad).abs().max().item() / scale
        assert error <= GRAD_RTOL, f"{name}: relative gradient error {error:.3g}"
    if layout in LAYOUT_INDEPENDENT_INIT:
        assert got["init_diff"] == 0.0


@pytest.mark.slow
def test_interleaved_schedule_refuses_batched_p2p(results_2_ranks):
    assert results_2_ranks["pp2_vpp2"]["refuses_batched_p2p"]


@pytest.mark.slow
def test_rank_exception_surfaces_in_parent():
    with pytest.raises(MultiRankError, match="boom from rank 1") as info:
        run_multirank(raise_on_rank_1, 2, timeout_s=120)
    assert info.value.rank == 1


def test_shim_refuses_cuda(monkeypatch):
    from tst_megatron.cpu import shim

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        shim.install_cpu_shim()
