"""`ModelSpec`: the model both sides describe, and what the Hugging Face classes can express.

A `ModelSpec` is built from validated ``pretrain_tst.py`` arguments (`spec_from_args`, which
refuses configurations the target classes cannot express) or from an HF ``config.json``
(`hf_config.spec_from_hf_config`), and turns back into ``pretrain_tst.py`` model flags
(`model_flags`). The target class follows from it:

* dense, no QK-norm -> ``LlamaForCausalLM`` (biases in all linear layers allowed:
  ``attention_bias`` + ``mlp_bias``);
* dense with QK-norm -> ``Qwen3ForCausalLM``;
* MoE (all layers, QK-norm, no shared experts) -> ``Qwen3MoeForCausalLM``.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass

from tst_megatron.conversion import ConversionError

LLAMA, QWEN3, QWEN3_MOE = "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"


@dataclass(frozen=True)
class ModelSpec:
    """A pre-norm RMSNorm / RoPE / SwiGLU decoder (dense or MoE) with an unpadded vocabulary."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: int
    norm_epsilon: float
    untie_embeddings: bool
    add_bias_linear: bool
    qk_layernorm: bool
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int | None = None
    moe_router_pre_softmax: bool = False
    moe_aux_loss_coeff: float = 0.0

    @property
    def architecture(self) -> str:
        if self.num_experts:
            return QWEN3_MOE
        return QWEN3 if self.qk_layernorm else LLAMA


def spec_from_args(args: Namespace, vocab_size: int) -> ModelSpec:
    """The `ModelSpec` of validated run arguments, the vocabulary trimmed to ``vocab_size``.

    Raises:
        ConversionError: listing every setting the target class cannot express.
    """
    problems = unsupported_settings(args)
    if vocab_size > args.padded_vocab_size:
        problems.append(
            f"the vocabulary to export has {vocab_size} entries but the model only "
            f"{args.padded_vocab_size} rows"
        )
    if problems:
        target = QWEN3_MOE if args.num_experts else (QWEN3 if args.qk_layernorm else LLAMA)
        raise ConversionError(f"{target} cannot express this model: " + "; ".join(problems))
    moe = args.num_experts is not None
    return ModelSpec(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        vocab_size=vocab_size,
        max_position_embeddings=args.max_position_embeddings,
        rotary_base=args.rotary_base,
        norm_epsilon=args.norm_epsilon,
        untie_embeddings=args.untie_embeddings_and_output_weights,
        add_bias_linear=args.add_bias_linear,
        qk_layernorm=args.qk_layernorm,
        init_method_std=args.init_method_std,
        attention_dropout=args.attention_dropout,
        num_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size if moe else None,
        moe_router_topk=args.moe_router_topk if moe else None,
        moe_router_pre_softmax=moe and args.moe_router_pre_softmax,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff if moe else 0.0,
    )


def unsupported_settings(args: Namespace) -> list[str]:
    """What in validated run arguments the Llama / Qwen3 / Qwen3-MoE classes cannot express."""
    problems = []
    if args.position_embedding_type != "rope":
        problems.append(
            f"--position-embedding-type {args.position_embedding_type} (these classes only "
            "have rotary position embeddings: train with --position-embedding-type rope)"
        )
    if args.normalization != "RMSNorm":
        problems.append(f"--normalization {args.normalization} (they only have RMSNorm)")
    if args.apply_layernorm_1p:
        problems.append("--apply-layernorm-1p (zero-centred norm weights)")
    if not args.swiglu:
        problems.append("no --swiglu (their MLPs are gated SiLU: train with --swiglu)")
    if args.rotary_percent != 1.0:
        problems.append(
            f"--rotary-percent {args.rotary_percent} (RoPE rotates whole heads in these classes)"
        )
    if args.add_bias_linear and (args.qk_layernorm or args.num_experts is not None):
        problems.append(
            "biases in the linear layers (only LlamaForCausalLM has MLP biases; Qwen3 and "
            "Qwen3-MoE MLPs have none: train with --disable-bias-linear)"
        )
    if args.num_experts is not None:
        problems.extend(_unsupported_moe_settings(args))
    return problems


def _unsupported_moe_settings(args: Namespace) -> list[str]:
    problems = []
    if args.moe_layer_freq != 1:
        problems.append(
            f"--moe-layer-freq {args.moe_layer_freq} (the converter exports MoE models whose "
            "every layer is MoE)"
        )
    if args.moe_shared_expert_intermediate_size:
        problems.append(
            f"--moe-shared-expert-intermediate-size {args.moe_shared_expert_intermediate_size} "
            "(Qwen3-MoE has no shared experts)"
        )
    if args.moe_router_score_function != "softmax":
        problems.append(
            f"--moe-router-score-function {args.moe_router_score_function} (Qwen3-MoE's router "
            "is a softmax)"
        )
    if args.moe_router_load_balancing_type == "sinkhorn":
        problems.append("--moe-router-load-balancing-type sinkhorn (routes differently)")
    if not args.qk_layernorm:
        problems.append("MoE without --qk-layernorm (Qwen3-MoE always normalises q and k)")
    return problems


def model_flags(spec: ModelSpec) -> list[str]:
    """``pretrain_tst.py`` flags that build this model (vocabulary before padding)."""
    flags = [
        "--num-layers", str(spec.num_layers),
        "--hidden-size", str(spec.hidden_size),
        "--ffn-hidden-size", str(spec.ffn_hidden_size),
        "--num-attention-heads", str(spec.num_attention_heads),
        "--num-query-groups", str(spec.num_query_groups),
        "--kv-channels", str(spec.kv_channels),
        "--max-position-embeddings", str(spec.max_position_embeddings),
        "--position-embedding-type", "rope",
        "--rotary-base", str(spec.rotary_base),
        "--normalization", "RMSNorm",
        "--norm-epsilon", repr(spec.norm_epsilon),
        "--swiglu",
        "--vocab-size", str(spec.vocab_size),
        "--init-method-std", repr(spec.init_method_std),
    ]  # fmt: skip
    if not spec.add_bias_linear:
        flags.append("--disable-bias-linear")
    if spec.untie_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if spec.qk_layernorm:
        flags.append("--qk-layernorm")
    if spec.num_experts:
        flags += [
            "--num-experts", str(spec.num_experts),
            "--moe-ffn-hidden-size", str(spec.moe_ffn_hidden_size),
            "--moe-router-topk", str(spec.moe_router_topk),
            "--moe-aux-loss-coeff", repr(spec.moe_aux_loss_coeff),
        ]  # fmt: skip
        if spec.moe_router_pre_softmax:
            flags.append("--moe-router-pre-softmax")
    return flags
