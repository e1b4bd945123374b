"""Model FLOPs per step, analytic parameter counts, and MFU, of the model section.

The formulas take the model section (`tst_megatron.settings.ModelConfig`, the one home of the
model's shape); the peak TFLOP/s table lives with the `Environment`
(`tst_megatron.settings.environment`) and is re-exported here for its callers.

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

from tst_megatron.config import PhaseSpec
from tst_megatron.settings.environment import PEAK_TFLOPS_BF16 as PEAK_TFLOPS_BF16
from tst_megatron.settings.environment import (
    current_device_peak_tflops as current_device_peak_tflops,
)
from tst_megatron.settings.environment import peak_tflops_for_device as peak_tflops_for_device
from tst_megatron.settings.model import ModelConfig
from tst_megatron.settings.model import moe_layer_pattern as moe_layer_pattern


def flops_per_step(model: ModelConfig, seq_length: int, batch_size: int) -> int:
    """Training FLOPs (forward + backward) of one step of ``batch_size`` samples of length L."""
    h = model.hidden_size
    gemms = 3 if model.swiglu else 2
    experts, topk, expert_ffn, shared_ffn = _moe_sizes(model)
    query = model.kv_channels * model.num_attention_heads
    key_value = model.kv_channels * model.num_query_groups
    mlp = (
        model.ffn_hidden_size * gemms * model.num_dense_layers
        + (expert_ffn * topk + shared_ffn) * gemms * model.num_moe_layers
    )
    router = experts * model.num_moe_layers
    attention_projections = (h * (query + 2 * key_value) + query * h) * model.num_layers
    per_token = 6 * (h * (mlp + router) + attention_projections + h * model.vocab)
    causal_core = 6 * query * model.num_layers  # 2 GEMMs x half the scores x 3 passes x 2
    tokens = batch_size * seq_length
    return tokens * per_token + batch_size * seq_length**2 * causal_core


def phase_flops_per_step(
    model: ModelConfig, spec: PhaseSpec, seq_length: int, batch_size: int
) -> int:
    """`flops_per_step` of a step of ``spec``.

    The batch fold runs ``s * batch_size`` samples of ``L/s`` latent positions: the same
    GEMM FLOPs as ``batch_size`` samples of ``L``, and ``s`` times fewer attention FLOPs.
    """
    return flops_per_step(model, spec.latent_length(seq_length), spec.micro_batch_rows(batch_size))


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per model position at context ``seq_length``."""
    return flops_per_step(model, seq_length, 1) / seq_length


def total_and_active_params(model: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters one token uses) of the unsharded model.

    Active counts ``topk`` routed experts per MoE layer and everything else (embeddings, LM
    head, attention, norms, router, shared experts).
    """
    h = model.hidden_size
    norm_h = _norm_params(model, h)
    glu = 2 if model.swiglu else 1
    query = model.kv_channels * model.num_attention_heads
    qkv = query + 2 * model.kv_channels * model.num_query_groups
    bias = int(model.add_bias_linear)

    attention = norm_h + h * qkv + query * h + bias * (qkv + h)
    if model.qk_layernorm:
        attention += 2 * _norm_params(model, model.kv_channels)
    dense_mlp = norm_h + _mlp_params(h, model.ffn_hidden_size, glu, bias)
    experts, topk, expert_ffn, shared_ffn = _moe_sizes(model)
    expert = _mlp_params(h, expert_ffn, glu, bias)
    moe_shared = (
        norm_h
        + experts * h
        + bias * experts  # router
        + _mlp_params(h, shared_ffn, glu, bias=0)
    )
    embeddings = model.vocab * h + model.position_table * h
    untied = int(model.untie_embeddings_and_output_weights)
    outside_layers = embeddings + norm_h + untied * model.vocab * h
    common = (
        outside_layers
        + model.num_layers * attention
        + model.num_dense_layers * dense_mlp
        + model.num_moe_layers * moe_shared
    )
    total = common + model.num_moe_layers * experts * expert
    active = common + model.num_moe_layers * min(topk, experts) * expert
    return total, active


def _moe_sizes(model: ModelConfig) -> tuple[int, int, int, int]:
    """(routed experts, top-k, one expert's hidden size, the shared experts' hidden size)."""
    moe = model.moe
    if moe is None:
        return 0, 0, 0, 0
    shared = moe.moe_shared_expert_intermediate_size or 0
    return moe.num_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size, shared


def _norm_params(model: ModelConfig, width: int) -> int:
    return width if model.normalization == "RMSNorm" else 2 * width


def _mlp_params(hidden: int, ffn: int, glu: int, bias: int) -> int:
    return hidden * ffn * glu + ffn * hidden + bias * (ffn * glu + hidden) if ffn else 0


def achieved_tflops_per_gpu(step_flops: float, step_seconds: float, num_gpus: int) -> float:
    """Model TFLOP/s per GPU of a step that took ``step_seconds`` on ``num_gpus`` GPUs."""
    return step_flops / (step_seconds * num_gpus * 1e12)


def mfu(tflops_per_gpu: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved over peak TFLOP/s, as a fraction."""
    if peak_tflops <= 0:
        raise ValueError(f"peak TFLOP/s must be > 0, got {peak_tflops}")
    return tflops_per_gpu / peak_tflops
