"""Model FLOPs per step, analytic parameter counts, and MFU.

`flops_per_step` is Megatron-LM's ``num_floating_point_operations`` (training.py, core_v0.16)
for a GPT/MoE decoder with a fixed-length causal batch, plus the MoE router GEMM that
Megatron-LM leaves out (``6*h*E`` per token and MoE layer, well under 1% of a layer):

- every GEMM runs three times (forward, data gradient, weight gradient) at 2 FLOPs per
  multiply-add: ``6 * tokens * fan_in * fan_out``;
- attention: QKV and output projections with ``num_query_groups`` key/value heads, plus the
  causal core ``Q K^T`` and ``softmax V`` (half of the ``L x L`` scores);
- MLP: two matrices, three with SwiGLU; MoE layers count the ``topk`` routed experts and the
  shared experts (the active ones), every ``moe_layer_freq``-th layer;
- the LM head's ``h x V`` GEMM (tied or not, the FLOPs are the same); embedding lookups,
  norms, softmax and the loss are not counted.

TST phase 1 costs the same FLOPs per step as a baseline step at context ``L``: the decoder and
LM head see ``L`` latent positions. Bag averaging is an embedding lookup of ``s*L`` tokens plus
a mean (``O(s*L*h)`` adds, negligible), and the multi-hot loss shares one logsumexp and gathers
``s`` logits per position (``O(s)``, like CE's one gather), so neither is counted. Only the
data consumed changes: ``s`` times more tokens per step (see `tst_megatron.config.PhaseSpec`).
With ``--tst-fold batch`` a phase-1 step runs ``s*b`` samples of ``L/s`` latent positions: the
same GEMM FLOPs, ``s`` times fewer causal-attention FLOPs (`phase_flops_per_step`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

# Dense (non-sparse) BF16 tensor-core peak TFLOP/s per GPU, from NVIDIA's data sheets. Matched
# as lowercase substrings of `torch.cuda.get_device_name()` in this order (specific first:
# "gb200" contains "b200", "gh200" and "h200 nvl" contain "h200").
PEAK_TFLOPS_BF16: dict[str, float] = {
    "gb200": 2500.0,
    "b200": 2250.0,  # HGX B200
    "gh200": 989.0,  # Grace Hopper: an H100-class GPU
    "h200 nvl": 835.0,
    "h200": 989.0,  # SXM
    "h100 pcie": 756.0,
    "h100 nvl": 835.0,
    "h100": 989.0,  # SXM
    "a100": 312.0,
}
# Dense FP8 over dense BF16 tensor-core peak on Hopper and Blackwell (for time estimates only:
# MFU is reported against the BF16 peak, see `current_device_peak_tflops`).
FP8_SPEEDUP = 2.0


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP and parameter formulas need to know about a GPT/MoE model (TP=PP=1 view).

    ``vocab`` is the padded vocabulary; ``position_table`` the rows of a learned absolute
    position embedding (0 for RoPE / none).
    """

    num_layers: int
    hidden: int
    ffn_hidden: int
    heads: int
    query_groups: int
    kv_channels: int
    vocab: int
    swiglu: bool = False
    num_experts: int | None = None
    topk: int = 2
    moe_ffn_hidden: int | None = None
    shared_expert_ffn: int = 0
    moe_layer_freq: int = 1
    untied: bool = False
    qk_layernorm: bool = False
    normalization: str = "LayerNorm"
    add_bias_linear: bool = True
    position_table: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelShape:
        """Shape of the model that validated ``pretrain_tst.py`` args describe."""
        if args.padded_vocab_size is None:
            raise ValueError("args.padded_vocab_size is not set yet (set it from the tokenizer)")
        learned = args.position_embedding_type == "learned_absolute"
        return cls(
            num_layers=args.num_layers,
            hidden=args.hidden_size,
            ffn_hidden=args.ffn_hidden_size,
            heads=args.num_attention_heads,
            query_groups=args.num_query_groups,
            kv_channels=args.kv_channels,
            vocab=args.padded_vocab_size,
            swiglu=args.swiglu,
            num_experts=args.num_experts,
            topk=args.moe_router_topk,
            moe_ffn_hidden=args.moe_ffn_hidden_size,
            shared_expert_ffn=args.moe_shared_expert_intermediate_size or 0,
            moe_layer_freq=args.moe_layer_freq,
            untied=args.untie_embeddings_and_output_weights,
            qk_layernorm=args.qk_layernorm,
            normalization=args.normalization,
            add_bias_linear=args.add_bias_linear,
            position_table=args.max_position_embeddings if learned else 0,
        )

    @property
    def num_moe_layers(self) -> int:
        """Layers whose MLP is an MoE layer."""
        if self.num_experts is None:
            return 0
        return sum(moe_layer_pattern(self.num_layers, self.moe_layer_freq))

    @property
    def num_dense_layers(self) -> int:
        """Layers with a dense MLP."""
        return self.num_layers - self.num_moe_layers

    @property
    def expert_ffn(self) -> int:
        """Hidden size of one routed expert."""
        return self.moe_ffn_hidden or self.ffn_hidden


def moe_layer_pattern(num_layers: int, moe_layer_freq: int) -> list[int]:
    """Megatron-Core's layer pattern: 1 = MoE layer, 0 = dense; layer i is MoE if i % freq == 0."""
    return [1 if i % moe_layer_freq == 0 else 0 for i in range(num_layers)]


def flops_per_step(shape: ModelShape, seq_length: int, batch_size: int) -> int:
    """Training FLOPs (forward + backward) of one step of ``batch_size`` samples of length L."""
    h = shape.hidden
    gemms = 3 if shape.swiglu else 2
    query = shape.kv_channels * shape.heads
    key_value = shape.kv_channels * shape.query_groups
    mlp = (
        shape.ffn_hidden * gemms * shape.num_dense_layers
        + (shape.expert_ffn * shape.topk + shape.shared_expert_ffn) * gemms * shape.num_moe_layers
    )
    router = (shape.num_experts or 0) * shape.num_moe_layers
    attention_projections = (h * (query + 2 * key_value) + query * h) * shape.num_layers
    per_token = 6 * (h * (mlp + router) + attention_projections + h * shape.vocab)
    causal_core = 6 * query * shape.num_layers  # 2 GEMMs x half the scores x 3 passes x 2
    tokens = batch_size * seq_length
    return tokens * per_token + batch_size * seq_length**2 * causal_core


def phase_flops_per_step(shape: ModelShape, spec, seq_length: int, batch_size: int) -> int:
    """`flops_per_step` of a step of ``spec`` (a `tst_megatron.config.PhaseSpec`).

    The batch fold runs ``s * batch_size`` samples of ``L/s`` latent positions: the same
    GEMM FLOPs as ``batch_size`` samples of ``L``, and ``s`` times fewer attention FLOPs.
    """
    return flops_per_step(
        shape, spec.latent_length(seq_length), spec.micro_batch_rows(batch_size)
    )


def flops_per_token(shape: ModelShape, seq_length: int) -> float:
    """Training FLOPs per model position at context ``seq_length``."""
    return flops_per_step(shape, seq_length, 1) / seq_length


def total_and_active_params(shape: ModelShape) -> tuple[int, int]:
    """(all parameters, parameters one token uses) of the unsharded model.

    Active counts ``topk`` routed experts per MoE layer and everything else (embeddings, LM
    head, attention, norms, router, shared experts).
    """
    h = shape.hidden
    norm_h = _norm_params(shape, h)
    glu = 2 if shape.swiglu else 1
    query = shape.kv_channels * shape.heads
    qkv = query + 2 * shape.kv_channels * shape.query_groups
    bias = int(shape.add_bias_linear)

    attention = norm_h + h * qkv + query * h + bias * (qkv + h)
    if shape.qk_layernorm:
        attention += 2 * _norm_params(shape, shape.kv_channels)
    dense_mlp = norm_h + _mlp_params(h, shape.ffn_hidden, glu, bias)
    expert = _mlp_params(h, shape.expert_ffn, glu, bias)
    experts = shape.num_experts or 0
    moe_shared = (
        norm_h
        + experts * h
        + bias * experts  # router
        + _mlp_params(h, shape.shared_expert_ffn, glu, bias=0)
    )
    embeddings = shape.vocab * h + shape.position_table * h
    outside_layers = embeddings + norm_h + int(shape.untied) * shape.vocab * h
    common = (
        outside_layers
        + shape.num_layers * attention
        + shape.num_dense_layers * dense_mlp
        + shape.num_moe_layers * moe_shared
    )
    total = common + shape.num_moe_layers * experts * expert
    active = common + shape.num_moe_layers * min(shape.topk, experts) * expert
    return total, active


def _norm_params(shape: ModelShape, width: int) -> int:
    return width if shape.normalization == "RMSNorm" else 2 * width


def _mlp_params(hidden: int, ffn: int, glu: int, bias: int) -> int:
    return hidden * ffn * glu + ffn * hidden + bias * (ffn * glu + hidden) if ffn else 0


def peak_tflops_for_device(name: str, fp8: bool = False) -> float | None:
    """Per-GPU dense peak TFLOP/s for a device name (None when the GPU is not in the table).

    ``fp8``: the FP8 tensor-core peak instead of BF16, for time estimates (the planner).
    """
    lowered = name.lower()
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in lowered:
            return tflops * (FP8_SPEEDUP if fp8 else 1.0)
    return None


def current_device_peak_tflops() -> float | None:
    """The MFU denominator of this process's CUDA device: its dense BF16 peak TFLOP/s.

    Also under FP8, as is conventional: attention, the LM head and the loss still run in
    BF16, and one denominator keeps MFU comparable across precisions. None on CPU or an
    unknown GPU (give ``--peak-tflops``).
    """
    if not torch.cuda.is_available():
        return None
    return peak_tflops_for_device(torch.cuda.get_device_name())


def achieved_tflops_per_gpu(step_flops: float, step_seconds: float, num_gpus: int) -> float:
    """Model TFLOP/s per GPU of a step that took ``step_seconds`` on ``num_gpus`` GPUs."""
    return step_flops / (step_seconds * num_gpus * 1e12)


def mfu(tflops_per_gpu: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved over peak TFLOP/s, as a fraction."""
    if peak_tflops <= 0:
        raise ValueError(f"peak TFLOP/s must be > 0, got {peak_tflops}")
    return tflops_per_gpu / peak_tflops
