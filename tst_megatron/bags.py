"""Phase-1 input side: average the embeddings of each bag of s contiguous tokens."""

from __future__ import annotations

import torch


def average_bags(embeddings: torch.Tensor, bag_size: int) -> torch.Tensor:
    """Mean of each bag of ``bag_size`` consecutive positions.

    Args:
        embeddings: ``[s*L, b, h]`` token embeddings in sequence-first (Megatron) layout.
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
    return bags.float().mean(dim=1).to(embeddings.dtype)


def bag_rows(input_ids: torch.Tensor, bag_size: int) -> torch.Tensor:
    """Re-lay token ids so token k of every bag sits in its own row.

    ``[b, s*L]`` -> ``[b*s, L]`` with row ``j*s + k`` holding token k of each bag of sample j.
    Embedding these rows with latent position ids ``0..L-1`` gives ``[L, b*s, h]``, whose
    view ``[L, b, s, h]`` averages over dim 2 (see `average_bag_rows`). The model's own
    embedding then does the vocab-parallel lookup and the sequence-parallel scatter on the
    latent sequence, so whole bags stay on one rank.
    """
    batch, tokens = input_ids.shape
    if tokens % bag_size:
        raise ValueError(
            f"input of {tokens} tokens per sample is not a whole number of bags of {bag_size}"
        )
    latent = tokens // bag_size
    return input_ids.view(batch, latent, bag_size).transpose(1, 2).reshape(batch * bag_size, latent)


def average_bag_rows(
    row_embeddings: torch.Tensor, bag_size: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[L, b*s, h]`` embeddings of `bag_rows` -> ``[L, b, h]`` bag means (fp32 accumulate).

    ``token_mask`` (``[L, b, s]`` bool, at least one True per bag) restricts each mean to the
    kept tokens (``--reset-attention-mask``: the tokens of the bag's own document).
    """
    latent, rows, hidden = row_embeddings.shape
    bags = row_embeddings.view(latent, rows // bag_size, bag_size, hidden)
    if token_mask is None:
        return bags.float().mean(dim=2).to(row_embeddings.dtype)
    weights = token_mask.to(torch.float32).unsqueeze(-1)  # [L, b, s, 1]
    mean = (bags.float() * weights).sum(dim=2) / weights.sum(dim=2)
    return mean.to(row_embeddings.dtype)
