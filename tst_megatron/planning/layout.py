"""The trainer's flag values for a planned layout: the config's own, with the request's layout.

The values are what ``--yaml-config`` gives ``pretrain_tst.py`` (``{dest: value}``), with the
request's layout, batch, sequence length, recomputation and FSDP in place of the config's, as
if the config said so; the entry point resolves them with the trainer's own path
(`tst_megatron.training.run_config.resolve`, for the planned GPU's `Environment`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tst_megatron.planning.memory import USABLE_MEMORY_FRACTION
from tst_megatron.planning.step_time import DEFAULT_MFU
from tst_megatron.training.arguments import ConfigError, build_parser, load_yaml_defaults


class PlanError(Exception):
    """Input the planner cannot use (``tools/plan.py`` reports it as ``error: ...``, exit 2)."""


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: a config, a cluster and a layout (the flags of ``tools/plan.py``).

    ``etp`` None means ``tp``; ``micro_batch_size``, ``global_batch_size`` and ``seq_length``
    None keep the config's. ``recompute`` (full, uniform, one layer per chunk) and
    ``recompute_modules`` (selective) replace the config's recomputation; without them the
    config's own ``recompute-*`` keys apply. ``fsdp`` plans torch FSDP2
    (``--use-torch-fsdp2``) instead of the config's DDP / distributed optimizer, with untied
    embeddings if the config ties them (FSDP2 requires it).
    """

    config: str
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "b200"
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    seq_length: int | None = None
    recompute: bool = False
    recompute_modules: tuple[str, ...] = ()
    fsdp: bool = False
    mfu: float = DEFAULT_MFU
    usable_memory_fraction: float = USABLE_MEMORY_FRACTION

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class PlannedFlags:
    """The trainer's flag values (``{dest: value}``) for ``world_size`` ranks.

    ``errors``: what the trainer's flags cannot express (``--vpp`` that does not divide the
    layers of a stage); ``notes``: what the planner changed beyond the request's layout.
    """

    values: dict[str, Any]
    world_size: int
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def global_batch_size(self) -> int | None:
        """The global batch the config or the request gives (None: the trainer's default)."""
        return self.values.get("global_batch_size")


def config_values(request: PlanRequest) -> PlannedFlags:
    """The config's flag values with the request's batch, sequence length, recomputation and
    FSDP, on one GPU (no model parallelism).

    Without a data source the config gets ``--mock-data`` (data files are not read); a
    ``--seq-length`` beyond the config's ``max-position-embeddings`` raises the latter.

    Raises:
        PlanError: the config cannot be read.
    """
    try:
        values = load_yaml_defaults(build_parser(), request.config)
    except ConfigError as err:
        raise PlanError(str(err)) from err
    notes = []
    for dest, value in (
        ("micro_batch_size", request.micro_batch_size),
        ("global_batch_size", request.global_batch_size),
        ("seq_length", request.seq_length),
    ):
        if value is not None:
            values[dest] = value
    if request.recompute:
        values.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)  # fmt: skip
    if request.recompute_modules:
        values.update(recompute_granularity="selective",
                      recompute_modules=list(request.recompute_modules))  # fmt: skip
    if request.fsdp:  # torch FSDP2 in place of DDP (+ distributed optimizer), its rules met
        if not values.get("untie_embeddings_and_output_weights"):
            notes.append(
                "FSDP2 needs untied embeddings: planned with a separate LM head (the config ties)"
            )
        values.update(use_torch_fsdp2=True, gradient_accumulation_fusion=False,
                      use_distributed_optimizer=False, overlap_grad_reduce=False,
                      overlap_param_gather=False,
                      untie_embeddings_and_output_weights=True)  # fmt: skip
    seq_length = request.seq_length
    if seq_length is not None and (values.get("max_position_embeddings") or 0) < seq_length:
        values["max_position_embeddings"] = seq_length
    if not any(values.get(dest) for dest in ("data_path", "train_data_path", "mock_data")):
        values["mock_data"] = True
    return PlannedFlags(values, world_size=1, notes=notes)


def planned_flags(request: PlanRequest) -> PlannedFlags:
    """`config_values` with the requested layout on ``request.world_size`` ranks, and errors
    about ``vpp`` that the trainer's flag (layers per virtual stage) cannot express."""
    base = config_values(request)
    errors, per_virtual_stage = vpp_layers(request, base.values.get("num_layers"))
    values = {
        **base.values,
        "tensor_model_parallel_size": request.tp,
        "pipeline_model_parallel_size": request.pp,
        "context_parallel_size": request.cp,
        "expert_model_parallel_size": request.ep,
        "expert_tensor_parallel_size": request.etp,
        "num_layers_per_virtual_pipeline_stage": per_virtual_stage,
    }
    return PlannedFlags(values, request.world_size, errors, base.notes)


def vpp_layers(request: PlanRequest, num_layers: int | None) -> tuple[list[str], int | None]:
    """``--num-layers-per-virtual-pipeline-stage`` for ``request.vpp`` (None without
    interleaving), or the error why it cannot be (layers that do not split over the pipeline
    stages are left to `validate_args`)."""
    if request.vpp == 1:
        return [], None
    if request.pp == 1:
        return [f"--vpp {request.vpp} needs --pp > 1 (the interleaved pipeline schedule)"], None
    if not num_layers or num_layers % request.pp:
        return [], None
    per_stage = num_layers // request.pp
    if per_stage % request.vpp:
        return [
            f"--vpp {request.vpp} does not divide the {per_stage} layers per pipeline stage "
            f"(--num-layers {num_layers} / --pp {request.pp})"
        ], None
    return [], per_stage // request.vpp


def single_gpu_flags(request: PlanRequest) -> PlannedFlags:
    """`config_values` on one GPU with the global batch left to its default (one
    micro-batch): the layout-free view of a rejected layout."""
    base = config_values(request)
    return PlannedFlags({**base.values, "global_batch_size": None}, 1, notes=base.notes)
