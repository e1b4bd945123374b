"""`ModelSpec` <-> Hugging Face ``config.json`` (Llama, Qwen3, Qwen3-MoE).

`hf_config` writes the keys both transformers 4.x and 5.x read: ``rope_theta`` (4.x) and
``rope_parameters`` (5.x), ``torch_dtype`` and ``dtype``; `spec_from_hf_config` reads either
(and 5.x's ``num_local_experts`` for ``num_experts``).
"""

from __future__ import annotations

from typing import Any

from tst_megatron.conversion import ConversionError
from tst_megatron.conversion.spec import LLAMA, QWEN3, QWEN3_MOE, ModelSpec

MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3", QWEN3_MOE: "qwen3_moe"}


def hf_config(
    spec: ModelSpec, dtype: str, bos_token_id: int | None, eos_token_id: int | None
) -> dict[str, Any]:
    """The ``config.json`` of ``spec.architecture`` (``dtype``: "float32", "bfloat16", ...)."""
    config: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": MODEL_TYPES[spec.architecture],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups,
        "head_dim": spec.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": spec.init_method_std,
        "rms_norm_eps": spec.norm_epsilon,
        "rope_theta": float(spec.rotary_base),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(spec.rotary_base)},
        "attention_bias": spec.add_bias_linear,
        "attention_dropout": spec.attention_dropout,
        "tie_word_embeddings": not spec.untie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if spec.architecture == LLAMA:
        config["mlp_bias"] = spec.add_bias_linear
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    if spec.architecture == QWEN3_MOE:
        config.update(
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.moe_router_topk,
            moe_intermediate_size=spec.moe_ffn_hidden_size,
            norm_topk_prob=not spec.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=spec.moe_aux_loss_coeff,
            output_router_logits=False,
        )
    return config


def spec_from_hf_config(config: dict[str, Any]) -> ModelSpec:
    """The `ModelSpec` of a Llama / Qwen3 / Qwen3-MoE ``config.json``.

    Raises:
        ConversionError: another model type, or a setting Megatron's flags cannot express
            (RoPE scaling, sliding windows, dense layers between MoE layers, non-SiLU MLPs,
            attention and MLP biases that differ).
    """
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES.values():
        raise ConversionError(
            f"config.json has model_type {model_type!r}; supported: "
            + ", ".join(sorted(MODEL_TYPES.values()))
        )
    problems = []
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r}")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        problems.append(f"non-integer rope_theta {theta} (--rotary-base is an integer)")
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (Megatron's --swiglu is SiLU)")
    if config.get("use_sliding_window"):
        problems.append("sliding-window attention")
    attention_bias = bool(config.get("attention_bias", False))
    if model_type == "llama" and attention_bias != bool(config.get("mlp_bias", False)):
        problems.append("attention_bias != mlp_bias (Megatron's --disable-bias-linear covers both)")
    if model_type != "llama" and attention_bias:
        problems.append("attention_bias (Megatron would add MLP biases too)")
    moe = model_type == "qwen3_moe"
    if moe and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        problems.append("dense layers between the MoE layers (mlp_only_layers/decoder_sparse_step)")
    if problems:
        raise ConversionError(
            f"cannot convert this {model_type} model to Megatron: " + "; ".join(problems)
        )
    heads = config["num_attention_heads"]
    return ModelSpec(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config["max_position_embeddings"],
        rotary_base=int(theta),
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        untie_embeddings=not config.get("tie_word_embeddings", False),
        add_bias_linear=attention_bias,
        qk_layernorm=model_type != "llama",
        init_method_std=config.get("initializer_range", 0.02),
        attention_dropout=config.get("attention_dropout", 0.0),
        num_experts=config.get("num_experts", config.get("num_local_experts")) if moe else None,
        moe_ffn_hidden_size=config["moe_intermediate_size"] if moe else None,
        moe_router_topk=config["num_experts_per_tok"] if moe else None,
        moe_router_pre_softmax=moe and not config.get("norm_topk_prob", False),
        moe_aux_loss_coeff=config.get("router_aux_loss_coef", 0.0) if moe else 0.0,
    )
