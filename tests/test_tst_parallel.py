"""TST under every parallel layout equals the single-rank run (loss and every gradient).

A tiny `TSTGPTModel` (2 layers, hidden 64, GQA, RoPE, RMSNorm, SwiGLU, untied, fp32; and a
4-expert top-2 MoE) takes one training step of 4 micro-batches in each TST phase layout
(full, input-only, output-only with s = 4, and standard s = 1). The single-rank run is the
reference; each 2-rank layout (TP=2, TP=2+SP, PP=2, CP=2, DP=2, EP=2) loads the same weights
and must reproduce its loss and full gradients. Also: the multi-hot CE with the vocabulary
split over TP=2 against a naive full-vocabulary reference, s = 1 against Megatron's
`vocab_parallel_cross_entropy`, the model's bag averaging against `average_bags`, a stock
`GPTModel` against `TSTGPTModel` in standard mode, and the state-dict keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tst_megatron.config import STANDARD_PHASE, PhaseSpec
from tst_megatron.testing.multirank import (
    gather_full_grads,
    gather_full_params,
    load_full_params,
    run_multirank,
    run_single,
    switch_layout,
)

LATENT = 16
MICRO_BATCH = 2
NUM_MICRO = 4
VOCAB = 1024
ATOL = 1e-5  # fp32; reductions in another order differ by ~1e-7 here
SPECS = {
    "full": PhaseSpec(4, "full"),
    "input-only": PhaseSpec(4, "input-only"),
    "output-only": PhaseSpec(4, "output-only"),
    "standard": STANDARD_PHASE,
}
DENSE, MOE = "dense", "moe"
LAYOUTS: dict[str, tuple[str, dict[str, Any]]] = {
    "tp2": (DENSE, {"tp": 2}),
    "tp2_sp": (DENSE, {"tp": 2, "sp": True}),
    "pp2": (DENSE, {"pp": 2}),
    "cp2": (DENSE, {"cp": 2}),
    "dp2": (DENSE, {}),
    "ep2": (MOE, {"ep": 2}),
}


# ---------------------------------------------------------------------------- rank side


def _build(kind: str, model_cls=None, **layout):
    """This rank's DDP-wrapped model (no virtual pipeline here)."""
    from tst_megatron.model import TSTGPTModel
    from tst_megatron.testing.tiny_models import build_tiny_chunks, tiny_config

    config = tiny_config(moe=kind == MOE, **layout)
    chunks = build_tiny_chunks(
        config, model_cls or TSTGPTModel, vocab=VOCAB, seq_len=LATENT, seed=3
    )
    return chunks[0]


def _microbatches(spec: PhaseSpec) -> list[dict]:
    from megatron.core import parallel_state as ps

    from tst_megatron.targets import build_batch
    from tst_megatron.training.loop import split_for_context_parallel

    gen = torch.Generator().manual_seed(11)
    window = spec.window_length(LATENT)
    windows = torch.randint(0, VOCAB, (NUM_MICRO, MICRO_BATCH, window), generator=gen)
    windows[0, 0, 5:9] = 7  # repeated tokens inside a bag / target bag
    mask = torch.ones_like(windows, dtype=torch.float)
    mask[1, 1, 20:23] = 0  # some masked targets
    batches = [
        split_for_context_parallel(
            build_batch(w, spec, LATENT, target_mask=m).as_dict(), spec.input_bag_size
        )
        for w, m in zip(windows, mask, strict=True)
    ]
    share = NUM_MICRO // ps.get_data_parallel_world_size()
    rank = ps.get_data_parallel_rank()
    return batches[rank * share : (rank + 1) * share]


def _train_step(ddp_model, spec: PhaseSpec) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tst_megatron.training.loop import forward_step

    ddp_model.module.set_phase(spec) if hasattr(ddp_model.module, "set_phase") else None
    ddp_model.zero_grad_buffer()
    batches = _microbatches(spec)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[ddp_model],
        num_microbatches=len(batches),
        seq_length=LATENT // _cp_size(),
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    total = torch.zeros(2)
    for out in outputs:
        total += out["lm loss"]
    torch.distributed.all_reduce(total)  # last-stage ranks hold sums over their shares
    return (total[0] / total[1]).item()


def _cp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_world_size()


def reference_run(out_dir: str) -> dict:
    """One rank: initial weights saved; loss and gradients for every (model, spec)."""
    from megatron.core.models.gpt import GPTModel

    results = {}
    models = {}
    for kind in (DENSE, MOE):
        model = models[kind] = _build(kind)
        torch.save(gather_full_params([model]), Path(out_dir) / f"{kind}.pt")
        for name, spec in SPECS.items():
            loss = _train_step(model, spec)
            results[(kind, name)] = {"loss": loss, "grads": gather_full_grads([model])}
    # a stock GPTModel with the same weights, standard training: bit-for-bit equal
    stock = _build(DENSE, model_cls=GPTModel)
    load_full_params([stock], torch.load(Path(out_dir) / f"{DENSE}.pt"))
    results["stock_loss"] = _train_step(stock, STANDARD_PHASE)
    results["stock_grads"] = gather_full_grads([stock])
    results["keys"] = (
        sorted(models[DENSE].module.state_dict()),
        sorted(stock.module.state_dict()),
    )
    return results


def layouts_run(params_dir: str) -> dict | None:
    results = {}
    for layout_name, (kind, layout) in LAYOUTS.items():
        switch_layout(**{k: v for k, v in layout.items() if k in ("tp", "pp", "cp", "ep")})
        model = _build(kind, **layout)
        load_full_params([model], torch.load(Path(params_dir) / f"{kind}.pt"))
        for name, spec in SPECS.items():
            loss = _train_step(model, spec)
            results[(layout_name, name)] = {"loss": loss, "grads": gather_full_grads([model])}
    return results if torch.distributed.get_rank() == 0 else None


def loss_tp2_run() -> dict:
    """Multi-hot CE with the vocabulary split over TP=2 (the launch's layout)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from tst_megatron.loss import multi_hot_cross_entropy

    rank, tp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    out = {}
    for s in (1, 2, 4, 16):
        gen = torch.Generator().manual_seed(s)
        logits = torch.randn(6, 3, 64, generator=gen) * 3
        targets = torch.randint(0, 64, (3, 6, s), generator=gen)
        targets[0, 0] = 33  # repeated, owned by rank 1
        mask = (torch.rand(3, 6, s, generator=gen) > 0.2).float()
        mask[2, 1] = 0
        grad_out = torch.randn(3, 6, generator=gen)
        shard = logits.chunk(2, dim=-1)[rank].clone().requires_grad_()
        loss = multi_hot_cross_entropy(shard.clone(), targets, mask, tp_group)
        (loss * grad_out).sum().backward()
        out[s] = {
            "logits": logits,
            "targets": targets,
            "mask": mask,
            "grad_out": grad_out,
            "loss": loss.detach(),
            "grad_shard": shard.grad,
        }
        if s == 1:
            plain = shard.detach().clone().requires_grad_()
            ce = vocab_parallel_cross_entropy(plain.clone(), targets[..., 0].t().contiguous()).t()
            (ce * grad_out).sum().backward()
            unmasked = multi_hot_cross_entropy(shard.detach().clone(), targets, None, tp_group)
            out["megatron_ce"] = {"loss": ce.detach(), "unmasked": unmasked}
    return {"rank": rank, **out}


def sp_error_run() -> str:
    """Sequence parallel with a latent length not divisible by TP is rejected clearly."""
    from tst_megatron.config import TSTConfigError

    model = _build(DENSE, tp=2, sp=True).module
    model.set_phase(PhaseSpec(4, "full"))
    tokens = torch.zeros(1, 4 * 7, dtype=torch.long)
    try:
        model(tokens, torch.arange(7).unsqueeze(0), None)
    except TSTConfigError as err:
        return str(err)
    return "no error"


def embed_run() -> dict:
    """Model bag averaging (TP=2 + SP, gathered) vs `average_bags` of token embeddings."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from tst_megatron.bags import average_bags

    model = _build(DENSE, tp=2, sp=True).module
    tokens = torch.randint(0, VOCAB, (2, 4 * LATENT), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(LATENT).expand(2, -1)
    with torch.no_grad():
        bagged = gather_from_sequence_parallel_region(model.embed_bags(tokens, positions, 4))
        token_positions = torch.arange(4 * LATENT).expand(2, -1)
        per_token = gather_from_sequence_parallel_region(model.embedding(tokens, token_positions))
    return {
        "rank": ps.get_tensor_model_parallel_rank(),
        "bagged": bagged,
        "reference": average_bags(per_token, 4),
    }


# ---------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tst_parallel")


@pytest.fixture(scope="module")
def reference(params_dir):
    return run_single(reference_run, args=(str(params_dir),), timeout_s=240)


@pytest.fixture(scope="module")
def layout_results(params_dir, reference):
    return run_multirank(layouts_run, 2, args=(str(params_dir),), timeout_s=480)[0]


def _assert_same(got: dict, ref: dict, atol: float = ATOL) -> None:
    assert got["loss"] == pytest.approx(ref["loss"], abs=atol)
    assert got["grads"].keys() == ref["grads"].keys()
    diffs = {k: (got["grads"][k] - g).abs().max().item() for k, g in ref["grads"].items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= atol, f"{worst}: gradient differs by {diffs[worst]:.3g}"
    assert max(g.abs().max().item() for g in ref["grads"].values()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(layout, spec, reference, layout_results):
    kind = LAYOUTS[layout][0]
    _assert_same(layout_results[(layout, spec)], reference[(kind, spec)])


@pytest.mark.slow
def test_phases_differ_and_standard_equals_stock_gpt_model(reference):
    losses = {name: reference[(DENSE, name)]["loss"] for name in SPECS}
    assert len({round(v, 6) for v in losses.values()}) == len(SPECS)  # the modes really differ
    assert reference["stock_loss"] == reference[(DENSE, "standard")]["loss"]
    for key, grad in reference["stock_grads"].items():
        assert torch.equal(grad, reference[(DENSE, "standard")]["grads"][key]), key
    tst_keys, stock_keys = reference["keys"]
    assert tst_keys == stock_keys


@pytest.fixture(scope="module")
def tp2_loss():
    return run_multirank(loss_tp2_run, 2, tp=2, timeout_s=120)


@pytest.mark.slow
@pytest.mark.parametrize("s", [1, 2, 4, 16])
def test_vocab_parallel_loss_matches_naive_reference(tp2_loss, s):
    from tests.test_loss import naive_multi_hot_ce

    case = tp2_loss[0][s]
    logits = case["logits"].clone().requires_grad_()
    ref = naive_multi_hot_ce(logits, case["targets"], case["mask"])
    (ref * case["grad_out"]).sum().backward()
    for rank_result in tp2_loss:
        got = rank_result[s]
        torch.testing.assert_close(got["loss"], ref.detach(), atol=1e-5, rtol=1e-5)
        shard = logits.grad.chunk(2, dim=-1)[rank_result["rank"]]
        torch.testing.assert_close(got["grad_shard"], shard, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_s1_equals_megatron_vocab_parallel_cross_entropy(tp2_loss):
    for rank_result in tp2_loss:
        ce = rank_result["megatron_ce"]
        torch.testing.assert_close(ce["unmasked"], ce["loss"], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_bag_averaging_under_sequence_parallel_and_sp_error():
    results = run_multirank(embed_run, 2, tp=2, timeout_s=120)
    for r in results:
        torch.testing.assert_close(r["bagged"], r["reference"], atol=1e-6, rtol=1e-6)
    message = run_multirank(sp_error_run, 2, tp=2, timeout_s=120)[0]
    assert "7 latent positions" in message and "tensor-parallel size 2" in message
