"""Memory per GPU of every pipeline stage, in each TST phase.

- weights: bf16/fp16 (2 B) or fp32 (4 B) per parameter held by the GPU (see
  `params.place_parameters` for the sharding);
- gradients: Megatron DDP's buffer, fp32 (4 B) with bf16 (which turns on fp32 accumulation);
- optimizer: Adam's two moments plus an fp32 master copy with bf16/fp16 (12 B, else 8 B; SGD
  4 or 8 B), divided by DP x CP (experts: world / (EP x ETP x PP)) with the distributed
  optimizer;
- FSDP (``--use-torch-fsdp2``; ``--use-megatron-fsdp`` by its
  ``--data-parallel-sharding-strategy``): weights, gradients and optimizer state are sharded
  over DP x CP. torch FSDP2 keeps the gradients in the weights' dtype (Megatron-Core's wrapper
  sets no fp32 reduce dtype); Megatron-FSDP keeps fp32 ones. At peak a rank also holds the
  all-gathered units (`fsdp_gathered_bytes`): the largest unit (a transformer layer, the word
  embedding or the LM head, TP-local) twice in the weights' dtype (the one running and the
  one prefetched) and its unsharded gradient before the reduce-scatter; with
  ``--torch-fsdp2-no-reshard-after-forward`` every layer stays gathered from its forward to
  its backward (all weights once, unsharded, plus one unit's gradient);
- activations of one micro-batch and layer: Korthikanti et al. (2022), generalised to GQA,
  SwiGLU and MoE, for flash/fused attention (Transformer Engine, the trainer's GPU default),
  which keeps no ``L x L`` scores - the ``5as/h`` term of ``sbh(34 + 5as/h)`` drops out as in
  Megatron-LM's own ``theoretical_memory_usage``. Per token, in bytes: norms, attention and MLP
  inputs ``8h`` (+ ``2h`` dropout masks when ``hidden-dropout > 0``), not split by TP without
  sequence parallelism; Q, K, V and the attention output ``4(q + kv)``; MLP ``4f`` (GeLU) or
  ``6f`` (SwiGLU with the bias-activation fusion on, as GPU runs have it unless
  ``--no-bias-swiglu-fusion``: mcore's fused SwiGLU keeps only the fc1 output; unfused, autograd
  also keeps ``silu(gate)`` and the up half ``x_linear + glu_linear_offset``, two more
  ``[tokens, f]``: ``10f``, measured by ``tests/test_fusions.py``), MoE
  ``topk x (2h + 6f_expert)`` (``10f_expert`` unfused) + shared experts; ``(q, kv) = (h, h)``,
  ``f = 4h`` with GeLU and dropout gives Korthikanti's ``34`` (or ``10 + 24/TP`` without SP).
  Activation recomputation as the trainer's ``--recompute-*`` flags set it
  (`recompute_setting`): full, uniform N keeps each N-layer chunk's input (``2h``) and
  recomputes one chunk at a time; full, block N keeps only the input of the first N layers of
  every (virtual) stage, the other layers keep everything (they are freed before the block is
  recomputed); selective drops what its modules rebuild in backward: ``mlp`` the dense MLP's
  ``4f``/``6f``, ``moe`` the whole MoE part, ``shared_experts`` the shared experts', ``moe_act``
  the experts' activation outputs ``topk x 2f_expert``, ``layernorm`` the two norm outputs
  ``4h``; ``core_attn`` nothing here (flash attention keeps no scores). The sequence is
  ``L / CP``. In flight: the 1F1B schedule keeps ``min(M, PP - p)`` micro-batches on stage ``p``;
  interleaved ``min(M V, 2(PP - p - 1) + (V - 1) PP + 1)`` chunk micro-batches;
- the last stage's fp32 softmax of the logits ``4 L b V / TP`` plus the LM-head inputs; with
  ``--tst-fused-output-loss`` instead one chunk's fp32 logits ``4 c V / TP``, the fp32
  output-weight gradient ``4 V h / TP`` and hidden-state gradient ``4 L b h`` it keeps for the
  backward (see `tst_megatron.loss.fused_output`);
- the batch fold (``--tst-fold batch``) keeps the tokens of a micro-batch (``L/s`` positions
  of ``s b`` samples) and, with flash attention, every term above;
- TST phase 1 (bag inputs) on the first stage: this rank's partial lookups of the ``s L b``
  tokens (in the weights' dtype, ``e`` bytes: 2 in bf16; every TP rank holds all positions of
  its vocabulary shard) and their fp32 bag mean before the reduce(-scatter),
  ``s L b h e + L b h 4`` (`TSTGPTModel.embed_bags`) - transient, but counted on top (an upper
  bound).

Every function takes validated ``pretrain_tst.py`` arguments (`validate_args` fills the
derived sizes: ``data_parallel_size``, ``world_size``, ``padded_vocab_size``...).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from tst_megatron.loss import default_chunk_tokens
from tst_megatron.planning.params import StageParams
from tst_megatron.training.arguments import requested_fusions
from tst_megatron.training.flops import moe_layer_pattern

GIB = 1024**3
# Data-sheet memory per GPU (nvidia-smi shows about this many GiB).
GPU_MEMORY_GIB: dict[str, int] = {"a100": 80, "h100": 80, "h200": 141, "b200": 180, "gb200": 186}
# Share of it a training process can fill: the CUDA context, NCCL buffers and allocator
# fragmentation take the rest.
USABLE_MEMORY_FRACTION = 0.93


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
    fsdp_gathered_bytes: int
    total_phase1_bytes: int
    total_phase2_bytes: int


def recompute_setting(args: argparse.Namespace) -> str:
    """The recomputation the trainer's flags ask for, in words (``off`` when none)."""
    if args.recompute_granularity == "full":
        layers = f"{args.recompute_num_layers} layer{'s' * (args.recompute_num_layers > 1)}"
        return f"full ({args.recompute_method}, {layers})"
    if args.recompute_granularity == "selective":
        return f"selective ({', '.join(selective_modules(args))})"
    return "off"


def selective_modules(args: argparse.Namespace) -> list[str]:
    """Modules of selective recomputation (Megatron-Core's default ``core_attn``), else []."""
    if args.recompute_granularity != "selective":
        return []
    return list(args.recompute_modules or ["core_attn"])


def layer_activation_bytes(args: argparse.Namespace, moe: bool, tokens: int) -> float:
    """Bytes one layer keeps for backward for ``tokens`` positions (see the module doc),
    less what selective recomputation rebuilds."""
    h = args.hidden_size
    q = args.kv_channels * args.num_attention_heads
    kv = args.kv_channels * args.num_query_groups
    tp = args.tensor_model_parallel_size
    # the bias-activation fusion needs only CUDA: a GPU runs it as the flags ask
    glu = (6 if requested_fusions(args).bias_activation_fusion else 10) if args.swiglu else 4
    masks = 2 if args.hidden_dropout > 0 else 0
    recomputed = set(selective_modules(args))
    norms = 4 if "layernorm" in recomputed else 8
    unsplit = tokens * h * (norms + masks)
    attention = tokens * 4 * (q + kv)
    if moe:
        shared = args.moe_shared_expert_intermediate_size or 0
        topk, expert_ffn = args.moe_router_topk, args.moe_ffn_hidden_size
        activation = 2 * expert_ffn if "moe_act" in recomputed else 0
        routed = topk * (2 * h + glu * expert_ffn - activation)
        if "shared_experts" in recomputed:
            shared = 0
        mlp = 0 if "moe" in recomputed else tokens * (routed + glu * shared)
    else:
        mlp = 0 if "mlp" in recomputed else tokens * glu * args.ffn_hidden_size
    return unsplit / sequence_split(args) + (attention + mlp) / tp


def output_loss_bytes(args: argparse.Namespace, tokens: int) -> float:
    """Bytes the output layer's loss keeps for ``tokens`` positions (see the module doc)."""
    vocab = args.padded_vocab_size / args.tensor_model_parallel_size
    if not args.tst_fused_output_loss:
        return 4 * tokens * vocab
    chunk = min(tokens, default_chunk_tokens(args.hidden_size))
    return 4 * chunk * vocab + 4 * vocab * args.hidden_size + 4 * tokens * args.hidden_size


def full_recompute_bytes(
    args: argparse.Namespace, per_layer: list[float], units: int, layers_per_unit: int, tokens: int
) -> float:
    """Activations kept with full recomputation (``--recompute-method``/``-num-layers``;
    uniform 1 when the run asks for none, the planner's ``activ(rc)`` column)."""
    full = args.recompute_granularity == "full"
    method = args.recompute_method if full else "uniform"
    num = args.recompute_num_layers if full else 1
    layer_input = 2 * tokens * args.hidden_size / sequence_split(args)
    num = min(num, layers_per_unit)
    if method == "block":
        # the micro-batch in backward has freed its other layers when it recomputes a block one
        mean_layer = sum(per_layer) / len(per_layer)
        kept = num * layer_input + (layers_per_unit - num) * mean_layer
        return (units - 1) * kept + max(kept, num * layer_input + max(per_layer))
    chunks = math.ceil(layers_per_unit / num)
    return units * chunks * layer_input + max(per_layer) * num


def recomputed_forward_fraction(args: argparse.Namespace) -> float:
    """Share of the forward pass that full recomputation runs again (selective: not modelled)."""
    if args.recompute_granularity != "full":
        return 0.0
    if args.recompute_method == "uniform":
        return 1.0
    pp = args.pipeline_model_parallel_size
    per_chunk = args.num_layers_per_virtual_pipeline_stage or args.num_layers // pp
    return min(args.recompute_num_layers, per_chunk) / per_chunk


def fsdp_sharding(args: argparse.Namespace) -> tuple[str, ...]:
    """What FSDP shards over DP x CP: () without FSDP; torch FSDP2 shards all three."""
    if getattr(args, "use_torch_fsdp2", False):
        return ("optim", "grads", "params")
    if getattr(args, "use_megatron_fsdp", False):
        strategy = args.data_parallel_sharding_strategy
        return tuple(part for part in ("optim", "grads", "params") if part in strategy)
    return ()


def sequence_split(args: argparse.Namespace) -> int:
    """How far the tensors outside the TP-split GEMMs are split (SP: by TP)."""
    return args.tensor_model_parallel_size if args.sequence_parallel else 1


def stage_memory(
    args: argparse.Namespace, stages: list[StageParams], num_microbatches: int
) -> list[StageMemory]:
    """Memory of every pipeline stage (see the module doc for the model)."""
    return [one_stage_memory(args, p, held, num_microbatches) for p, held in enumerate(stages)]


def one_stage_memory(
    args: argparse.Namespace, p: int, held: StageParams, num_microbatches: int
) -> StageMemory:
    """Memory of one GPU of pipeline stage ``p`` holding ``held`` (see the module doc).

    With ``num_microbatches=1`` the activations are those of one micro-batch.
    """
    pp = args.pipeline_model_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size or 1
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
    recompute = full_recompute_bytes(args, per_layer, units, layers_per_unit, tokens)
    logits = 0.0
    if p == pp - 1:
        lm_head_inputs = 4 * tokens * h / sequence_split(args)
        logits = output_loss_bytes(args, tokens) + lm_head_inputs
    bags = tokens * h * (weight_bytes * bag + 4) if p == 0 and bag > 1 else 0.0
    params = held.dense + held.experts
    weights = params * weight_bytes
    grads = params * grad_bytes
    optimizer = optim_bytes * (held.dense / dense_shard + held.experts / expert_shard)
    gathered = 0.0
    sharding = fsdp_sharding(args)
    if sharding:
        shard = args.data_parallel_size * args.context_parallel_size
        unit_grad_bytes = weight_bytes if args.use_torch_fsdp2 else grad_bytes
        optimizer = optim_bytes * params / shard
        if "grads" in sharding:
            grad_bytes = unit_grad_bytes
            grads = params * grad_bytes / shard
        if "params" in sharding:
            weights = params * weight_bytes / shard
            if getattr(args, "torch_fsdp2_reshard_after_forward", True):
                gathered = held.largest_unit * (2 * weight_bytes + grad_bytes)
            else:
                gathered = params * weight_bytes + held.largest_unit * grad_bytes
    kept = recompute if args.recompute_granularity == "full" else activations
    phase2 = weights + grads + optimizer + gathered + kept + logits
    return StageMemory(
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
        fsdp_gathered_bytes=round(gathered),
        total_phase1_bytes=round(phase2 + bags),
        total_phase2_bytes=round(phase2),
    )


def peak_stage_and_phase(stages: list[StageMemory], with_phase1: bool) -> tuple[StageMemory, int]:
    """The stage and TST phase with the most bytes (a tie names phase 2)."""
    phases = (2, 1) if with_phase1 else (2,)
    return max(
        ((m, phase) for m in stages for phase in phases),
        key=lambda pair: getattr(pair[0], f"total_phase{pair[1]}_bytes"),
    )
