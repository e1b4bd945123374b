"""The model section: the shape of the GPT / MoE decoder (Megatron-LM's model and MoE flags).

One home for the model's shape: the FLOP and parameter formulas (`training/flops.py`), the
MoE metrics and, in later steps, the model builder and the converter read it from here.
Field names are Megatron-LM's flag attributes (``--num-layers`` -> ``num_layers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from tst_megatron.settings.checks import SettingsError, check_choice, check_positive

PositionEmbedding = Literal["rope", "learned_absolute", "none"]
Normalization = Literal["LayerNorm", "RMSNorm"]
LoadBalancing = Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"]
SHAPE = {"shape": True}
"""Field metadata: the field is part of the model's shape (`ModelConfig.shape`), which a
checkpoint's weights must match on every resume, ``--finetune`` included."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """The routed experts of a MoE model (``--num-experts`` and the ``--moe-*`` flags).

    ``moe_router_load_balancing_type`` / ``moe_aux_loss_coeff`` are one value each, or equally
    long tuples when several aux losses are combined. ``moe_router_dtype`` None = the model's
    precision. ``moe_expert_capacity_factor`` None = dropless.
    """

    num_experts: int = field(metadata=SHAPE)
    moe_router_topk: int = field(default=2, metadata=SHAPE)
    moe_ffn_hidden_size: int = field(metadata=SHAPE)
    moe_shared_expert_intermediate_size: int | None = None
    moe_aux_loss_coeff: float | tuple[float, ...] = 0.0
    moe_router_load_balancing_type: LoadBalancing | tuple[LoadBalancing, ...] = "aux_loss"
    moe_token_dispatcher_type: Literal["allgather", "alltoall"] = "allgather"
    moe_layer_freq: int = 1
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_pre_softmax: bool = False
    moe_z_loss_coeff: float | None = None
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_dtype: Literal["fp32", "fp64"] | None = "fp32"
    moe_expert_capacity_factor: float | None = None
    moe_token_drop_policy: Literal["probs", "position"] = "probs"
    moe_pad_expert_input_to_capacity: bool = False

    def __post_init__(self) -> None:
        check_positive("--num-experts", self.num_experts)
        check_positive("--moe-layer-freq", self.moe_layer_freq)
        check_positive("--moe-ffn-hidden-size", self.moe_ffn_hidden_size)
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise SettingsError(
                f"--moe-router-topk {self.moe_router_topk} must be between 1 and --num-experts "
                f"{self.num_experts}"
            )

    @property
    def load_balancing_types(self) -> tuple[str, ...]:
        """``moe_router_load_balancing_type`` as a tuple (one or several types)."""
        types = self.moe_router_load_balancing_type
        return types if isinstance(types, tuple) else (types,)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """A GPT / MoE decoder (the TP=PP=1 view), with the derived sizes resolved.

    ``padded_vocab_size`` is ``--vocab-size`` padded to a multiple of
    ``--make-vocab-size-divisible-by`` x TP, or None until the tokenizer gives the vocabulary.
    ``moe`` is None for a dense model.
    """

    num_layers: int = field(metadata=SHAPE)
    hidden_size: int = field(metadata=SHAPE)
    ffn_hidden_size: int = field(metadata=SHAPE)
    num_attention_heads: int = field(metadata=SHAPE)
    num_query_groups: int = field(metadata=SHAPE)
    kv_channels: int = field(metadata=SHAPE)
    seq_length: int
    max_position_embeddings: int
    vocab_size: int | None = None
    padded_vocab_size: int | None = field(default=None, metadata=SHAPE)
    make_vocab_size_divisible_by: int = 128
    position_embedding_type: PositionEmbedding = field(default="learned_absolute", metadata=SHAPE)
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    normalization: Normalization = field(default="LayerNorm", metadata=SHAPE)
    norm_epsilon: float = 1e-5
    apply_layernorm_1p: bool = False
    swiglu: bool = field(default=False, metadata=SHAPE)
    untie_embeddings_and_output_weights: bool = field(default=False, metadata=SHAPE)
    add_bias_linear: bool = field(default=True, metadata=SHAPE)
    qk_layernorm: bool = field(default=False, metadata=SHAPE)
    init_method_std: float = 0.02
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        for flag, value in (
            ("--num-layers", self.num_layers),
            ("--hidden-size", self.hidden_size),
            ("--ffn-hidden-size", self.ffn_hidden_size),
            ("--num-attention-heads", self.num_attention_heads),
            ("--num-query-groups", self.num_query_groups),
            ("--kv-channels", self.kv_channels),
            ("--seq-length", self.seq_length),
            ("--vocab-size", self.vocab_size),
            ("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by),
        ):
            check_positive(flag, value)
        check_choice("--position-embedding-type", self.position_embedding_type,
                     ("rope", "learned_absolute", "none"))  # fmt: skip
        check_choice("--normalization", self.normalization, ("LayerNorm", "RMSNorm"))
        if self.num_attention_heads % self.num_query_groups:
            raise SettingsError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--num-query-groups {self.num_query_groups}: every key/value group must serve "
                "the same number of query heads"
            )
        if self.max_position_embeddings < self.seq_length:
            raise SettingsError(
                f"--max-position-embeddings {self.max_position_embeddings} is smaller than "
                f"--seq-length {self.seq_length}"
            )

    def flat(self) -> dict[str, Any]:
        """Every field by its flag's name, the MoE section's beside the model's; a dense model
        has ``num_experts`` None and no other MoE field."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "moe"}
        if self.moe is None:
            return {**values, "num_experts": None}
        return {**values, **{f.name: getattr(self.moe, f.name) for f in fields(self.moe)}}

    def shape(self) -> dict[str, Any]:
        """The fields marked `SHAPE` (`SHAPE_FIELDS`), as `flat` gives them: what the weights
        of a checkpoint must match."""
        return {name: value for name, value in self.flat().items() if name in SHAPE_FIELDS}

    @property
    def vocab(self) -> int:
        """The padded vocabulary (rows of the embedding and the LM head).

        Raises:
            SettingsError: not known yet (no ``--vocab-size``; the tokenizer sets it).
        """
        if self.padded_vocab_size is None:
            raise SettingsError(
                "the padded vocabulary is not known yet: give --vocab-size or resolve the "
                "settings after the tokenizer is loaded"
            )
        return self.padded_vocab_size

    @property
    def num_moe_layers(self) -> int:
        """Layers whose MLP is an MoE layer."""
        if self.moe is None:
            return 0
        return sum(moe_layer_pattern(self.num_layers, self.moe.moe_layer_freq))

    @property
    def num_dense_layers(self) -> int:
        """Layers with a dense MLP."""
        return self.num_layers - self.num_moe_layers

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return 0 if self.moe is None else self.moe.num_experts

    @property
    def position_table(self) -> int:
        """Rows of the learned absolute position embedding (0 for RoPE / none)."""
        learned = self.position_embedding_type == "learned_absolute"
        return self.max_position_embeddings if learned else 0


SHAPE_FIELDS: tuple[str, ...] = tuple(
    f.name
    for section in (ModelConfig, MoEConfig)
    for f in fields(section)
    if f.metadata.get("shape")
)
"""The model's shape: the names of `ModelConfig`'s and `MoEConfig`'s `SHAPE` fields."""


def moe_layer_pattern(num_layers: int, moe_layer_freq: int) -> list[int]:
    """Megatron-Core's layer pattern: 1 = MoE layer, 0 = dense; layer i is MoE if i % freq == 0."""
    return [1 if i % moe_layer_freq == 0 else 0 for i in range(num_layers)]
