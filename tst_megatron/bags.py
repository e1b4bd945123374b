"""Phase-1 input side: average the embeddings of each bag of s contiguous tokens."""

from __future__ import annotations

import torch


def average_bags(embeddings: torch.Tensor, bag_size: int) -> torch.Tensor:
    """Mean of each bag of ``bag_size`` consecutive positions, sequence-first layout.

    Args:
        embeddings: ``[s*L, b, h]`` token embeddings (Megatron layout).
        bag_size: s >= 1; the sequence length must be a multiple of it.

    Returns:
        ``[L, b, h]``: position i holds ``mean(embeddings[i*s:(i+1)*s])``, accumulated in fp32
        and returned in the input dtype.
    """
    if bag_size < 1:
        raise ValueError(f"bag_size must be >= 1, got {bag_size}")
    tokens, batch, hidden = embeddings.shape
    if tokens % bag_size:
        raise ValueError(
            f"sequence of {tokens} embeddings is not a whole number of bags of {bag_size}"
        )
    if bag_size == 1:
        return embeddings
    bags = embeddings.view(tokens // bag_size, bag_size, batch, hidden)
    return _fp32_mean(bags, dim=1).to(embeddings.dtype)


def average_bags_batch_first(
    embeddings: torch.Tensor, bag_size: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[b, s*L, h]`` token embeddings -> ``[b, L, h]`` bag means (fp32 accumulate).

    The sum runs in fp32 without an fp32 copy of the ``s*L`` embeddings. ``token_mask``
    (``[b, s*L]`` bool, at least one True per bag) restricts each mean to the kept tokens
    (``--reset-attention-mask``: the tokens of the bag's own document).
    """
    batch, tokens, hidden = embeddings.shape
    if tokens % bag_size:
        raise ValueError(
            f"input of {tokens} tokens per sample is not a whole number of bags of {bag_size}"
        )
    bags = embeddings.view(batch, tokens // bag_size, bag_size, hidden)
    if token_mask is None:
        return _fp32_mean(bags, dim=2).to(embeddings.dtype)
    keep = token_mask.view(batch, tokens // bag_size, bag_size)
    total = bags.masked_fill(~keep.unsqueeze(-1), 0).sum(dim=2, dtype=torch.float32)
    count = keep.sum(dim=2, keepdim=True, dtype=torch.float32)
    return total.div_(count).to(embeddings.dtype)


def _fp32_mean(bags: torch.Tensor, dim: int) -> torch.Tensor:
    return bags.sum(dim=dim, dtype=torch.float32).div_(bags.shape[dim])
