"""GPT layer / block specs for CPU runs (Megatron-Core's local spec plus two CPU pieces).

On GPUs the Transformer Engine spec (``get_gpt_layer_with_transformer_engine_spec``) is used;
it fuses norms into linears and does context parallelism natively. On CPU there is no TE, and
mcore's local spec (``get_gpt_layer_local_spec``) lacks two things, swapped in here:

* sequence parallelism: the local norm (``WrappedTorchNorm``) refuses ``sequence_parallel``.
  :class:`CpuNorm` is the same plain torch ``RMSNorm``/``LayerNorm`` whose parameters are
  marked ``sequence_parallel = True``, so ``finalize_model_grads`` sums their gradients over
  the tensor-parallel group.
* context parallelism: the local ``DotProductAttention`` refuses CP;
  :class:`~tst_megatron.cpu.attention.CpuContextParallelAttention` replaces it. The rotary
  embedding's CP slicing (``rope_utils.get_pos_emb_on_this_cp_rank``) runs on CPU through the
  shim.

The final norm of the decoder is not part of the layer spec: pass
:func:`get_cpu_gpt_block_spec` (or ``get_cpu_gpt_layer_spec`` when sequence parallelism is off)
to ``GPTModel(transformer_layer_spec=...)``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from tst_megatron.cpu.attention import CpuContextParallelAttention

__all__ = ["CpuNorm", "CpuQKNorm", "get_cpu_gpt_block_spec", "get_cpu_gpt_layer_spec"]


class CpuNorm:
    """Factory for a torch ``RMSNorm``/``LayerNorm`` over ``[s, b, h]`` hidden states.

    Under sequence parallelism each TP rank normalises its own sequence shard ``[s/tp, b, h]``
    with replicated weights; the parameters are marked ``sequence_parallel`` so that
    ``finalize_model_grads`` all-reduces (sums) their partial gradients over TP. The keyword
    arguments are those ``build_module`` passes to mcore norms; like mcore's
    ``WrappedTorchNorm``, ``config.normalization`` picks the norm.
    """

    sequence_sharded_input = True

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("CpuNorm: zero-centered gamma is not supported")
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"CpuNorm: unsupported normalization {config.normalization!r}")
        if cls.sequence_sharded_input and config.sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True
        return norm


class CpuQKNorm(CpuNorm):
    """Query/key norm over ``[s, b, heads, head_dim]``; its input is never sequence-sharded.

    Under TP ``finalize_model_grads`` sums ``q_layernorm``/``k_layernorm`` gradients over TP
    by name, so the parameters are not marked ``sequence_parallel``.
    """

    sequence_sharded_input = False


def get_cpu_gpt_layer_spec(
    *,
    num_experts: int | None,
    moe_grouped_gemm: bool,
    qk_layernorm: bool,
    normalization: str = "RMSNorm",
    sequence_parallel: bool = False,
    context_parallel: bool = False,
) -> ModuleSpec:
    """mcore's local GPT layer spec, made to work on CPU with SP and/or CP.

    Args:
        num_experts: MoE experts per layer (None: dense MLP).
        moe_grouped_gemm: grouped-GEMM experts (needs the ``grouped_gemm`` package; use False
            on CPU for ``SequentialMLP``).
        qk_layernorm: normalise queries and keys per head.
        normalization: "RMSNorm" or "LayerNorm" (must match ``TransformerConfig``).
        sequence_parallel: use :class:`CpuNorm` (SP-capable) for all norms.
        context_parallel: use ``CpuContextParallelAttention`` as core attention.
    """
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=moe_grouped_gemm,
        qk_layernorm=qk_layernorm,
        normalization=normalization,
    )
    layer = spec.submodules
    attention = layer.self_attention.submodules
    if sequence_parallel:
        layer = replace(layer, input_layernorm=CpuNorm, pre_mlp_layernorm=CpuNorm)
        if qk_layernorm:
            attention = replace(attention, q_layernorm=CpuQKNorm, k_layernorm=CpuQKNorm)
    if context_parallel:
        attention = replace(attention, core_attention=CpuContextParallelAttention)
    self_attention = replace(layer.self_attention, submodules=attention)
    return replace(spec, submodules=replace(layer, self_attention=self_attention))


def get_cpu_gpt_block_spec(
    config: TransformerConfig, *, vp_stage: int | None = None, pp_rank: int | None = None
) -> TransformerBlockSubmodules:
    """Decoder block spec for this pipeline stage (and virtual stage), flags from ``config``.

    Same layers as :func:`get_cpu_gpt_layer_spec` plus the final norm, which must also be
    :class:`CpuNorm` under sequence parallelism.
    """
    layer_spec = get_cpu_gpt_layer_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        normalization=config.normalization,
        sequence_parallel=config.sequence_parallel,
        context_parallel=config.context_parallel_size > 1,
    )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * num_layers,
        layer_norm=CpuNorm if config.sequence_parallel else LayerNormImpl,
    )
