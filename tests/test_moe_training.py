"""MoE routing / capacity flags, activation recomputation and the per-token loss, in CPU ranks.

Models are built from ``pretrain_tst.py`` flags (`parse_args` -> `validate_args` ->
`model_builder`), so each check also covers the flag's way into Megatron-Core. Two launches:

- one rank: every routing / capacity flag changes the loss or the router gradient against the
  same weights without it (or, for padding, the expert inputs); the expert-bias update equals
  the hand-computed sign rule at two rates; the fp32 router in bf16; the one-rank MoE with
  Megatron's default linear biases trains in fp32 and bf16 (issue 14's crash) and its loss and
  gradients are saved as the reference for EP=2; recomputation reruns what it says and keeps
  the gradients; the timers and the MoE metrics reach the log, the record and TensorBoard.
- two ranks: the biased MoE at EP=2 equals the one-rank reference (EP=2 takes the explicit
  expert-communication path, which the fix does not touch); ``--calculate-per-token-loss`` at
  DP=2 over four micro-batches with different mask counts equals the hand-computed
  token-weighted mean (loss and every gradient), for standard CE and the multi-hot CE of TST
  phase 1, while the default normalisation equals the mean of per-micro-batch means.
"""

from __future__ import annotations

import gc
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.support.multirank import (
    gather_full_grads,
    gather_full_params,
    load_full_params,
    run_multirank,
    run_single,
    switch_layout,
)
from tst_megatron.config import STANDARD_PHASE, PhaseSpec

SEQ, MBS, VOCAB = 16, 2, 256
FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", str(SEQ), "--swiglu", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--transformer-impl", "local",
    "--distributed-backend", "gloo", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--micro-batch-size", str(MBS), "--train-iters", "10", "--lr", "1e-3", "--mock-data",
    "--vocab-size", str(VOCAB), "--untie-embeddings-and-output-weights",
]  # fmt: skip
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall"]
NO_BIAS = ["--disable-bias-linear"]
# capacity 0.5: ceil(32 tokens * top-2 / 4 experts * 0.5) = 8 of the 16 routed on average
CAPACITY = ["--moe-expert-capacity-factor", "0.5"]
ROUTING_VARIANTS = {
    "sigmoid": ["--moe-router-score-function", "sigmoid"],
    "topk_scaling": ["--moe-router-topk-scaling-factor", "2.0"],
    "group_limited": ["--moe-router-num-groups", "2", "--moe-router-group-topk", "1"],
    "capacity_probs": CAPACITY,
    "capacity_position": [*CAPACITY, "--moe-token-drop-policy", "position"],
    "capacity_padded": [*CAPACITY, "--moe-pad-expert-input-to-capacity"],
    "allgather_padded": [
        *CAPACITY, "--moe-pad-expert-input-to-capacity", "--moe-token-dispatcher-type", "allgather"
    ],
    "sinkhorn": ["--moe-router-load-balancing-type", "sinkhorn", "--moe-router-topk", "1"],
}  # fmt: skip
LB, COEFF = "--moe-router-load-balancing-type", "--moe-aux-loss-coeff"
BALANCING_VARIANTS = {
    "aux_loss": [LB, "aux_loss", COEFF, "0.1"],
    "seq_aux_loss": [LB, "seq_aux_loss", COEFF, "0.1"],
    "global_aux_loss": [LB, "global_aux_loss", COEFF, "0.1"],
    "combined": [LB, "aux_loss", "seq_aux_loss", COEFF, "0.1", "0.01"],
    "z_loss": ["--moe-z-loss-coeff", "0.1"],
}
RECOMPUTE_VARIANTS = {
    "none": [],
    "full_uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1"],
    "full_block": ["--recompute-granularity", "full", "--recompute-method", "block",
                   "--recompute-num-layers", "1"],
    "selective": ["--recompute-activations"],
    "selective_moe": ["--recompute-activations", "--recompute-modules", "moe"],
}  # fmt: skip
ATOL = 1e-5


# ---------------------------------------------------------------------------- rank side


def _args(*extra: str, world_size: int = 1) -> Namespace:
    from tst_megatron.training.arguments import parse_args, validate_args

    args = parse_args([*FLAGS, *extra])
    validate_args(args, world_size)
    return args


def _model(args: Namespace):
    from tests.model_settings import model_of
    from tst_megatron.training.run_config import from_validated_args

    return model_of(from_validated_args(args))


def _with_weights(args: Namespace, state: dict):
    model = _model(args)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(key.endswith(("expert_bias", "_extra_state")) for key in result.missing_keys)
    return model


def _batch(seed: int = 0, dtype_ids=torch.long) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, VOCAB, (MBS, SEQ), generator=gen, dtype=dtype_ids),
        "labels": torch.randint(0, VOCAB, (MBS, SEQ), generator=gen, dtype=dtype_ids),
        "position_ids": torch.arange(SEQ).expand(MBS, -1),
    }


def _routers(model) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def _forward_backward(model, batch: dict) -> dict:
    """Mean loss, router weight gradient, tokens per expert per layer and the probs dtype."""
    seen: dict = {"counts": [], "dtype": None}

    def hook(router, inputs, outputs):
        seen["counts"].append(outputs[1].sum(dim=0).tolist())
        seen["dtype"] = str(outputs[0].dtype)

    handles = [router.register_forward_hook(hook) for router in _routers(model)]
    model.train()
    model.zero_grad()
    if hasattr(model, "zero_grad_buffer"):  # DDP accumulates into main_grad
        model.zero_grad_buffer()
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    out.float().mean().backward()
    for handle in handles:
        handle.remove()
    grads = [getattr(r.weight, "main_grad", r.weight.grad) for r in _routers(model)]
    grad = torch.cat([g.float().flatten() for g in grads])
    return {"loss": out.float().mean().item(), "router_grad": grad, **seen}


def _expert_bias_update(rate: float, state: dict) -> dict:
    """One step through DDP + `finalize_model_grads`; the bias against the sign rule."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    bias_flags = ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", str(rate)]
    args = _args(*NO_BIAS, *MOE, "--moe-router-score-function", "sigmoid", *bias_flags)
    model = _with_weights(args, state)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    result = _forward_backward(ddp, _batch())
    counts = torch.tensor(result["counts"], dtype=torch.float32)  # [layers, experts]
    expected = torch.sign(counts.mean(dim=-1, keepdim=True) - counts) * rate
    finalize_model_grads([ddp])
    bias = torch.stack([r.expert_bias.clone() for r in _routers(model)])
    moved = _forward_backward(ddp, _batch())  # the bias now shifts the top-k choice
    return {"bias": bias, "expected": expected, "loss_before": result["loss"],
            "loss_after": moved["loss"]}  # fmt: skip


def _recompute_counts(extra: list[str], state: dict) -> dict:
    """Forward calls of layers / core attention / MoE layers during one step, and gradients."""
    args = _args(*NO_BIAS, *MOE, "--moe-layer-freq", "2", *extra)  # layer 0 MoE, layer 1 dense
    model = _with_weights(args, state)
    calls = {"layer": 0, "core_attn": 0, "router": 0}

    def counter(name):
        def count(*_):
            calls[name] += 1

        return count

    for layer in model.decoder.layers:
        layer.register_forward_hook(counter("layer"))
        layer.self_attention.core_attention.register_forward_hook(counter("core_attn"))
        if hasattr(layer.mlp, "router"):  # MoE recompute reruns the layer's inner forward
            layer.mlp.router.register_forward_hook(counter("router"))
    result = _forward_backward(model, _batch())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"calls": calls, "loss": result["loss"], "grads": grads}


def _timers_and_metrics_log(tmp: str) -> dict:
    """`StepTimers` and `MetricsLogger` on one rank: printed block, JSONL and TensorBoard."""
    import io
    import json
    from contextlib import redirect_stdout

    from tst_megatron.training.metrics import MetricsLogger
    from tst_megatron.training.run_config import settings_from_flags
    from tst_megatron.training.timers import StepTimers

    settings = settings_from_flags([
        *FLAGS, *NO_BIAS, *MOE, "--moe-layer-freq", "2", "--timing-log-level", "1",
        "--timing-log-option", "max", "--metrics-jsonl", f"{tmp}/metrics.jsonl",
        "--log-interval", "2", "--tst-bag-size", "2", "--tst-phase1-iters", "1",
    ])  # fmt: skip
    timers = StepTimers(settings.logging)

    class Board:
        def __init__(self):
            self.tags = {}

        def add_scalar(self, tag, value, step):
            self.tags[tag] = value

        def flush(self):
            pass

    logger = MetricsLogger(
        settings.logging, settings.model, settings.schedule, settings.precision, phase1_iters=1
    )
    board = Board()
    logger._writers.append(("tb", board))
    logger.attach_timers(timers)
    progress = Namespace(iteration=0, consumed_samples=0, phase=1)
    stream = Namespace(consumed_tokens=0)
    out = io.StringIO()
    with redirect_stdout(out):
        for iteration, phase, imbalance in ((1, 1, [1.5]), (2, 2, [1.25])):
            for name in ("forward-backward", "optimizer", "forward-compute"):
                timers(name, log_level=1 if name != "forward-compute" else 2).start()
                timers(name).stop()
            progress.iteration, progress.phase = iteration, phase
            moe = {"load_balancing_loss": [1.1], "expert_load_max_over_mean": imbalance}
            step = {"loss": 5.0, "grad_norm": 1.0, "updated": True, "nan": False,
                    "global_batch_size": MBS, "lr": 1e-3, "moe": moe}  # fmt: skip
            spec = PhaseSpec(2, "full") if phase == 1 else STANDARD_PHASE
            logger.step(progress, spec, step, 0.1, stream, stop_at=2)
        timers("save-checkpoint", log_level=0).start()
        timers("save-checkpoint").stop()
        logger.checkpoint_time(2, "save-checkpoint")
    for _, writer in logger._writers:
        if hasattr(writer, "close"):
            writer.close()
    records = [json.loads(line) for line in Path(f"{tmp}/metrics.jsonl").read_text().splitlines()]
    return {"log": out.getvalue(), "records": records, "tags": board.tags}


def single_rank_run(out_dir: str) -> dict:
    """Everything that needs one rank (see the module docstring)."""
    results: dict = {}
    base_args = _args(*NO_BIAS, *MOE)
    base = _model(base_args)
    state = base.state_dict()
    batch = _batch()
    results["base"] = _forward_backward(base, batch)
    for name, extra in {**ROUTING_VARIANTS, **BALANCING_VARIANTS}.items():
        results[name] = _forward_backward(
            _with_weights(_args(*NO_BIAS, *MOE, *extra), state), batch
        )
    for rate in (1e-3, 4e-3):
        results[("expert_bias", rate)] = _expert_bias_update(rate, state)
    for dtype in ("fp32", "none"):  # load_state_dict casts the fp32 weights to bf16
        model = _with_weights(_args(*NO_BIAS, *MOE, "--bf16", "--moe-router-dtype", dtype), state)
        results[("router_dtype", dtype)] = _forward_backward(model, batch)
    # Megatron's default linear biases (no --disable-bias-linear): the issue-14 crash
    for precision in ([], ["--bf16"]):
        model = _model(_args(*MOE, *precision))
        results[("biased", tuple(precision))] = _forward_backward(model, batch)
    biased = _model(_args(*MOE))
    torch.save(gather_full_params([biased]), Path(out_dir) / "biased.pt")
    results["biased_reference"] = _biased_step(biased)
    recompute_state = _model(_args(*NO_BIAS, *MOE, "--moe-layer-freq", "2")).state_dict()
    for name, extra in RECOMPUTE_VARIANTS.items():
        results[("recompute", name)] = _recompute_counts(extra, recompute_state)
    results["logging"] = _timers_and_metrics_log(out_dir)
    return results


def _biased_step(model) -> dict:
    """One step of 4 micro-batches of the biased MoE through DDP and mcore's schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    batches = [_standard_batch(seed) for seed in range(4)]
    share = len(batches) // ps.get_data_parallel_world_size()
    rank = ps.get_data_parallel_rank()
    loss = _schedule(ddp, batches[rank * share : (rank + 1) * share])
    return {"loss": loss, "grads": gather_full_grads([ddp])}


def _standard_batch(seed: int, masked: int = 0) -> dict:
    """A standard next-token micro-batch; its first ``masked`` targets are masked."""
    from tst_megatron.targets import build_batch

    gen = torch.Generator().manual_seed(100 + seed)
    windows = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
    mask = torch.ones_like(windows, dtype=torch.float)
    mask.view(-1)[1 : 1 + masked] = 0
    return build_batch(windows, STANDARD_PHASE, SEQ, target_mask=mask).as_dict()


def _bag_batch(seed: int, masked: int = 0) -> dict:
    """A TST phase-1 (full, s = 2) micro-batch; ``masked`` target slots masked in a row, so
    whole latent positions and half positions lose their targets."""
    from tst_megatron.targets import build_batch

    spec = PhaseSpec(2, "full")
    gen = torch.Generator().manual_seed(200 + seed)
    windows = torch.randint(0, VOCAB, (MBS, spec.window_length(SEQ)), generator=gen)
    mask = torch.ones_like(windows, dtype=torch.float)
    mask[0, 3 : 3 + masked] = 0
    return build_batch(windows, spec, SEQ, target_mask=mask).as_dict()


def _schedule(ddp, batches: list[dict]) -> float:
    """One step through mcore's schedule with the trainer's `forward_step`; global lm loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from tst_megatron.training.loop import forward_step

    # plain backward passes earlier in this process left a 0-d aux-loss scale, which the
    # schedule's set_loss_scale cannot copy its [1] scale into (mcore moe_utils.py)
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    ddp.zero_grad_buffer()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[ddp],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    total = torch.stack([out["lm loss"].float() for out in outputs]).sum(dim=0)
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def _hand_losses(model, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per micro-batch (sum of position losses, loss positions), by hand from the logits.

    A position's loss is the mean over its unmasked targets of -log softmax(logits)[target]
    (standard CE for ``[b, L]`` labels); positions without unmasked targets carry none.
    """
    sums, counts = [], []
    for batch in batches:
        logits = model(batch["tokens"], batch["position_ids"], None).float()  # [b, L, V]
        labels, mask = batch["labels"], batch["loss_mask"]
        if labels.dim() == 2:
            labels, mask = labels.unsqueeze(-1), mask.unsqueeze(-1)
        logp = F.log_softmax(logits, dim=-1)
        per_slot = -logp.gather(-1, labels)  # [b, L, s]
        slots = mask.sum(-1)
        position_loss = (per_slot * mask).sum(-1) / slots.clamp(min=1)
        sums.append((position_loss * (slots > 0)).sum())
        counts.append((slots > 0).sum())
    return torch.stack(sums), torch.stack(counts).float()


def _per_token_case(per_token: bool, phase: PhaseSpec, make_batch) -> dict:
    """DP=2, two micro-batches per rank with masks of 0, 5, 9 and 14 targets."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    extra = ["--calculate-per-token-loss"] if per_token else []
    args = _args(*NO_BIAS, *extra, "--global-batch-size", str(4 * MBS), world_size=2)
    torch.manual_seed(7)
    model = _model(args)
    reference = _model(args)
    reference.load_state_dict(model.state_dict())
    for chunk in (model, reference):
        chunk.set_phase(phase)
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    batches = [make_batch(i, masked) for i, masked in enumerate((0, 5, 9, 14))]
    rank = ps.get_data_parallel_rank()
    loss = _schedule(ddp, batches[2 * rank : 2 * rank + 2])
    sums, counts = _hand_losses(reference, batches)
    token_weighted = sums.sum() / counts.sum()
    mean_of_means = (sums / counts).mean()
    (token_weighted if per_token else mean_of_means).backward()
    return {
        "loss": loss,
        "grads": gather_full_grads([ddp]),
        "reference_grads": {n: p.grad.clone() for n, p in reference.named_parameters()},
        "token_weighted": token_weighted.item(),
        "mean_of_means": mean_of_means.item(),
        "counts": counts.tolist(),
    }


def two_rank_run(out_dir: str) -> dict | None:
    results = {}
    for name, phase, make_batch in (
        ("standard", STANDARD_PHASE, _standard_batch),
        ("multi_hot", PhaseSpec(2, "full"), _bag_batch),
    ):
        for per_token in (True, False):
            results[(name, per_token)] = _per_token_case(per_token, phase, make_batch)
    switch_layout(ep=2)
    biased = _model(_args(*MOE, "--expert-model-parallel-size", "2", world_size=2))
    load_full_params([biased], torch.load(Path(out_dir) / "biased.pt"))
    results["biased_ep2"] = _biased_step(biased)
    return results if torch.distributed.get_rank() == 0 else None


# ---------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe_training")


@pytest.fixture(scope="module")
def single(out_dir):
    return run_single(single_rank_run, args=(str(out_dir),), timeout_s=400)


@pytest.fixture(scope="module")
def two(out_dir, single):
    return run_multirank(two_rank_run, 2, args=(str(out_dir),), timeout_s=400)[0]


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ROUTING_VARIANTS if n != "capacity_padded"])
def test_routing_and_capacity_flags_change_the_loss(single, name):
    assert math.isfinite(single[name]["loss"])
    assert abs(single[name]["loss"] - single["base"]["loss"]) > 1e-6, name


@pytest.mark.slow
def test_capacity_drops_tokens_and_padding_fills_every_expert(single):
    capacity = 8
    dropless = single["base"]["counts"]
    assert all(sum(layer) == MBS * SEQ * 2 for layer in dropless)  # top-2, nothing dropped
    for name in ("capacity_probs", "capacity_position"):
        kept = single[name]["counts"]
        assert all(max(layer) <= capacity and sum(layer) < MBS * SEQ * 2 for layer in kept)
    assert single["capacity_position"]["loss"] != single["capacity_probs"]["loss"]
    for name in ("capacity_padded", "allgather_padded"):
        assert all(layer == [capacity] * 4 for layer in single[name]["counts"]), name
        # padding slots carry zero routing weight: same loss as dropping without padding
        assert single[name]["loss"] == pytest.approx(single["capacity_probs"]["loss"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BALANCING_VARIANTS))
def test_load_balancing_losses_change_the_router_gradient(single, name):
    # an auxiliary loss leaves the LM loss alone and adds to the router's gradient
    assert single[name]["loss"] == pytest.approx(single["base"]["loss"], abs=1e-6)
    assert _differs(single[name]["router_grad"], single["base"]["router_grad"])
    if name == "combined":
        assert _differs(single[name]["router_grad"], single["aux_loss"]["router_grad"])
    if name == "seq_aux_loss":  # per sample, not over the micro-batch
        assert _differs(single[name]["router_grad"], single["aux_loss"]["router_grad"])


@pytest.mark.slow
def test_expert_bias_moves_by_the_sign_rule_and_changes_routing(single):
    for rate in (1e-3, 4e-3):
        case = single[("expert_bias", rate)]
        assert torch.equal(case["bias"], case["expected"].to(case["bias"].dtype)), rate
        assert case["bias"].abs().max().item() == pytest.approx(rate)
        assert case["loss_after"] != case["loss_before"]


@pytest.mark.slow
def test_fp32_router_in_bf16(single):
    assert single[("router_dtype", "fp32")]["dtype"] == "torch.float32"
    assert single[("router_dtype", "none")]["dtype"] == "torch.bfloat16"


@pytest.mark.slow
def test_one_rank_moe_with_linear_biases_trains(single):
    for precision in ((), ("--bf16",)):
        case = single[("biased", precision)]
        assert math.isfinite(case["loss"]) and case["router_grad"].abs().sum() > 0


@pytest.mark.slow
def test_biased_moe_at_ep2_matches_one_rank(single, two):
    ref, got = single["biased_reference"], two["biased_ep2"]
    assert got["loss"] == pytest.approx(ref["loss"], abs=ATOL)
    assert got["grads"].keys() == ref["grads"].keys()
    assert any("linear_fc2.bias" in key and "experts" in key for key in ref["grads"])
    for key, grad in ref["grads"].items():
        assert (got["grads"][key] - grad).abs().max().item() <= ATOL, key


@pytest.mark.slow
def test_recomputation_reruns_what_it_names_and_keeps_gradients(single):
    runs = {name: single[("recompute", name)] for name in RECOMPUTE_VARIANTS}
    calls = {name: run["calls"] for name, run in runs.items()}
    assert calls["none"] == {"layer": 2, "core_attn": 2, "router": 1}
    assert calls["full_uniform"] == {"layer": 4, "core_attn": 4, "router": 2}
    assert calls["full_block"] == {"layer": 3, "core_attn": 3, "router": 2}  # first layer only
    assert calls["selective"] == {"layer": 2, "core_attn": 4, "router": 1}
    assert calls["selective_moe"] == {"layer": 2, "core_attn": 2, "router": 2}
    for name, run in runs.items():
        assert run["loss"] == runs["none"]["loss"], name
        for key, grad in runs["none"]["grads"].items():
            torch.testing.assert_close(run["grads"][key], grad, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_timers_and_moe_metrics_reach_log_record_and_tensorboard(single):
    logging = single["logging"]
    log, records, tags = logging["log"], logging["records"], logging["tags"]
    assert "max time across ranks (ms):" in log
    assert "forward-backward ..." in log and "optimizer ..." in log
    assert "forward-compute" not in log  # a level-2 timer at --timing-log-level 1
    assert "save-checkpoint ..." in log
    assert "load_balancing_loss: 1.100000E+00 (per layer: 1.1)" in log
    assert "expert_load_max_over_mean: 1.375000E+00" in log  # the interval's mean
    assert "expert load max/mean (mean over MoE layers) 1.500 before the switch, 1.250 after" in log
    step = next(r for r in records if "lm_loss" in r)
    assert step["load_balancing_loss"] == pytest.approx(1.1)
    assert step["moe/expert_load_max_over_mean_layer_0"] == pytest.approx(1.375)
    assert {"time_ms/forward-backward", "time_ms/optimizer"} <= set(step)
    assert any("time_ms/save-checkpoint" in r for r in records)
    assert {"load_balancing_loss", "moe/load_balancing_loss_layer_0"} <= set(tags)
    assert not any(tag.startswith("time_ms/") for tag in tags)  # no --log-timers-to-tensorboard


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["standard", "multi_hot"])
def test_per_token_loss_equals_hand_computed_token_weighted_mean(two, kind):
    per_token, default = two[(kind, True)], two[(kind, False)]
    counts = per_token["counts"]
    assert len(set(counts)) == 4  # four different numbers of loss positions
    assert per_token["token_weighted"] != pytest.approx(per_token["mean_of_means"], abs=1e-4)
    for case in (per_token, default):
        # the logged lm loss is the token-weighted mean either way
        assert case["loss"] == pytest.approx(case["token_weighted"], abs=ATOL)
        for key, grad in case["reference_grads"].items():
            assert (case["grads"][key] - grad).abs().max().item() <= ATOL, key
    # and the flag changes the gradient
    assert any(_differs(per_token["grads"][k], default["grads"][k]) for k in per_token["grads"])


def test_manual_gc_collects_at_the_configured_points():
    from tst_megatron.settings import ReliabilityConfig
    from tst_megatron.training.manual_gc import ManualGarbageCollection

    collections = []

    def record(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(record)
    try:
        manual = ManualGarbageCollection(
            ReliabilityConfig(manual_gc=True, manual_gc_interval=3, manual_gc_eval=True)
        )
        manual.start()
        assert not gc.isenabled() and collections == [2]
        for iteration in range(1, 7):
            manual.after_step(iteration)
        assert collections == [2, 2, 2]  # iterations 3 and 6
        with manual.evaluation():
            assert collections == [2, 2, 2, 2]
        assert collections == [2, 2, 2, 2, 0]
        assert "every 3 steps, and around each evaluation" in manual.describe()
        off = ManualGarbageCollection(ReliabilityConfig(manual_gc=False))
        del collections[:]
        off.after_step(3)
        with off.evaluation():
            pass
        assert collections == []
    finally:
        gc.callbacks.remove(record)
        gc.enable()
