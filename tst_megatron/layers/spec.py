"""The local (no Transformer Engine) GPT layer and block specs, on any device.

Megatron-Core's ``get_gpt_layer_local_spec`` with its norms chosen so that sequence
parallelism works: apex's ``FusedLayerNorm`` where mcore would use it (apex installed and
``LayerNorm``: it supports SP, the persistent kernel and zero-centred gamma), `TorchNorm`
otherwise (mcore's ``WrappedTorchNorm`` asserts ``not sequence_parallel``). Parameter names
and shapes are mcore's, so checkpoints are interchangeable with the stock local spec.

``core_attention`` can be swapped: the CPU tests use a context-parallel attention
(`tst_megatron.cpu.attention`); on GPUs context parallelism needs the Transformer Engine spec.
"""

from __future__ import annotations

from dataclasses import replace

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from tst_megatron.kernels import KernelAvailability
from tst_megatron.layers.norm import QKNorm, TorchNorm
from tst_megatron.training.flops import moe_layer_pattern

__all__ = ["local_block_spec", "local_layer_spec", "local_norm"]


def local_norm(normalization: str, *, for_qk: bool = False, apex: bool | None = None) -> type:
    """The norm class of the local spec (``apex``: apex's fused LayerNorm imports; detected
    when None)."""
    if apex is None:
        apex = KernelAvailability.detect().apex_layer_norm
    if apex and normalization == "LayerNorm":
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return FusedLayerNorm
    return QKNorm if for_qk else TorchNorm


def local_layer_spec(
    *,
    num_experts: int | None,
    moe_grouped_gemm: bool,
    qk_layernorm: bool,
    normalization: str,
    core_attention: type | None = None,
    apex: bool | None = None,
) -> ModuleSpec:
    """One transformer layer (MoE when ``num_experts``), mcore's local modules."""
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=moe_grouped_gemm,
        qk_layernorm=qk_layernorm,
        normalization=normalization,
    )
    norm = local_norm(normalization, apex=apex)
    qk_norm = local_norm(normalization, for_qk=True, apex=apex) if qk_layernorm else IdentityOp
    layer = replace(spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm)
    attention = replace(
        layer.self_attention.submodules, q_layernorm=qk_norm, k_layernorm=qk_norm
    )
    if core_attention is not None:
        attention = replace(attention, core_attention=core_attention)
    self_attention = replace(layer.self_attention, submodules=attention)
    return replace(spec, submodules=replace(layer, self_attention=self_attention))


def local_block_spec(
    config: TransformerConfig,
    *,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    core_attention: type | None = None,
    apex: bool | None = None,
) -> TransformerBlockSubmodules:
    """This pipeline stage's (and virtual stage's) layers and the final norm, from ``config``.

    With MoE, layer ``i`` is MoE where `moe_layer_pattern` says so and dense elsewhere, as
    mcore's ``get_gpt_decoder_block_spec``.
    """
    layer = {
        "moe_grouped_gemm": config.moe_grouped_gemm,
        "qk_layernorm": config.qk_layernorm,
        "normalization": config.normalization,
        "core_attention": core_attention,
        "apex": apex,
    }
    dense = local_layer_spec(num_experts=None, **layer)
    experts, moe = config.num_moe_experts, None
    if experts is None:
        pattern = [0] * config.num_layers
    else:
        moe = local_layer_spec(num_experts=experts, **layer)
        pattern = moe_layer_pattern(config.num_layers, config.moe_layer_freq)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[moe if pattern[i] else dense for i in range(offset, offset + count)],
        layer_norm=local_norm(config.normalization, apex=apex),
    )
