"""Whole-model state dicts: Megatron-Core (TP=PP=1 ``GPTModel``) <-> Hugging Face.

Every parameter on either side must be mapped: a missing or a left-over one is an error
(rather than a silently dropped or uninitialised weight).
"""

from __future__ import annotations

from tst_megatron.conversion import ConversionError
from tst_megatron.conversion.hf_llama import (
    Tensors,
    attention_from_hf,
    attention_to_hf,
    dense_mlp_from_hf,
    dense_mlp_to_hf,
    embeddings_from_hf,
    embeddings_to_hf,
)
from tst_megatron.conversion.hf_qwen3_moe import moe_from_hf, moe_to_hf
from tst_megatron.settings import ModelConfig


def mcore_to_hf(state: Tensors, model: ModelConfig) -> Tensors:
    """Megatron ``state_dict()`` (``_extra_state`` entries ignored) -> HF tensors."""
    rest = {k: v for k, v in state.items() if not k.endswith("._extra_state")}
    mlp = moe_to_hf if model.num_experts else dense_mlp_to_hf
    try:
        out = embeddings_to_hf(rest, model)
        for i in range(model.num_layers):
            out |= attention_to_hf(rest, model, i)
            out |= mlp(rest, model, i)
    except KeyError as err:
        raise ConversionError(f"the Megatron model has no parameter {err}") from None
    _check_consumed(rest, "Megatron")
    return out


def hf_to_mcore(hf: Tensors, model: ModelConfig, padded_vocab_size: int) -> Tensors:
    """HF tensors -> Megatron ``state_dict()`` entries (vocabulary zero-padded)."""
    rest = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    if not model.untie_embeddings_and_output_weights:
        rest.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    mlp = moe_from_hf if model.num_experts else dense_mlp_from_hf
    try:
        out = embeddings_from_hf(rest, model, padded_vocab_size)
        for i in range(model.num_layers):
            out |= attention_from_hf(rest, model, i)
            out |= mlp(rest, model, i)
    except KeyError as err:
        raise ConversionError(f"the Hugging Face checkpoint has no tensor {err}") from None
    _check_consumed(rest, "Hugging Face")
    return out


def _check_consumed(rest: Tensors, side: str) -> None:
    if rest:
        names = sorted(rest)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise ConversionError(
            f"{side} parameters with no counterpart in the target: {', '.join(names[:5])}{more}"
        )
