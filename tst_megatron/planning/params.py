"""Parameter counts from the meta-device model, and what one GPU of each pipeline stage holds.

The model comes from the trainer's own builder (`build_meta_model`), so the counts follow
whatever the builder enables; they are cross-checked with the analytic
`total_and_active_params`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from tst_megatron.settings import ModelConfig, ParallelConfig
from tst_megatron.training.flops import total_and_active_params

NamedParams = list[tuple[str, int, int]]  # (name, numel, ndim) of every parameter


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the whole (unsharded) model."""

    total: int
    active: int
    routed_experts: int
    analytic_total: int
    analytic_active: int


def meta_parameters(model: ModelConfig) -> NamedParams:
    """``(name, numel, ndim)`` of every parameter of the model, built on the meta device.

    The all-to-all token dispatcher allocates a CUDA stream when built, so the meta model is
    built with the all-gather one (no parameters either way).
    """
    if model.moe is not None:
        moe = dataclasses.replace(model.moe, moe_token_dispatcher_type="allgather")
        model = dataclasses.replace(model, moe=moe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron.core's "Apex/TE not installed" notices
        from tst_megatron.training.model_builder import build_meta_model

        meta = build_meta_model(model)
    return [(name, p.numel(), p.dim()) for name, p in meta.named_parameters()]


def count_parameters(model: ModelConfig, named: NamedParams) -> ParamCounts:
    """Total and active parameters (active: routed experts count ``topk / num_experts``)."""
    total = sum(numel for _, numel, _ in named)
    routed = sum(numel for name, numel, _ in named if is_routed_expert(name))
    inactive = 0
    if model.moe is not None:
        experts = model.moe.num_experts
        inactive = routed * (experts - model.moe.moe_router_topk) // experts
    analytic_total, analytic_active = total_and_active_params(model)
    return ParamCounts(total, total - inactive, routed, analytic_total, analytic_active)


def is_routed_expert(name: str) -> bool:
    """Whether the parameter ``name`` belongs to a routed (not shared) expert."""
    return ".mlp.experts." in name


@dataclass
class StageParams:
    """Parameters one GPU of a pipeline stage holds."""

    layers: list[int] = field(default_factory=list)
    dense: float = 0.0  # outside the routed experts, after TP sharding
    experts: float = 0.0  # routed experts, after EP x ETP sharding
    # the largest FSDP unit (a transformer layer, the word embedding or the LM head), after
    # TP/EP sharding: what FSDP all-gathers at once
    largest_unit: float = 0.0


def layer_stage(layer: int, num_layers: int, parallel: ParallelConfig) -> int:
    """Pipeline rank that holds ``layer`` of ``num_layers`` (interleaved: chunk ``c`` sits on
    rank ``c % PP``)."""
    pp = parallel.pipeline_model_parallel_size
    chunks = pp * (parallel.virtual_pipeline_model_parallel_size or 1)
    return (layer // (num_layers // chunks)) % pp


def place_parameters(
    model: ModelConfig, parallel: ParallelConfig, named: NamedParams
) -> list[StageParams]:
    """What one GPU of every pipeline stage holds (embedding first, LM head last).

    Linear weights and the vocabulary are split over TP, routed experts over EP x ETP;
    norms, biases and the router are replicated; a tied LM head is copied to the last stage.
    """
    pp = parallel.pipeline_model_parallel_size
    tp = parallel.tensor_model_parallel_size
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size
    stages = [StageParams() for _ in range(pp)]
    for layer in range(model.num_layers):
        stages[layer_stage(layer, model.num_layers, parallel)].layers.append(layer)
    units: dict[tuple[int, str], float] = {}
    for name, numel, ndim in named:
        parts = name.split(".")
        if parts[0] == "embedding":
            stage, split, unit = 0, parts[1] == "word_embeddings", "embedding"
        elif parts[0] == "output_layer":
            stage, split, unit = pp - 1, True, "output_layer"
        elif parts[:2] == ["decoder", "final_layernorm"]:
            stage, split, unit = pp - 1, False, "output_layer"
        else:  # decoder.layers.<i>....
            stage, unit = layer_stage(int(parts[2]), model.num_layers, parallel), parts[2]
            split = ndim > 1 and ".mlp.router." not in name
        if is_routed_expert(name):
            held = numel / (ep * (etp if ndim > 1 else 1))
            stages[stage].experts += held
        else:
            held = numel / tp if split else numel
            stages[stage].dense += held
        units[stage, unit] = units.get((stage, unit), 0.0) + held
    for (stage, _), held in units.items():
        stages[stage].largest_unit = max(stages[stage].largest_unit, held)
    if not model.untie_embeddings_and_output_weights and pp > 1:
        stages[-1].dense += model.vocab * model.hidden_size / tp  # LM-head copy
    return stages
