"""What the Hugging Face classes can express of the model section, and its settings back.

The converter describes the model by the run's model section, `ModelConfig` (its
``vocab_size`` is the vocabulary to export, before padding): from a checkpoint's run
(`convertible_model`, which refuses what the target classes cannot express) or from an HF
``config.json`` (`hf_config.model_from_hf_config`); `model_settings` turns it back into
``pretrain_tst.py`` settings. The target class follows from it (`architecture`):

* dense, no QK-norm -> ``LlamaForCausalLM`` (biases in all linear layers allowed:
  ``attention_bias`` + ``mlp_bias``);
* dense with QK-norm -> ``Qwen3ForCausalLM``;
* MoE (all layers, QK-norm, no shared experts) -> ``Qwen3MoeForCausalLM``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tst_megatron.conversion import ConversionError
from tst_megatron.settings import ModelConfig, MoEConfig

LLAMA, QWEN3, QWEN3_MOE = "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
NOT_OF_THE_WEIGHTS = (
    "seq_length", "padded_vocab_size", "make_vocab_size_divisible_by", "hidden_dropout",
    "attention_dropout",
)  # fmt: skip
"""Model fields the weights do not fix (the run that continues from them chooses)."""


def architecture(model: ModelConfig) -> str:
    """The Hugging Face class of ``model``."""
    if model.moe is not None:
        return QWEN3_MOE
    return QWEN3 if model.qk_layernorm else LLAMA


def convertible_model(model: ModelConfig, vocab_size: int) -> ModelConfig:
    """``model`` (its vocabulary padded to ``model.padded_vocab_size``) with the vocabulary
    to export trimmed to ``vocab_size``.

    Raises:
        ConversionError: listing every setting the target class cannot express.
    """
    problems = unsupported_settings(model)
    if vocab_size > model.vocab:
        problems.append(
            f"the vocabulary to export has {vocab_size} entries but the model only "
            f"{model.vocab} rows"
        )
    if problems:
        raise ConversionError(
            f"{architecture(model)} cannot express this model: " + "; ".join(problems)
        )
    return dataclasses.replace(model, vocab_size=vocab_size)


def unsupported_settings(model: ModelConfig) -> list[str]:
    """What of ``model`` the Llama / Qwen3 / Qwen3-MoE classes cannot express."""
    problems = []
    if model.position_embedding_type != "rope":
        problems.append(
            f"--position-embedding-type {model.position_embedding_type} (these classes only "
            "have rotary position embeddings: train with --position-embedding-type rope)"
        )
    if model.normalization != "RMSNorm":
        problems.append(f"--normalization {model.normalization} (they only have RMSNorm)")
    if model.apply_layernorm_1p:
        problems.append("--apply-layernorm-1p (zero-centred norm weights)")
    if not model.swiglu:
        problems.append("no --swiglu (their MLPs are gated SiLU: train with --swiglu)")
    if model.rotary_percent != 1.0:
        problems.append(
            f"--rotary-percent {model.rotary_percent} (RoPE rotates whole heads in these classes)"
        )
    if model.add_bias_linear and (model.qk_layernorm or model.moe is not None):
        problems.append(
            "biases in the linear layers (only LlamaForCausalLM has MLP biases; Qwen3 and "
            "Qwen3-MoE MLPs have none: train with --disable-bias-linear)"
        )
    if model.moe is not None:
        problems.extend(_unsupported_moe_settings(model.moe, model.qk_layernorm))
    return problems


def _unsupported_moe_settings(moe: MoEConfig, qk_layernorm: bool) -> list[str]:
    problems = []
    if moe.moe_layer_freq != 1:
        problems.append(
            f"--moe-layer-freq {moe.moe_layer_freq} (the converter exports MoE models whose "
            "every layer is MoE)"
        )
    if moe.moe_shared_expert_intermediate_size:
        problems.append(
            f"--moe-shared-expert-intermediate-size {moe.moe_shared_expert_intermediate_size} "
            "(Qwen3-MoE has no shared experts)"
        )
    if moe.moe_router_score_function != "softmax":
        problems.append(
            f"--moe-router-score-function {moe.moe_router_score_function} (Qwen3-MoE's router "
            "is a softmax)"
        )
    if "sinkhorn" in moe.load_balancing_types:
        problems.append("--moe-router-load-balancing-type sinkhorn (routes differently)")
    if not qk_layernorm:
        problems.append("MoE without --qk-layernorm (Qwen3-MoE always normalises q and k)")
    return problems


def model_settings(model: ModelConfig) -> dict[str, Any]:
    """``pretrain_tst.py`` settings that build ``model``: ``{dest: value}``, the keys of a
    ``--yaml-config`` file (field names are the flags' destinations).

    Every field of the model and MoE sections that differs from its default (the flag's
    default) is set, but those the weights do not fix (`NOT_OF_THE_WEIGHTS`). Tuples become
    lists (YAML).
    """
    settings = _changed(model, skip=(*NOT_OF_THE_WEIGHTS, "moe"))
    if model.moe is not None:
        settings |= _changed(model.moe, skip=())
    return settings


def _changed(section: ModelConfig | MoEConfig, skip: tuple[str, ...]) -> dict[str, Any]:
    changed = {}
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if field.name not in skip and value != field.default:
            changed[field.name] = list(value) if isinstance(value, tuple) else value
    return changed
