"""Causal core attention with context parallelism for CPU runs.

Megatron-Core's local ``DotProductAttention`` refuses context parallelism (CP); on GPUs
Transformer Engine's attention does CP natively (ring attention). For CPU tests this module
implements the same function in the simplest exact way: every CP rank all-gathers K and V
over the CP group and attends with its local queries under a causal mask built from global
token positions.

Sequence layout (Megatron's load-balanced CP split, ``megatron.core.utils.
get_batch_on_this_cp_rank``): the sequence is cut into ``2 * cp`` equal chunks and CP rank
``r`` holds chunks ``r`` and ``2 * cp - 1 - r``, in that order.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

__all__ = ["CpuContextParallelAttention", "cp_token_positions"]


def cp_token_positions(local_len: int, cp_size: int, cp_rank: int) -> Tensor:
    """Global positions of the ``local_len`` tokens a CP rank holds, shape ``[local_len]``."""
    chunk = divide(local_len, 2)
    starts = (cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk)
    return torch.cat([torch.arange(start, start + chunk) for start in starts])


class CpuContextParallelAttention(MegatronModule):
    """Drop-in for ``DotProductAttention`` (same constructor and forward) that supports CP.

    Only causal self-attention without packed sequences, attention bias or a custom mask is
    supported (what GPT pre-training uses); the softmax is computed in fp32. ``attention_type``
    and ``cp_comm_type`` are accepted for signature compatibility (K/V are all-gathered).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"CpuContextParallelAttention is causal only, got {attn_mask_type}")
        if config.softmax_type != "vanilla" or config.apply_query_key_layer_scaling:
            raise ValueError("CpuContextParallelAttention supports the vanilla softmax only")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        self.num_query_groups = divide(config.num_query_groups, pg_collection.tp.size())
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(config.kv_channels)
        self.softmax_scale = softmax_scale
        self.attention_dropout = torch.nn.Dropout(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """Attend the local queries to the keys/values of the whole sequence.

        Args:
            query: ``[sq, b, np, hn]``, this CP rank's tokens (``sq = s / cp``).
            key, value: ``[sq, b, ng, hn]``, this CP rank's tokens.
            attention_mask: must be None (the causal mask is implied).

        Returns:
            ``[sq, b, np * hn]``.
        """
        if attention_mask is not None or attention_bias is not None or packed_seq_params:
            raise ValueError("CpuContextParallelAttention: causal attention without a mask only")
        sq, b, np_, hn = query.shape
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        if cp_size > 1:
            # [sq, b, ng, hn] -> [cp * sq, b, ng, hn] in CP rank order; the backward pass sums
            # every rank's gradient for a chunk and returns the local chunk (reduce-scatter).
            key = gather_from_sequence_parallel_region(key, group=self.cp_group)
            value = gather_from_sequence_parallel_region(value, group=self.cp_group)
        q_pos = cp_token_positions(sq, cp_size, cp_rank)
        k_pos = torch.cat([cp_token_positions(sq, cp_size, r) for r in range(cp_size)])
        masked = k_pos[None, :] > q_pos[:, None]  # [sq, sk]

        heads_per_group = np_ // self.num_query_groups
        key = key.repeat_interleave(heads_per_group, dim=2)  # [sk, b, np, hn]
        value = value.repeat_interleave(heads_per_group, dim=2)
        scores = torch.einsum("qbnd,kbnd->bnqk", query.float(), key.float())
        scores = (scores * self.softmax_scale).masked_fill(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(query.dtype)  # [b, np, sq, sk]
        if self.config.sequence_parallel:
            probs = self.attention_dropout(probs)
        else:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
        context = torch.einsum("bnqk,kbnd->qbnd", probs, value)  # [sq, b, np, hn]
        return context.reshape(sq, b, np_ * hn)
