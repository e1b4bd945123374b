"""Memory per GPU of every pipeline stage, in each TST phase.

- weights: bf16/fp16 (2 B) or fp32 (4 B) per parameter held by the GPU (see
  `params.place_parameters` for the sharding);
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
  ``6f`` (SwiGLU with the bias-activation fusion on, as GPU runs have it unless
  ``--no-bias-swiglu-fusion``: mcore's fused SwiGLU keeps only the fc1 output; unfused, autograd
  also keeps ``silu(gate)`` and the up half ``x_linear + glu_linear_offset``, two more
  ``[tokens, f]``: ``10f``, measured by ``tests/test_fusions.py``), MoE
  ``topk x (2h + 6f_expert)`` (``10f_expert`` unfused) + shared experts; ``(q, kv) = (h, h)``,
  ``f = 4h`` with GeLU and dropout gives Korthikanti's ``34`` (or ``10 + 24/TP`` without SP).
  Full recomputation stores the layer input (``2h``) and recomputes one layer at a time. The
  sequence is ``L / CP``. In flight: the 1F1B schedule keeps ``min(M, PP - p)`` micro-batches on
  stage ``p``; interleaved ``min(M V, 2(PP - p - 1) + (V - 1) PP + 1)`` chunk micro-batches;
- the last stage's fp32 softmax of the logits ``4 L b V / TP`` plus the LM-head inputs;
- TST phase 1 (bag inputs) on the first stage: the ``s L b`` token embeddings that are averaged
  into bags, bf16 before the sequence-parallel scatter and fp32 during the mean,
  ``s L b h (2 + 4 / TP)`` - transient, but counted on top (an upper bound).

Every function takes validated ``pretrain_tst.py`` arguments (`validate_args` fills the
derived sizes: ``data_parallel_size``, ``world_size``, ``padded_vocab_size``...).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from tst_megatron.planning.params import StageParams
from tst_megatron.training.flops import moe_layer_pattern
from tst_megatron.training.fusions import gpu_fusions

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
    total_phase1_bytes: int
    total_phase2_bytes: int


def layer_activation_bytes(args: argparse.Namespace, moe: bool, tokens: int) -> float:
    """Bytes one layer keeps for backward for ``tokens`` positions (see the module doc)."""
    h = args.hidden_size
    q = args.kv_channels * args.num_attention_heads
    kv = args.kv_channels * args.num_query_groups
    tp = args.tensor_model_parallel_size
    glu = (6 if gpu_fusions(args).bias_activation_fusion else 10) if args.swiglu else 4
    masks = 2 if args.hidden_dropout > 0 else 0
    unsplit = tokens * h * (8 + masks)
    attention = tokens * 4 * (q + kv)
    if moe:
        shared = args.moe_shared_expert_intermediate_size or 0
        topk = args.moe_router_topk
        mlp = tokens * (2 * topk * h + glu * (topk * args.moe_ffn_hidden_size + shared))
    else:
        mlp = tokens * glu * args.ffn_hidden_size
    return unsplit / sequence_split(args) + (attention + mlp) / tp


def sequence_split(args: argparse.Namespace) -> int:
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
        recompute = units * layers_per_unit * 2 * tokens * h / sequence_split(args)
        recompute += max(per_layer)
        logits = 0.0
        if p == pp - 1:
            lm_head_inputs = 4 * tokens * h / sequence_split(args)
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


def peak_stage_and_phase(stages: list[StageMemory], with_phase1: bool) -> tuple[StageMemory, int]:
    """The stage and TST phase with the most bytes (a tie names phase 2)."""
    phases = (2, 1) if with_phase1 else (2,)
    return max(
        ((m, phase) for m in stages for phase in phases),
        key=lambda pair: getattr(pair[0], f"total_phase{pair[1]}_bytes"),
    )
