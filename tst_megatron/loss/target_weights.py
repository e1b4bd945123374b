"""Per-target weights of the multi-hot targets and the entropy of the target distribution.

Position i of a phase-1 sample has s targets ``y_1..y_s`` (the next bag). The bag-loss
weighting (`tst_megatron.config.bag_weights`) gives target k the weight ``g(k)``; masked
targets drop out and the rest are normalised per position:

    p_k = g(k) * valid_k / sum_j g(j) * valid_j        (0 for every k if the sum is 0)

``p`` is the target distribution of the position (a token repeated in the bag gets its mass
added). Its entropy ``H(p)`` is the floor of the multi-hot cross-entropy (``log s`` for s
distinct tokens under uniform weights), so ``MCE - H(p)`` is the KL form of the loss, whose
floor is 0 as for next-token cross-entropy.
"""

from __future__ import annotations

import torch


def normalized_target_weights(valid: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``[..., s]`` fp32 target distribution ``p`` from the valid-target mask.

    Args:
        valid: ``[..., s]`` bool, True where the target takes part in the loss.
        weights: ``[s]`` bag-loss weights ``g(1..s)`` (None = uniform).
    """
    mass = valid.float()
    if weights is not None:
        if weights.shape != valid.shape[-1:]:
            raise ValueError(
                f"weights {tuple(weights.shape)} must hold one weight per target, "
                f"[{valid.shape[-1]}]"
            )
        mass = mass * weights.to(device=valid.device, dtype=torch.float32)
    total = mass.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def positions_with_targets(loss_mask: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``[b, L]`` float: 1 where a position has targets of positive weight.

    Args:
        loss_mask: ``[b, L, s]`` per-target mask (0 drops a target).
        weights: ``[s]`` bag-loss weights (None = uniform).
    """
    return (normalized_target_weights(loss_mask != 0, weights).sum(dim=-1) > 0).float()


def target_entropy(
    targets: torch.Tensor, loss_mask: torch.Tensor | None, weights: torch.Tensor | None
) -> torch.Tensor:
    """``[b, L]`` fp32 entropy of each position's target distribution (0 if fully masked).

    Args:
        targets: ``[b, L, s]`` target ids; a negative id is a masked target.
        loss_mask: optional ``[b, L, s]``; 0 drops a target.
        weights: ``[s]`` bag-loss weights (None = uniform).
    """
    valid = targets >= 0
    if loss_mask is not None:
        valid = valid & (loss_mask != 0)
    p = normalized_target_weights(valid, weights)
    # mass of each target's token: sum_j p_j [y_j == y_k] (repeats share one outcome)
    same = targets.unsqueeze(-1) == targets.unsqueeze(-2)
    token_mass = (same.float() * p.unsqueeze(-2)).sum(dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    log_mass = torch.where(p > 0, torch.log(token_mass.clamp(min=tiny)), 0.0)
    return -(p * log_mass).sum(dim=-1)
