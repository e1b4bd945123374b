"""The trainer's arguments for a planned layout, checked by the trainer's own `validate_args`."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass

from tst_megatron.planning.memory import USABLE_MEMORY_FRACTION
from tst_megatron.planning.step_time import DEFAULT_MFU
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args


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


def config_args(request: PlanRequest) -> tuple[argparse.Namespace, bool]:
    """The config's ``pretrain_tst.py`` args (unvalidated) with the request's overrides, and
    whether the config asks for FP8.

    Settings that change how the model runs but not its shapes or layout are neutralised, so
    that a config written for GPUs validates on the planner's CPU: the implementation (local),
    grouped GEMM (off) and FP8 (off; the time estimate uses FP8 peak FLOPs instead).
    Without a data source the config gets ``--mock-data`` (data files are not read); a
    ``--seq-length`` beyond the config's ``max-position-embeddings`` raises the latter.

    Raises:
        PlanError: the config cannot be read.
    """
    argv = ["--yaml-config", request.config]
    for flag, value in (
        ("--micro-batch-size", request.micro_batch_size),
        ("--global-batch-size", request.global_batch_size),
        ("--seq-length", request.seq_length),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if request.recompute:
        argv += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]  # fmt: skip
    if request.recompute_modules:
        argv += ["--recompute-granularity", "selective", "--recompute-modules",
                 *request.recompute_modules]  # fmt: skip
    try:
        args = parse_args(argv)
    except ConfigError as err:
        raise PlanError(str(err)) from err
    if request.fsdp:  # torch FSDP2 in place of DDP (+ distributed optimizer), its rules met
        args.use_torch_fsdp2 = True
        args.gradient_accumulation_fusion = False
        args.use_distributed_optimizer = False
        args.overlap_grad_reduce = args.overlap_param_gather = False
        args.fsdp_untied = not args.untie_embeddings_and_output_weights
        args.untie_embeddings_and_output_weights = True
    seq_length = request.seq_length
    if seq_length is not None and (args.max_position_embeddings or 0) < seq_length:
        args.max_position_embeddings = seq_length
    fp8 = args.fp8 is not None
    args.transformer_impl = "local"
    args.moe_grouped_gemm = False
    args.fp8 = None
    args.fp8_param_gather = False
    if not (args.data_path or args.train_data_path or args.mock_data):
        args.mock_data = True
    return args, fp8


def apply_layout(args: argparse.Namespace, request: PlanRequest) -> list[str]:
    """Put the requested layout into ``args``; errors about ``vpp`` that the trainer's flag
    (layers per virtual stage) cannot express."""
    args.tensor_model_parallel_size = request.tp
    args.pipeline_model_parallel_size = request.pp
    args.context_parallel_size = request.cp
    args.expert_model_parallel_size = request.ep
    args.expert_tensor_parallel_size = request.etp
    args.num_layers_per_virtual_pipeline_stage = None
    if request.vpp == 1:
        return []
    if request.pp == 1:
        return [f"--vpp {request.vpp} needs --pp > 1 (the interleaved pipeline schedule)"]
    if args.num_layers % request.pp:
        return []  # validate_args reports the layers that do not split over the stages
    per_stage = args.num_layers // request.pp
    if per_stage % request.vpp:
        return [
            f"--vpp {request.vpp} does not divide the {per_stage} layers per pipeline stage "
            f"(--num-layers {args.num_layers} / --pp {request.pp})"
        ]
    args.num_layers_per_virtual_pipeline_stage = per_stage // request.vpp
    return []


def single_gpu_layout(args: argparse.Namespace) -> None:
    """No model parallelism and the global batch left to its default (one micro-batch)."""
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.context_parallel_size = args.expert_model_parallel_size = 1
    args.expert_tensor_parallel_size = None
    args.num_layers_per_virtual_pipeline_stage = None
    args.global_batch_size = None


def validated(args: argparse.Namespace, world_size: int) -> str | None:
    """Run the trainer's `validate_args`; its error message, or None when valid."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validate_args(args, world_size)
    except ConfigError as err:
        return str(err)
    return None
