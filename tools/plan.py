"""Cluster-layout planner for ``pretrain_tst.py``: parameters, FLOPs, data tokens, memory, time.

Usage::

    python tools/plan.py --config examples/configs/tst-3b.yaml --nodes 4 --gpus-per-node 8 \
        --gpu b200 --tp 1 --pp 1 --micro-batch-size 2 --global-batch-size 512 [--json]

Runs on a CPU in seconds at any model size: the model is built on the meta device
(`build_meta_model`), which gives exact parameter counts (cross-checked with the analytic
`total_and_active_params`). The layout is checked by the trainer's own `validate_args` (same
messages as ``pretrain_tst.py``, the interleaved schedule's micro-batch count included),
plus what only a planner can see: virtual-pipeline divisibility and memory per GPU against
the GPU's. The layout flags (``--tp --pp --vpp --cp --ep --etp``) replace the config's own.

Memory per GPU, for every pipeline stage (the peak stage is reported):

- weights: bf16/fp16 (2 B) or fp32 (4 B) per parameter held by the GPU; linear weights and the
  vocabulary are split over TP, routed experts over EP x ETP, layers over PP (VPP chunks
  included); norms, biases and the router are replicated;
- gradients: Megatron DDP's buffer, fp32 (4 B) with bf16 (which turns on fp32 accumulation);
- optimizer: Adam's two moments plus an fp32 master copy with bf16/fp16 (12 B, else 8 B; SGD
  4 or 8 B), divided by DP x CP (experts: world / (EP x ETP x PP)) with the distributed
  optimizer;
- activations of one micro-batch and layer: Korthikanti et al. (2022), generalised to GQA,
  SwiGLU and MoE, for flash/fused attention (Transformer Engine, the trainer's GPU default),
  which keeps no ``L x L`` scores - the ``5as/h`` term of ``sbh(34 + 5as/h)`` drops out as in
  Megatron-LM's own ``theoretical_memory_usage``. Per token, in bytes: norms, attention and MLP
  inputs ``8h`` (+ ``2h`` dropout masks when ``hidden-dropout > 0``), not split by TP without
  sequence parallelism; Q, K, V and the attention output ``4(q + kv)``; MLP ``4f`` (GeLU) or
  ``6f`` (SwiGLU), MoE ``topk x (2h + 6f_expert)`` + shared experts; ``(q, kv) = (h, h)``,
  ``f = 4h`` with GeLU and dropout gives Korthikanti's ``34`` (or ``10 + 24/TP`` without SP).
  Full recomputation stores the layer input (``2h``) and recomputes one layer at a time. The
  sequence is ``L / CP``. In flight: the 1F1B schedule keeps ``min(M, PP - p)`` micro-batches on
  stage ``p``; interleaved ``min(M V, 2(PP - p - 1) + (V - 1) PP + 1)`` chunk micro-batches;
- the last stage's fp32 softmax of the logits ``4 L b V / TP`` plus the LM-head inputs;
- TST phase 1 (bag inputs) on the first stage: the ``s L b`` token embeddings that are averaged
  into bags, bf16 before the sequence-parallel scatter and fp32 during the mean,
  ``s L b h (2 + 4 / TP)`` - transient, but counted on top (an upper bound).

Step time: model FLOPs (`flops_per_step`, equal in both TST phases) over ``world x peak x MFU``;
the assumed MFU applies to the hardware FLOPs, so full recomputation (one more forward) costs
4/3, and the pipeline bubble ``(PP - 1) / (V M)`` comes on top.

Exit status: 0 when the layout is accepted, 1 when it is rejected (``errors`` say why), 2 for
unusable input (unreadable config, bad flags).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tst_megatron.training.arguments import ConfigError, parse_args, validate_args  # noqa: E402
from tst_megatron.training.flops import (  # noqa: E402
    ModelShape,
    flops_per_step,
    moe_layer_pattern,
    peak_tflops_for_device,
    total_and_active_params,
)

GIB = 1024**3
# Data-sheet memory per GPU (nvidia-smi shows about this many GiB).
GPU_MEMORY_GIB: dict[str, int] = {"a100": 80, "h100": 80, "h200": 141, "b200": 180, "gb200": 186}
# Share of it a training process can fill: the CUDA context, NCCL buffers and allocator
# fragmentation take the rest.
USABLE_MEMORY_FRACTION = 0.93
DEFAULT_MFU = 0.40
RECOMPUTE_COST = 4 / 3  # full recomputation runs every forward twice: 4 passes' work for 3


class PlanError(Exception):
    """Input the planner cannot use (reported as ``error: ...``, exit status 2)."""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The planner's flags."""
    parser = argparse.ArgumentParser(
        prog="plan.py",
        description="Check a parallel layout for a pretrain_tst.py config and estimate its "
        "parameters, FLOPs, data tokens, memory per GPU and step time.",
    )
    parser.add_argument("--config", required=True, help="pretrain_tst.py YAML config.")
    parser.add_argument("--nodes", type=_positive, default=1, help="Number of nodes.")
    parser.add_argument("--gpus-per-node", type=_positive, default=8, help="GPUs per node.")
    parser.add_argument(
        "--gpu", choices=sorted(GPU_MEMORY_GIB), default="b200", help="GPU model (default b200)."
    )
    parser.add_argument("--tp", type=int, default=1, help="Tensor-parallel size.")
    parser.add_argument("--pp", type=int, default=1, help="Pipeline-parallel size.")
    parser.add_argument(
        "--vpp",
        type=_positive,
        default=1,
        help="Virtual pipeline stages per pipeline rank (> 1: interleaved 1F1B).",
    )
    parser.add_argument("--cp", type=int, default=1, help="Context-parallel size.")
    parser.add_argument("--ep", type=int, default=1, help="Expert-parallel size.")
    parser.add_argument(
        "--etp", type=int, default=None, help="Expert tensor-parallel size (default --tp)."
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=None, help="Micro-batch size (default: config)."
    )
    parser.add_argument(
        "--global-batch-size", type=int, default=None, help="Global batch (default: config)."
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="Context length L (default: config; raises a smaller max-position-embeddings).",
    )
    parser.add_argument(
        "--recompute", action="store_true", help="Full activation recomputation of every layer."
    )
    parser.add_argument(
        "--mfu",
        type=_fraction,
        default=DEFAULT_MFU,
        help=f"Assumed FLOP utilisation for the time estimate (default {DEFAULT_MFU}).",
    )
    parser.add_argument(
        "--usable-memory-fraction",
        type=_fraction,
        default=USABLE_MEMORY_FRACTION,
        help=f"Share of GPU memory training may fill (default {USABLE_MEMORY_FRACTION}).",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Trainer arguments with the planned layout
# --------------------------------------------------------------------------------------------


def config_args(opts: argparse.Namespace) -> tuple[argparse.Namespace, bool]:
    """The config's ``pretrain_tst.py`` args (unvalidated) with the planner's overrides, and
    whether the config asks for FP8.

    Settings that change how the model runs but not its shapes or layout are neutralised, so
    that a config written for GPUs validates on the planner's CPU: the implementation (local),
    grouped GEMM (off) and FP8 (off; the time estimate uses FP8 peak FLOPs instead).
    Without a data source the config gets ``--mock-data`` (data files are not read); a
    ``--seq-length`` beyond the config's ``max-position-embeddings`` raises the latter.
    """
    argv = ["--yaml-config", opts.config]
    for flag, value in (
        ("--micro-batch-size", opts.micro_batch_size),
        ("--global-batch-size", opts.global_batch_size),
        ("--seq-length", opts.seq_length),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if opts.recompute:
        argv += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]  # fmt: skip
    try:
        args = parse_args(argv)
    except ConfigError as err:
        raise PlanError(str(err)) from err
    if opts.seq_length is not None and (args.max_position_embeddings or 0) < opts.seq_length:
        args.max_position_embeddings = opts.seq_length
    fp8 = args.fp8 is not None
    args.transformer_impl = "local"
    args.moe_grouped_gemm = False
    args.fp8 = None
    args.fp8_param_gather = False
    if not (args.data_path or args.train_data_path or args.mock_data):
        args.mock_data = True
    return args, fp8


def apply_layout(args: argparse.Namespace, opts: argparse.Namespace) -> list[str]:
    """Put the planned layout into ``args``; errors about ``--vpp`` that the trainer's flag
    (layers per virtual stage) cannot express."""
    args.tensor_model_parallel_size = opts.tp
    args.pipeline_model_parallel_size = opts.pp
    args.context_parallel_size = opts.cp
    args.expert_model_parallel_size = opts.ep
    args.expert_tensor_parallel_size = opts.etp
    args.num_layers_per_virtual_pipeline_stage = None
    if opts.vpp == 1:
        return []
    if opts.pp == 1:
        return [f"--vpp {opts.vpp} needs --pp > 1 (the interleaved pipeline schedule)"]
    if args.num_layers % opts.pp:
        return []  # validate_args reports the layers that do not split over the stages
    per_stage = args.num_layers // opts.pp
    if per_stage % opts.vpp:
        return [
            f"--vpp {opts.vpp} does not divide the {per_stage} layers per pipeline stage "
            f"(--num-layers {args.num_layers} / --pp {opts.pp})"
        ]
    args.num_layers_per_virtual_pipeline_stage = per_stage // opts.vpp
    return []


def _single_gpu_layout(args: argparse.Namespace) -> None:
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


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the whole (unsharded) model."""

    total: int
    active: int
    routed_experts: int
    analytic_total: int
    analytic_active: int


def meta_parameters(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """``(name, numel, ndim)`` of every parameter of the model, built on the meta device.

    The all-to-all token dispatcher allocates a CUDA stream when built, so the meta model is
    built with the all-gather one (no parameters either way).
    """
    view = argparse.Namespace(**vars(args))
    view.moe_token_dispatcher_type = "allgather"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron.core's "Apex/TE not installed" notices
        from tst_megatron.training.model_builder import build_meta_model

        model = build_meta_model(view)
    return [(name, p.numel(), p.dim()) for name, p in model.named_parameters()]


def count_parameters(args: argparse.Namespace, named: list[tuple[str, int, int]]) -> ParamCounts:
    """Total and active parameters (active: routed experts count ``topk / num_experts``)."""
    total = sum(numel for _, numel, _ in named)
    routed = sum(numel for name, numel, _ in named if _is_routed_expert(name))
    experts = args.num_experts or 0
    inactive = routed * (experts - args.moe_router_topk) // experts if experts else 0
    analytic_total, analytic_active = total_and_active_params(ModelShape.from_args(args))
    return ParamCounts(total, total - inactive, routed, analytic_total, analytic_active)


def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


@dataclass
class StageParams:
    """Parameters one GPU of a pipeline stage holds."""

    layers: list[int] = field(default_factory=list)
    dense: float = 0.0  # outside the routed experts, after TP sharding
    experts: float = 0.0  # routed experts, after EP x ETP sharding


def layer_stage(layer: int, args: argparse.Namespace) -> int:
    """Pipeline rank that holds ``layer`` (interleaved: chunk ``c`` sits on rank ``c % PP``)."""
    pp = args.pipeline_model_parallel_size
    chunks = pp * (args.virtual_pipeline_model_parallel_size or 1)
    return (layer // (args.num_layers // chunks)) % pp


def place_parameters(
    args: argparse.Namespace, named: list[tuple[str, int, int]]
) -> list[StageParams]:
    """What one GPU of every pipeline stage holds (embedding first, LM head last)."""
    pp = args.pipeline_model_parallel_size
    tp = args.tensor_model_parallel_size
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    stages = [StageParams() for _ in range(pp)]
    for layer in range(args.num_layers):
        stages[layer_stage(layer, args)].layers.append(layer)
    for name, numel, ndim in named:
        parts = name.split(".")
        if parts[0] == "embedding":
            stage, split = 0, parts[1] == "word_embeddings"
        elif parts[0] == "output_layer":
            stage, split = pp - 1, True
        elif parts[:2] == ["decoder", "final_layernorm"]:
            stage, split = pp - 1, False
        else:  # decoder.layers.<i>....
            stage = layer_stage(int(parts[2]), args)
            split = ndim > 1 and ".mlp.router." not in name
        if _is_routed_expert(name):
            stages[stage].experts += numel / (ep * (etp if ndim > 1 else 1))
        else:
            stages[stage].dense += numel / tp if split else numel
    if not args.untie_embeddings_and_output_weights and pp > 1:
        stages[-1].dense += args.padded_vocab_size * args.hidden_size / tp  # LM-head copy
    return stages


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


@dataclass
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    stage: int
    layers: int
    params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    activations_recompute_bytes: int
    logits_bytes: int
    phase1_bag_input_bytes: int
    total_phase1_bytes: int
    total_phase2_bytes: int


def layer_activation_bytes(args: argparse.Namespace, moe: bool, tokens: int) -> float:
    """Bytes one layer keeps for backward for ``tokens`` positions (see the module doc)."""
    h = args.hidden_size
    q = args.kv_channels * args.num_attention_heads
    kv = args.kv_channels * args.num_query_groups
    tp = args.tensor_model_parallel_size
    glu = 6 if args.swiglu else 4
    masks = 2 if args.hidden_dropout > 0 else 0
    unsplit = tokens * h * (8 + masks)
    attention = tokens * 4 * (q + kv)
    if moe:
        shared = args.moe_shared_expert_intermediate_size or 0
        topk = args.moe_router_topk
        mlp = tokens * (2 * topk * h + glu * (topk * args.moe_ffn_hidden_size + shared))
    else:
        mlp = tokens * glu * args.ffn_hidden_size
    return unsplit / _sequence_split(args) + (attention + mlp) / tp


def _sequence_split(args: argparse.Namespace) -> int:
    """How far the tensors outside the TP-split GEMMs are split (SP: by TP)."""
    return args.tensor_model_parallel_size if args.sequence_parallel else 1


def stage_memory(
    args: argparse.Namespace, stages: list[StageParams], num_microbatches: int
) -> list[StageMemory]:
    """Memory of every pipeline stage (see the module doc for the model)."""
    pp = args.pipeline_model_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size or 1
    tp = args.tensor_model_parallel_size
    h = args.hidden_size
    tokens = args.seq_length // args.context_parallel_size * args.micro_batch_size
    low_precision = args.params_dtype != torch.float32
    weight_bytes = 2 if low_precision else 4
    grad_bytes = 4 if args.accumulate_allreduce_grads_in_fp32 else weight_bytes
    optim_bytes = (8 if args.optimizer == "adam" else 4) + (4 if low_precision else 0)
    dense_shard = expert_shard = 1
    if args.use_distributed_optimizer:
        dense_shard = args.data_parallel_size * args.context_parallel_size
        expert_shard = args.world_size // (
            args.expert_model_parallel_size * args.expert_tensor_parallel_size * pp
        )
    pattern = moe_layer_pattern(args.num_layers, args.moe_layer_freq)
    bag = args.tst.phase_spec(1).input_bag_size
    memories = []
    for p, held in enumerate(stages):
        per_layer = [
            layer_activation_bytes(args, bool(args.num_experts and pattern[i]), tokens)
            for i in held.layers
        ]
        if vpp > 1:
            units = min(num_microbatches * vpp, 2 * (pp - p - 1) + (vpp - 1) * pp + 1)
            layers_per_unit = args.num_layers // (pp * vpp)
        else:
            units = min(num_microbatches, pp - p)
            layers_per_unit = len(held.layers)
        mean_layer = sum(per_layer) / len(per_layer)
        activations = units * layers_per_unit * mean_layer
        recompute = units * layers_per_unit * 2 * tokens * h / _sequence_split(args)
        recompute += max(per_layer)
        logits = 0.0
        if p == pp - 1:
            lm_head_inputs = 4 * tokens * h / _sequence_split(args)
            logits = tokens * args.padded_vocab_size / tp * 4 + lm_head_inputs
        bags = bag * tokens * h * (2 + 4 / tp) if p == 0 and bag > 1 else 0.0
        params = held.dense + held.experts
        weights = params * weight_bytes
        grads = params * grad_bytes
        optimizer = optim_bytes * (held.dense / dense_shard + held.experts / expert_shard)
        kept = recompute if args.recompute_granularity == "full" else activations
        phase2 = weights + grads + optimizer + kept + logits
        memories.append(
            StageMemory(
                stage=p,
                layers=len(held.layers),
                params=round(params),
                weights_bytes=round(weights),
                grads_bytes=round(grads),
                optimizer_bytes=round(optimizer),
                activations_bytes=round(activations),
                activations_recompute_bytes=round(recompute),
                logits_bytes=round(logits),
                phase1_bag_input_bytes=round(bags),
                total_phase1_bytes=round(phase2 + bags),
                total_phase2_bytes=round(phase2),
            )
        )
    return memories


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def plan(opts: argparse.Namespace) -> dict[str, Any]:
    """The report for ``opts`` (see `build_parser`); ``report["ok"]`` says if it is accepted.

    Raises:
        PlanError: the config cannot be read or describes no model.
    """
    world = opts.nodes * opts.gpus_per_node
    args, fp8 = config_args(opts)
    requested_batch = args.global_batch_size
    errors = apply_layout(args, opts)
    layout_error = validated(args, world)
    if layout_error:
        errors.append(layout_error)
    layout_ok = not errors
    if layout_ok:
        batch = args.global_batch_size
    else:  # the layout-free numbers still come from a one-GPU view
        args, _ = config_args(opts)
        _single_gpu_layout(args)
        shape_error = validated(args, world_size=1)
        if shape_error:
            if shape_error != layout_error:
                errors.append(shape_error)
            return {"config": opts.config, "gpu": opts.gpu, "ok": False, "errors": errors}
        batch = requested_batch or args.global_batch_size
    if args.padded_vocab_size is None:
        raise PlanError(
            f"{opts.config} gives no vocab-size: the planner needs the vocabulary size "
            "(add vocab-size: N, the tokenizer's size)"
        )
    named = meta_parameters(args)
    counts = count_parameters(args, named)
    shape = ModelShape.from_args(args)
    seq = args.seq_length
    phase1, phase2 = args.tst.phase_spec(1), args.tst.phase_spec(2)
    phase1_iters = args.tst.phase1_iterations(args.train_iters)
    step_flops = flops_per_step(shape, seq, batch)
    report: dict[str, Any] = {
        "config": opts.config,
        "gpu": opts.gpu,
        "ok": False,
        "errors": errors,
        "notes": [],
        "layout": {
            "nodes": opts.nodes,
            "gpus_per_node": opts.gpus_per_node,
            "world_size": world,
            "tp": opts.tp,
            "pp": opts.pp,
            "vpp": opts.vpp,
            "cp": opts.cp,
            "ep": opts.ep,
            "etp": opts.etp or opts.tp,
            "dp": args.data_parallel_size if layout_ok else None,
            "sequence_parallel": bool(args.sequence_parallel),
            "distributed_optimizer": bool(args.use_distributed_optimizer),
            "recompute": opts.recompute,
            "micro_batch_size": args.micro_batch_size,
            "global_batch_size": batch,
            "seq_length": seq,
        },
        "tst": {
            "bag_size": args.tst.bag_size,
            "mode": args.tst.mode,
            "train_iters": args.train_iters,
            "phase1_iters": phase1_iters,
            "phase2_iters": args.train_iters - phase1_iters,
        },
        "total_params": counts.total,
        "active_params": counts.active,
        "routed_expert_params": counts.routed_experts,
        "analytic_total_params": counts.analytic_total,
        "analytic_active_params": counts.analytic_active,
        "flops_per_step_phase1": step_flops,
        "flops_per_step_phase2": step_flops,
        "model_tokens_per_step": batch * seq,
        "data_tokens_per_step_phase1": batch * phase1.data_tokens_per_sample(seq),
        "data_tokens_per_step_phase2": batch * phase2.data_tokens_per_sample(seq),
        "memory_per_gpu_bytes": None,
    }
    if (counts.total, counts.active) != (counts.analytic_total, counts.analytic_active):
        report["notes"].append(
            f"meta-model counts ({counts.total}, {counts.active}) differ from the analytic "
            f"formula ({counts.analytic_total}, {counts.analytic_active})"
        )
    if fp8:
        report["notes"].append("FP8: time at FP8 peak FLOPs; memory assumes bf16 weights")
    if layout_ok:
        _add_layout_estimates(report, args, opts, named, fp8)
    report["ok"] = not report["errors"]
    return report


def _add_layout_estimates(
    report: dict[str, Any],
    args: argparse.Namespace,
    opts: argparse.Namespace,
    named: list[tuple[str, int, int]],
    fp8: bool,
) -> None:
    """Memory per GPU, its check against the GPU, and the time estimates."""
    layout = report["layout"]
    num_micro = layout["global_batch_size"] // (args.micro_batch_size * args.data_parallel_size)
    layout["num_microbatches"] = num_micro
    stages = stage_memory(args, place_parameters(args, named), num_micro)
    phases = (2, 1) if report["tst"]["phase1_iters"] else (2,)  # a tie names phase 2
    peak_stage, peak_phase = max(
        ((m, phase) for m in stages for phase in phases),
        key=lambda pair: getattr(pair[0], f"total_phase{pair[1]}_bytes"),
    )
    peak = getattr(peak_stage, f"total_phase{peak_phase}_bytes")
    capacity = GPU_MEMORY_GIB[opts.gpu] * GIB
    budget = capacity * opts.usable_memory_fraction
    report.update(
        memory_per_gpu_bytes=peak,
        memory_peak_stage=peak_stage.stage,
        memory_peak_phase=peak_phase,
        gpu_memory_bytes=capacity,
        memory_budget_bytes=round(budget),
        fits=peak <= budget,
        memory_stages=[asdict(m) for m in stages],
    )
    if peak > budget:
        report["errors"].append(
            f"estimated peak memory {peak / GIB:.1f} GiB per GPU (pipeline stage "
            f"{peak_stage.stage}, phase {peak_phase}) exceeds the usable "
            f"{budget / GIB:.1f} GiB of one {opts.gpu} ({GPU_MEMORY_GIB[opts.gpu]} GiB x "
            f"{opts.usable_memory_fraction:g}); try {_memory_remedies(args, opts)}"
        )
    peak_tflops = peak_tflops_for_device(opts.gpu, fp8=fp8)
    world = layout["world_size"]
    compute = report["flops_per_step_phase2"] / (world * peak_tflops * 1e12 * opts.mfu)
    if opts.recompute:
        compute *= RECOMPUTE_COST
    bubble = (opts.pp - 1) / (opts.vpp * num_micro)
    step = compute * (1 + bubble)
    tst = report["tst"]
    seconds = step * tst["train_iters"]
    report.update(
        mfu=opts.mfu,
        peak_tflops_per_gpu=peak_tflops,
        pipeline_bubble=bubble,
        step_time_s=step,
        model_tokens_per_s=report["model_tokens_per_step"] / step,
        data_tokens_per_s_phase1=report["data_tokens_per_step_phase1"] / step,
        data_tokens_per_s_phase2=report["data_tokens_per_step_phase2"] / step,
        run_hours=seconds / 3600,
        run_gpu_hours=seconds * world / 3600,
        run_data_tokens=tst["phase1_iters"] * report["data_tokens_per_step_phase1"]
        + tst["phase2_iters"] * report["data_tokens_per_step_phase2"],
    )


def _memory_remedies(args: argparse.Namespace, opts: argparse.Namespace) -> str:
    remedies = ["more TP/PP" + ("/EP" if args.num_experts else "")]
    if not opts.recompute:
        remedies.append("--recompute")
    if not args.use_distributed_optimizer:
        remedies.append("use-distributed-optimizer in the config")
    if args.micro_batch_size > 1:
        remedies.append(f"a --micro-batch-size below {args.micro_batch_size}")
    return ", ".join(remedies)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"plan for {report['config']} on {report['gpu']}"]
    if "total_params" in report:
        lines += _render_model(report)
    if report.get("memory_stages"):
        lines += _render_memory(report)
        lines += _render_time(report)
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if report["ok"]:
        lines.append("layout OK")
    else:
        lines.append("layout REJECTED:")
        lines += [f"  - {error}" for error in report["errors"]]
    return "\n".join(lines)


def _render_model(report: dict[str, Any]) -> list[str]:
    lay, tst = report["layout"], report["tst"]
    dp = lay["dp"] if lay["dp"] is not None else "?"
    micro = lay.get("num_microbatches", "?")
    if tst["phase1_iters"]:
        schedule = (
            f"s={tst['bag_size']} ({tst['mode']}), phase 1 = steps 1-{tst['phase1_iters']} "
            f"of {tst['train_iters']}"
        )
    else:
        schedule = f"off (baseline), {tst['train_iters']} steps"
    agrees = (report["total_params"], report["active_params"]) == (
        report["analytic_total_params"],
        report["analytic_active_params"],
    )
    return [
        f"  layout            {lay['nodes']} node(s) x {lay['gpus_per_node']} GPUs = "
        f"{lay['world_size']}: TP {lay['tp']}, PP {lay['pp']}, VPP {lay['vpp']}, "
        f"CP {lay['cp']}, EP {lay['ep']} (ETP {lay['etp']}), DP {dp}",
        f"  batch             micro {lay['micro_batch_size']}, global {lay['global_batch_size']} "
        f"({micro} micro-batches per step), L = {lay['seq_length']}, "
        f"recompute {'full' if lay['recompute'] else 'off'}",
        f"  parameters        {_billions(report['total_params'])} total, "
        f"{_billions(report['active_params'])} active (meta model; analytic formula "
        f"{'agrees' if agrees else 'DIFFERS'})",
        f"  TST               {schedule}",
        f"  FLOPs/step        phase 1 {report['flops_per_step_phase1']:.4g}, "
        f"phase 2 {report['flops_per_step_phase2']:.4g}",
        f"  data tokens/step  phase 1 {report['data_tokens_per_step_phase1']:,}, "
        f"phase 2 {report['data_tokens_per_step_phase2']:,} "
        f"(model positions {report['model_tokens_per_step']:,})",
    ]


def _render_memory(report: dict[str, Any]) -> list[str]:
    header = ("stage", "layers", "params", "weights", "grads", "optim", "activ", "activ(rc)",
              "logits", "bags(p1)", "total")  # fmt: skip
    lines = ["  memory per GPU (GiB):", "    " + " ".join(f"{h:>9}" for h in header)]
    for m in report["memory_stages"]:
        total = max(m["total_phase1_bytes"], m["total_phase2_bytes"])
        cells = [str(m["stage"]), str(m["layers"]), _billions(m["params"])] + [
            f"{m[key] / GIB:.2f}"
            for key in ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                        "activations_recompute_bytes", "logits_bytes", "phase1_bag_input_bytes")
        ] + [f"{total / GIB:.2f}"]  # fmt: skip
        lines.append("    " + " ".join(f"{c:>9}" for c in cells))
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines.append(
        f"  peak              {report['memory_per_gpu_bytes'] / GIB:.2f} GiB (stage "
        f"{report['memory_peak_stage']}, phase {report['memory_peak_phase']}) of "
        f"{report['memory_budget_bytes'] / GIB:.2f} GiB usable: {verdict}"
    )
    return lines


def _render_time(report: dict[str, Any]) -> list[str]:
    return [
        f"  time at {report['mfu']:.0%} MFU   step {report['step_time_s']:.3f} s "
        f"(peak {report['peak_tflops_per_gpu']:g} TFLOP/s/GPU, bubble "
        f"{report['pipeline_bubble']:.1%}); tokens/s: model {report['model_tokens_per_s']:,.0f}, "
        f"data phase 1 {report['data_tokens_per_s_phase1']:,.0f}, "
        f"phase 2 {report['data_tokens_per_s_phase2']:,.0f}",
        f"  run               {report['run_hours']:.1f} h, {report['run_gpu_hours']:,.0f} "
        f"GPU-h, {report['run_data_tokens'] / 1e9:,.1f}B data tokens",
    ]


def _billions(count: float) -> str:
    return f"{count / 1e9:.3f}B"


def main(argv: list[str] | None = None) -> int:
    """Print the plan; 0 = accepted, 1 = rejected, 2 = unusable input."""
    opts = build_parser().parse_args(argv)
    try:
        report = plan(opts)
    except PlanError as err:
        print(f"plan.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if opts.json else render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
