"""TST under every parallel layout equals the single-rank run (loss and every gradient).

A tiny `TSTGPTModel` (2 layers, hidden 64, GQA, RoPE, RMSNorm, SwiGLU, untied, fp32; and a
4-expert top-2 MoE) takes one training step of 4 micro-batches in each TST phase layout
(full, input-only, output-only with s = 4, and standard s = 1). The single-rank run is the
reference; each 2-rank layout (TP=2, TP=2+SP, PP=2, CP=2, DP=2, EP=2) loads the same weights
and must reproduce its loss and full gradients. The batch fold (with power-law bag weights)
runs under TP=2, TP=2+SP, PP=2 and CP=2. The fused output loss runs under TP=2 (untied),
TP=2+SP and PP=2 (tied) against the unfused single-rank run, and at one rank with
gradient-accumulation fusion (weight gradient straight into DDP's ``main_grad``).

Also: the (weighted) multi-hot CE and the fused output loss with the vocabulary split over
TP=2 (with and without SP) against naive full-vocabulary references, s = 1 against
Megatron's `vocab_parallel_cross_entropy`, the model's bag averaging against `average_bags`
(with a document token mask: against a per-bag loop over the kept tokens) and against the
former average-after-reduce-scatter path with the reduce-scatter bytes of a standard step, a
stock `GPTModel` against `TSTGPTModel` in standard mode, and the state-dict
keys.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.multirank import (
    gather_full_grads,
    gather_full_params,
    load_full_params,
    run_multirank,
    run_single,
    switch_layout,
)
from tst_megatron.config import STANDARD_PHASE, PhaseSpec, bag_weights
from tst_megatron.model import TSTGPTModel

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
    "batch-fold": PhaseSpec(4, "full", "batch", bag_weights("power-law", 4)),
}
LAYOUT_SPECS = ("full", "input-only", "output-only", "standard")
FOLD_SPECS = (*LAYOUT_SPECS, "batch-fold")
FUSED_SPECS = ("full", "standard")  # phase 1 and phase 2
DENSE, MOE, TIED = "dense", "moe", "tied"


class TiedTSTGPTModel(TSTGPTModel):
    """The tiny model with the LM head tied to the embedding."""

    def __init__(self, *args, **kwargs):
        kwargs["share_embeddings_and_output_weights"] = True
        super().__init__(*args, **kwargs)


class LearnedPositionsTSTGPTModel(TSTGPTModel):
    """The tiny model with a learned absolute position table instead of RoPE."""

    def __init__(self, *args, **kwargs):
        kwargs["position_embedding_type"] = "learned_absolute"
        super().__init__(*args, **kwargs)


# name -> (reference model, layout, fused output loss, specs)
LAYOUTS: dict[str, tuple[str, dict[str, Any], bool, tuple[str, ...]]] = {
    "tp2": (DENSE, {"tp": 2}, False, FOLD_SPECS),
    "tp2_sp": (DENSE, {"tp": 2, "sp": True}, False, FOLD_SPECS),
    "pp2": (DENSE, {"pp": 2}, False, FOLD_SPECS),
    "cp2": (DENSE, {"cp": 2}, False, FOLD_SPECS),
    "dp2": (DENSE, {}, False, LAYOUT_SPECS),
    "ep2": (MOE, {"ep": 2}, False, LAYOUT_SPECS),
    "tp2_fused": (DENSE, {"tp": 2}, True, FUSED_SPECS),
    "tp2_sp_fused_tied": (TIED, {"tp": 2, "sp": True}, True, FUSED_SPECS),
    "pp2_fused_tied": (TIED, {"pp": 2}, True, FUSED_SPECS),
}
# single-rank fused runs with gradient-accumulation fusion: name -> reference model
GRAD_ACCUM_FUSION = {"gaf_untied": DENSE, "gaf_tied": TIED}


# ---------------------------------------------------------------------------- rank side


def _build(kind: str, model_cls=None, fused: bool = False, **layout):
    """This rank's DDP-wrapped model (no virtual pipeline here)."""
    from tests.support.tiny_models import build_tiny_chunks, tiny_config

    config = tiny_config(moe=kind == MOE, **layout)
    if model_cls is None:
        model_cls = partial(TiedTSTGPTModel if kind == TIED else TSTGPTModel,
                            fused_output_loss=fused)  # fmt: skip
    chunks = build_tiny_chunks(config, model_cls, vocab=VOCAB, seq_len=LATENT, seed=3)
    return chunks[0]


def _load_weights(model, kind: str, params_dir: str) -> None:
    """The single-rank weights; a tied LM head on a later pipeline stage gets the embedding."""
    full = torch.load(Path(params_dir) / f"{kind}.pt")
    if kind == TIED:
        full["output_layer.weight"] = full["embedding.word_embeddings.weight"]
    load_full_params([model], full)


def _full_grads(model, kind: str) -> dict:
    """Every full gradient; the tied LM-head copy must carry the embedding's gradient."""
    grads = gather_full_grads([model])
    head = grads.pop("output_layer.weight", None) if kind == TIED else None
    if head is not None:  # PP > 1: DDP all-reduces it with the embedding's gradient
        diff = (head - grads["embedding.word_embeddings.weight"]).abs().max().item()
        assert diff <= ATOL, f"tied LM-head copy differs from the embedding by {diff:.3g}"
    return grads


def _microbatches(spec: PhaseSpec) -> list[dict]:
    from megatron.core import parallel_state as ps

    from tst_megatron.targets import build_batch
    from tst_megatron.training.loop import split_for_context_parallel

    gen = torch.Generator().manual_seed(11)
    window = spec.window_length(LATENT)
    rows = spec.micro_batch_rows(MICRO_BATCH)
    windows = torch.randint(0, VOCAB, (NUM_MICRO, rows, window), generator=gen)
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
        seq_length=spec.latent_length(LATENT) // _cp_size(),
        micro_batch_size=spec.micro_batch_rows(MICRO_BATCH),
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
    for kind, specs in ((DENSE, SPECS), (MOE, LAYOUT_SPECS), (TIED, FUSED_SPECS)):
        model = models[kind] = _build(kind)
        torch.save(gather_full_params([model]), Path(out_dir) / f"{kind}.pt")
        for name in specs:
            loss = _train_step(model, SPECS[name])
            results[(kind, name)] = {"loss": loss, "grads": gather_full_grads([model])}
    for name, kind in GRAD_ACCUM_FUSION.items():
        model = _build(kind, fused=True)
        _load_weights(model, kind, out_dir)
        model.module.output_layer.gradient_accumulation_fusion = True
        for spec in FUSED_SPECS:
            loss = _train_step(model, SPECS[spec])
            results[(name, spec)] = {"loss": loss, "grads": gather_full_grads([model])}
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
    for layout_name, (kind, layout, fused, specs) in LAYOUTS.items():
        switch_layout(**{k: v for k, v in layout.items() if k in ("tp", "pp", "cp", "ep")})
        model = _build(kind, fused=fused, **layout)
        _load_weights(model, kind, params_dir)
        for name in specs:
            loss = _train_step(model, SPECS[name])
            results[(layout_name, name)] = {"loss": loss, "grads": _full_grads(model, kind)}
    return results if torch.distributed.get_rank() == 0 else None


WEIGHTINGS = ("uniform", "power-law", "exponential", "first-token", "explicit")
LOSS_CASES = [(s, w) for s in (1, 4, 16) for w in WEIGHTINGS] + [(2, "uniform")]


def _loss_case(s: int, weighting: str):
    from tests.test_loss import weights_for

    gen = torch.Generator().manual_seed(s + 17 * WEIGHTINGS.index(weighting))
    logits = torch.randn(6, 3, 64, generator=gen) * 3
    targets = torch.randint(0, 64, (3, 6, s), generator=gen)
    targets[0, 0] = 33  # repeated, owned by rank 1
    mask = (torch.rand(3, 6, s, generator=gen) > 0.2).float()
    mask[2, 1] = 0
    grad_out = torch.randn(3, 6, generator=gen)
    return logits, targets, mask, grad_out, weights_for(weighting, s)


def loss_tp2_run() -> dict:
    """Multi-hot CE with the vocabulary split over TP=2 (the launch's layout)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from tst_megatron.loss import multi_hot_cross_entropy

    rank, tp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    out = {}
    for s, weighting in LOSS_CASES:
        logits, targets, mask, grad_out, weights = _loss_case(s, weighting)
        shard = logits.chunk(2, dim=-1)[rank].clone().requires_grad_()
        loss = multi_hot_cross_entropy(shard.clone(), targets, mask, tp_group, weights)
        (loss * grad_out).sum().backward()
        out[(s, weighting)] = {"loss": loss.detach(), "grad_shard": shard.grad}
        if (s, weighting) == (1, "uniform"):
            plain = shard.detach().clone().requires_grad_()
            ce = vocab_parallel_cross_entropy(plain.clone(), targets[..., 0].t().contiguous()).t()
            (ce * grad_out).sum().backward()
            unmasked = multi_hot_cross_entropy(shard.detach().clone(), targets, None, tp_group)
            out["megatron_ce"] = {"loss": ce.detach(), "unmasked": unmasked}
    out["fused"] = _fused_tp2()
    return {"rank": rank, **out}


FUSED_CASES = [(s, w, sp) for s, w in ((0, "uniform"), (4, "power-law"), (16, "uniform"))
               for sp in (False, True)]  # fmt: skip


def _fused_case(s: int, weighting: str):
    from tests.test_loss import weights_for

    gen = torch.Generator().manual_seed(100 + s)
    hidden = torch.randn(8, 2, 16, generator=gen)
    weight = torch.randn(64, 16, generator=gen) * 0.5
    shape = (2, 8) if s == 0 else (2, 8, s)
    targets = torch.randint(0, 64, shape, generator=gen)
    targets[0, 1] = 40  # owned by rank 1
    mask = (torch.rand(shape, generator=gen) > 0.2).float()
    positions = mask if s == 0 else (mask.amax(-1) > 0).float()
    return hidden, weight, targets, mask, positions * 0.25, weights_for(weighting, max(s, 1))


def _fused_tp2() -> dict:
    """The fused output loss at TP=2, hidden states full or sequence-parallel shards."""
    from megatron.core import parallel_state as ps

    from tst_megatron.loss import fused_output_multi_hot_cross_entropy

    rank, tp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    out = {}
    for s, weighting, sp in FUSED_CASES:
        hidden, weight, targets, mask, grad_out, weights = _fused_case(s, weighting)
        local = (hidden.chunk(2, dim=0)[rank] if sp else hidden).clone().requires_grad_()
        shard = weight.chunk(2, dim=0)[rank].clone().requires_grad_()
        loss = fused_output_multi_hot_cross_entropy(
            local, shard, targets, mask, tp_group, None if s == 0 else weights,
            chunk_tokens=5, sequence_parallel=sp,
        )  # fmt: skip
        (loss * grad_out).sum().backward()
        out[(s, weighting, sp)] = {
            "loss": loss.detach(),
            "hidden_grad": local.grad,
            "weight_grad": shard.grad,
        }
    return out


def sp_error_message() -> str:
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


def _average_after_reduce(model, tokens, positions, s: int) -> torch.Tensor:
    """The former bag embedding: the ``[L, b*s, h]`` rows go through the whole embedding
    (reduce-scatter included) and only then are averaged."""
    b, latent = tokens.shape[0], tokens.shape[1] // s
    rows = tokens.view(b, latent, s).transpose(1, 2).reshape(b * s, latent)
    emb = model.embedding(input_ids=rows, position_ids=positions.repeat_interleave(s, dim=0))
    return emb.view(emb.shape[0], b, s, -1).float().mean(dim=2)


class _CountBytes:
    """Bytes handed to mcore's reduce-scatter and to all-reduce while active."""

    def __enter__(self):
        from megatron.core.tensor_parallel import mappings

        self.mappings, self.bytes = mappings, {"reduce_scatter": 0, "all_reduce": 0}
        self.reduce_scatter, self.all_reduce = mappings.dist_reduce_scatter_func, (
            torch.distributed.all_reduce
        )

        def reduce_scatter(output, input_, *args, **kwargs):
            self.bytes["reduce_scatter"] += input_.numel() * input_.element_size()
            return self.reduce_scatter(output, input_, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.bytes["all_reduce"] += tensor.numel() * tensor.element_size()
            return self.all_reduce(tensor, *args, **kwargs)

        mappings.dist_reduce_scatter_func = reduce_scatter
        torch.distributed.all_reduce = all_reduce
        return self

    def __exit__(self, *exc):
        self.mappings.dist_reduce_scatter_func = self.reduce_scatter
        torch.distributed.all_reduce = self.all_reduce


def _masked_bag_mean(per_token: torch.Tensor, keep: torch.Tensor, s: int) -> torch.Tensor:
    """``[s*L, b, h]`` token embeddings -> ``[L, b, h]`` means over the kept tokens, one bag
    at a time (the document rule of ``--reset-attention-mask``)."""
    latent, b = per_token.shape[0] // s, per_token.shape[1]
    out = torch.empty(latent, b, per_token.shape[-1])
    for j in range(b):
        for i in range(latent):
            rows = [i * s + k for k in range(s) if keep[j, i * s + k]]
            out[i, j] = per_token[rows, j].mean(dim=0)
    return out


def embed_run() -> dict:
    """Model bag averaging at TP=2 (RoPE + SP, learned positions + SP, RoPE without SP):
    against `average_bags` of token embeddings, against the former average-after-reduce
    path, and the bytes each puts into the reduce(-scatter) against a standard step's."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from tst_megatron.bags import average_bags

    s = 4
    tokens = torch.randint(0, VOCAB, (2, s * LATENT), generator=torch.Generator().manual_seed(0))
    keep = torch.rand(2, s * LATENT, generator=torch.Generator().manual_seed(1)) > 0.5
    keep[:, s - 1 :: s] = True  # documents.py keeps every bag's last token (its owner)
    positions = torch.arange(LATENT).expand(2, -1)
    out = {"rank": ps.get_tensor_model_parallel_rank(), "sp_error": sp_error_message()}
    for name, model_cls, sp in (
        ("rope_sp", TSTGPTModel, True),
        ("learned_sp", LearnedPositionsTSTGPTModel, True),
        ("rope_tp", TSTGPTModel, False),
    ):
        model = _build(DENSE, model_cls=model_cls, tp=2, sp=sp).module
        gather = gather_from_sequence_parallel_region if sp else (lambda x: x)
        with torch.no_grad():
            with _CountBytes() as bagged_bytes:
                bagged = model.embed_bags(tokens, positions, s)
            with _CountBytes() as standard_bytes:
                model.embedding(tokens[:, :LATENT], positions)
            with _CountBytes() as former_bytes:
                former = _average_after_reduce(model, tokens, positions, s)
        out[name] = {
            "bagged": gather(bagged),
            "former": gather(former),
            "bytes": (bagged_bytes.bytes, standard_bytes.bytes, former_bytes.bytes),
        }
        if name == "rope_sp":  # without a position table: the bag mean of token embeddings
            with torch.no_grad():
                token_positions = torch.arange(s * LATENT).expand(2, -1)
                per_token = gather(model.embedding(tokens, token_positions))
                with _CountBytes() as masked_bytes:
                    masked = model.embed_bags(tokens, positions, s, token_mask=keep)
            out[name]["reference"] = average_bags(per_token, s)
            out[name]["masked"] = gather(masked)
            out[name]["masked_bytes"] = masked_bytes.bytes
            out[name]["masked_reference"] = _masked_bag_mean(per_token, keep, s)
    return out


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
@pytest.mark.parametrize(
    ("layout", "spec"), [(layout, spec) for layout, v in LAYOUTS.items() for spec in v[3]]
)
def test_layout_matches_single_rank(layout, spec, reference, layout_results):
    kind = LAYOUTS[layout][0]
    _assert_same(layout_results[(layout, spec)], reference[(kind, spec)])


@pytest.mark.slow
@pytest.mark.parametrize("spec", FUSED_SPECS)
@pytest.mark.parametrize("name", list(GRAD_ACCUM_FUSION))
def test_fused_output_loss_fills_ddp_main_grad_like_unfused(reference, name, spec):
    _assert_same(reference[(name, spec)], reference[(GRAD_ACCUM_FUSION[name], spec)])


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
@pytest.mark.parametrize(("s", "weighting"), LOSS_CASES)
def test_vocab_parallel_loss_matches_naive_reference(tp2_loss, s, weighting):
    from tests.test_loss import naive_multi_hot_ce

    logits, targets, mask, grad_out, weights = _loss_case(s, weighting)
    logits.requires_grad_()
    ref = naive_multi_hot_ce(logits, targets, mask, weights)
    (ref * grad_out).sum().backward()
    for rank_result in tp2_loss:
        got = rank_result[(s, weighting)]
        torch.testing.assert_close(got["loss"], ref.detach(), atol=1e-5, rtol=1e-5)
        shard = logits.grad.chunk(2, dim=-1)[rank_result["rank"]]
        torch.testing.assert_close(got["grad_shard"], shard, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("s", "weighting", "sp"), FUSED_CASES)
def test_fused_output_loss_tp2_matches_unfused(tp2_loss, s, weighting, sp):
    from tests.test_loss import _unfused

    hidden, weight, targets, mask, grad_out, weights = _fused_case(s, weighting)
    hidden.requires_grad_()
    weight.requires_grad_()
    ref = _unfused(hidden, weight, targets, mask, None if s == 0 else weights)
    (ref * grad_out).sum().backward()
    for rank_result in tp2_loss:
        got, rank = rank_result["fused"][(s, weighting, sp)], rank_result["rank"]
        hidden_grad = hidden.grad.chunk(2, dim=0)[rank] if sp else hidden.grad
        torch.testing.assert_close(got["loss"], ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["hidden_grad"], hidden_grad, atol=1e-5, rtol=1e-5)
        weight_grad = weight.grad.chunk(2, dim=0)[rank]
        torch.testing.assert_close(got["weight_grad"], weight_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_s1_equals_megatron_vocab_parallel_cross_entropy(tp2_loss):
    for rank_result in tp2_loss:
        ce = rank_result["megatron_ce"]
        torch.testing.assert_close(ce["unmasked"], ce["loss"], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_bag_embedding_is_exact_with_one_times_the_communication():
    results = run_multirank(embed_run, 2, tp=2, timeout_s=180)
    for r in results:
        assert "7 latent positions" in r["sp_error"] and "tensor-parallel size 2" in r["sp_error"]
        rope = r["rope_sp"]
        torch.testing.assert_close(rope["bagged"], rope["reference"], atol=1e-6, rtol=1e-6)
        # document masking (bag_token_mask): the kept tokens' mean, still 1x communication
        torch.testing.assert_close(rope["masked"], rope["masked_reference"], atol=1e-6,
                                   rtol=1e-6)  # fmt: skip
        assert not torch.allclose(rope["masked"], rope["bagged"])
        assert rope["masked_bytes"] == rope["bytes"][1]
        for name in ("rope_sp", "learned_sp", "rope_tp"):
            case = r[name]
            torch.testing.assert_close(case["bagged"], case["former"], atol=1e-6, rtol=1e-6)
            bagged, standard, former = case["bytes"]
            assert bagged == standard, (name, bagged, standard)
            assert sum(standard.values()) > 0
            assert sum(former.values()) == 4 * sum(standard.values())  # s times the bytes
        assert r["rope_sp"]["bytes"][0]["reduce_scatter"] == 2 * LATENT * 64 * 4  # [L, b, h]
