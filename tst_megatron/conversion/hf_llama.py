"""Llama-family parameter names (LlamaForCausalLM, Qwen3ForCausalLM; Qwen3-MoE's non-MLP part).

Megatron-Core (TP=PP=1 ``GPTModel.state_dict()``, local spec)  ->  Hugging Face:

=====================================================  ==================================
``embedding.word_embeddings.weight`` ``[Vp, h]``       ``model.embed_tokens.weight`` ``[V, h]``
``decoder.layers.i.input_layernorm.weight``            ``model.layers.i.input_layernorm.weight``
``...self_attention.linear_qkv.{weight,bias}``         ``...self_attn.{q,k,v}_proj.*`` (split)
``...self_attention.{q,k}_layernorm.weight`` ``[d]``   ``...self_attn.{q,k}_norm.weight``
``...self_attention.linear_proj.{weight,bias}``        ``...self_attn.o_proj.*``
``...pre_mlp_layernorm.weight``                        ``...post_attention_layernorm.weight``
``...mlp.linear_fc1.{weight,bias}`` ``[2f, h]``        ``...mlp.{gate,up}_proj.*`` (split)
``...mlp.linear_fc2.{weight,bias}``                    ``...mlp.down_proj.*``
``decoder.final_layernorm.weight``                     ``model.norm.weight``
``output_layer.weight`` ``[Vp, h]`` (untied only)      ``lm_head.weight`` ``[V, h]``
=====================================================  ==================================

The padded vocabulary rows ``V..Vp`` are dropped on export and zero-filled on import. Each
function pops the entries it converts from its (mutable) input dict and returns new ones.
"""

from __future__ import annotations

import torch

from tst_megatron.conversion.fused import merge_gate_up, merge_qkv, split_gate_up, split_qkv
from tst_megatron.settings import ModelConfig

Tensors = dict[str, torch.Tensor]


def mcore_layer(i: int) -> str:
    return f"decoder.layers.{i}."


def hf_layer(i: int) -> str:
    return f"model.layers.{i}."


def embeddings_to_hf(state: Tensors, model: ModelConfig) -> Tensors:
    """Word embedding, final norm and (untied) output layer, trimmed to ``model.vocab_size``."""
    out = {
        "model.embed_tokens.weight": state.pop("embedding.word_embeddings.weight")[
            : model.vocab_size
        ],
        "model.norm.weight": state.pop("decoder.final_layernorm.weight"),
    }
    if model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = state.pop("output_layer.weight")[: model.vocab_size]
    return out


def embeddings_from_hf(hf: Tensors, model: ModelConfig, padded_vocab_size: int) -> Tensors:
    """Inverse of `embeddings_to_hf`; rows ``V..padded_vocab_size`` are zeros."""
    out = {
        "embedding.word_embeddings.weight": _pad_rows(
            hf.pop("model.embed_tokens.weight"), padded_vocab_size
        ),
        "decoder.final_layernorm.weight": hf.pop("model.norm.weight"),
    }
    if model.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = _pad_rows(hf.pop("lm_head.weight"), padded_vocab_size)
    return out


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``[V, h]`` -> ``[rows, h]`` with zero rows appended."""
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def attention_to_hf(state: Tensors, model: ModelConfig, i: int) -> Tensors:
    """Layer ``i``'s two norms and self-attention."""
    ml, hl = mcore_layer(i), hf_layer(i)
    m, h = ml + "self_attention.", hl + "self_attn."
    out = {
        f"{hl}input_layernorm.weight": state.pop(f"{ml}input_layernorm.weight"),
        f"{hl}post_attention_layernorm.weight": state.pop(f"{ml}pre_mlp_layernorm.weight"),
    }
    for kind in _linear_kinds(model):
        q, k, v = split_qkv(
            state.pop(f"{m}linear_qkv.{kind}"),
            model.num_attention_heads,
            model.num_query_groups,
            model.kv_channels,
        )
        out |= {f"{h}q_proj.{kind}": q, f"{h}k_proj.{kind}": k, f"{h}v_proj.{kind}": v}
        out[f"{h}o_proj.{kind}"] = state.pop(f"{m}linear_proj.{kind}")
    if model.qk_layernorm:
        out[f"{h}q_norm.weight"] = state.pop(f"{m}q_layernorm.weight")
        out[f"{h}k_norm.weight"] = state.pop(f"{m}k_layernorm.weight")
    return out


def attention_from_hf(hf: Tensors, model: ModelConfig, i: int) -> Tensors:
    """Inverse of `attention_to_hf`."""
    ml, hl = mcore_layer(i), hf_layer(i)
    m, h = ml + "self_attention.", hl + "self_attn."
    out = {
        f"{ml}input_layernorm.weight": hf.pop(f"{hl}input_layernorm.weight"),
        f"{ml}pre_mlp_layernorm.weight": hf.pop(f"{hl}post_attention_layernorm.weight"),
    }
    for kind in _linear_kinds(model):
        q, k, v = (hf.pop(f"{h}{name}_proj.{kind}") for name in "qkv")
        out[f"{m}linear_qkv.{kind}"] = merge_qkv(
            q, k, v, model.num_attention_heads, model.num_query_groups
        )
        out[f"{m}linear_proj.{kind}"] = hf.pop(f"{h}o_proj.{kind}")
    if model.qk_layernorm:
        out[f"{m}q_layernorm.weight"] = hf.pop(f"{h}q_norm.weight")
        out[f"{m}k_layernorm.weight"] = hf.pop(f"{h}k_norm.weight")
    return out


def mlp_to_hf(state: Tensors, model: ModelConfig, mcore_prefix: str, hf_prefix: str) -> Tensors:
    """One SwiGLU MLP: ``{mcore_prefix}linear_fc1/2`` -> ``{hf_prefix}{gate,up,down}_proj``."""
    out = {}
    for kind in _linear_kinds(model):
        gate, up = split_gate_up(state.pop(f"{mcore_prefix}linear_fc1.{kind}"))
        out[f"{hf_prefix}gate_proj.{kind}"] = gate
        out[f"{hf_prefix}up_proj.{kind}"] = up
        out[f"{hf_prefix}down_proj.{kind}"] = state.pop(f"{mcore_prefix}linear_fc2.{kind}")
    return out


def mlp_from_hf(hf: Tensors, model: ModelConfig, mcore_prefix: str, hf_prefix: str) -> Tensors:
    """Inverse of `mlp_to_hf`."""
    out = {}
    for kind in _linear_kinds(model):
        out[f"{mcore_prefix}linear_fc1.{kind}"] = merge_gate_up(
            hf.pop(f"{hf_prefix}gate_proj.{kind}"), hf.pop(f"{hf_prefix}up_proj.{kind}")
        )
        out[f"{mcore_prefix}linear_fc2.{kind}"] = hf.pop(f"{hf_prefix}down_proj.{kind}")
    return out


def dense_mlp_to_hf(state: Tensors, model: ModelConfig, i: int) -> Tensors:
    """Layer ``i``'s dense MLP."""
    return mlp_to_hf(state, model, mcore_layer(i) + "mlp.", hf_layer(i) + "mlp.")


def dense_mlp_from_hf(hf: Tensors, model: ModelConfig, i: int) -> Tensors:
    """Inverse of `dense_mlp_to_hf`."""
    return mlp_from_hf(hf, model, mcore_layer(i) + "mlp.", hf_layer(i) + "mlp.")


def _linear_kinds(model: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if model.add_bias_linear else ("weight",)
