"""The model section (`ModelConfig`) <-> Hugging Face ``config.json`` (Llama, Qwen3, Qwen3-MoE).

`hf_config` writes the keys both transformers 4.x and 5.x read: ``rope_theta`` (4.x) and
``rope_parameters`` (5.x), ``torch_dtype`` and ``dtype``; `model_from_hf_config` reads either
(and 5.x's ``num_local_experts`` for ``num_experts``).
"""

from __future__ import annotations

from typing import Any

from tst_megatron.conversion import ConversionError
from tst_megatron.conversion.spec import LLAMA, QWEN3, QWEN3_MOE, architecture
from tst_megatron.settings import ModelConfig, MoEConfig

MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3", QWEN3_MOE: "qwen3_moe"}


def hf_config(
    model: ModelConfig, dtype: str, bos_token_id: int | None, eos_token_id: int | None
) -> dict[str, Any]:
    """The ``config.json`` of ``model`` (`architecture`; ``dtype``: "float32", "bfloat16", ...)."""
    target = architecture(model)
    config: dict[str, Any] = {
        "architectures": [target],
        "model_type": MODEL_TYPES[target],
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "initializer_range": model.init_method_std,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": float(model.rotary_base),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model.rotary_base)},
        "attention_bias": model.add_bias_linear,
        "attention_dropout": model.attention_dropout,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if target == LLAMA:
        config["mlp_bias"] = model.add_bias_linear
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    if model.moe is not None:
        moe = model.moe
        config.update(
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.moe_router_topk,
            moe_intermediate_size=moe.moe_ffn_hidden_size,
            norm_topk_prob=not moe.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=moe.moe_aux_loss_coeff,
            output_router_logits=False,
        )
    return config


def model_from_hf_config(config: dict[str, Any]) -> ModelConfig:
    """The model section of a Llama / Qwen3 / Qwen3-MoE ``config.json`` (a RoPE / RMSNorm /
    SwiGLU decoder; ``seq_length`` = ``max_position_embeddings``).

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
    is_moe = model_type == "qwen3_moe"
    if is_moe and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        problems.append("dense layers between the MoE layers (mlp_only_layers/decoder_sparse_step)")
    if problems:
        raise ConversionError(
            f"cannot convert this {model_type} model to Megatron: " + "; ".join(problems)
        )
    heads = config["num_attention_heads"]
    moe = None
    if is_moe:
        moe = MoEConfig(
            num_experts=config["num_experts" if "num_experts" in config else "num_local_experts"],
            moe_ffn_hidden_size=config["moe_intermediate_size"],
            moe_router_topk=config["num_experts_per_tok"],
            moe_router_pre_softmax=not config.get("norm_topk_prob", False),
            moe_aux_loss_coeff=config.get("router_aux_loss_coef", 0.0),
        )
    return ModelConfig(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
        seq_length=config["max_position_embeddings"],
        max_position_embeddings=config["max_position_embeddings"],
        vocab_size=config["vocab_size"],
        position_embedding_type="rope",
        rotary_base=int(theta),
        normalization="RMSNorm",
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        swiglu=True,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        add_bias_linear=attention_bias,
        qk_layernorm=model_type != "llama",
        init_method_std=config.get("initializer_range", 0.02),
        attention_dropout=config.get("attention_dropout", 0.0),
        moe=moe,
    )
