"""TST losses: the (weighted) multi-hot cross-entropy, its fused output-layer form, and the
target statistics behind the KL form of the phase-1 loss."""

from tst_megatron.loss.fused_output import (
    default_chunk_tokens,
    fused_output_multi_hot_cross_entropy,
)
from tst_megatron.loss.multi_hot import IGNORE_TARGET, multi_hot_cross_entropy
from tst_megatron.loss.target_weights import (
    normalized_target_weights,
    positions_with_targets,
    target_entropy,
)

__all__ = [
    "IGNORE_TARGET",
    "default_chunk_tokens",
    "fused_output_multi_hot_cross_entropy",
    "multi_hot_cross_entropy",
    "normalized_target_weights",
    "positions_with_targets",
    "target_entropy",
]
