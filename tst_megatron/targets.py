"""Turn token windows into model inputs and targets for one phase.

A window is the ``PhaseSpec.window_length(L)`` consecutive data tokens one sample reads
(``s*(L+1)`` in the bag modes, ``L+s`` for output-only, ``L+1`` for standard training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tst_megatron.config import PhaseSpec, TSTConfigError


@dataclass
class TSTBatch:
    """One micro-batch laid out for the model.

    tokens: ``[b, s*L]`` in the bag modes (full, input-only), else ``[b, L]``.
    position_ids: ``[b, L]`` latent positions ``0..L-1``.
    labels: ``[b, L]`` for standard CE, ``[b, L, s]`` (or ``[b, L, 1]``) for multi-hot CE.
    loss_mask: the labels' shape; 0 drops a target.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {
            "tokens": self.tokens,
            "position_ids": self.position_ids,
            "labels": self.labels,
            "loss_mask": self.loss_mask,
        }


def build_batch(
    windows: torch.Tensor,
    spec: PhaseSpec,
    seq_length: int,
    target_mask: torch.Tensor | None = None,
) -> TSTBatch:
    """Split ``[b, window_length]`` token windows into inputs and targets.

    Args:
        windows: ``[b, spec.window_length(seq_length)]`` int64 token ids.
        spec: the phase's bag size and mode.
        seq_length: L, the context; a sample has ``spec.latent_length(L)`` latent
            positions (L, or L/s with the batch fold).
        target_mask: optional ``[b, window_length]`` per-token mask (0 = never a target,
            e.g. padding or a masked EOD); a target slot inherits the mask of its token.

    Returns:
        full: tokens ``x[:s*L]``, latent position i predicts the next bag
        ``x[(i+1)s:(i+2)s]``. input-only: same tokens, target ``x[(i+1)s]``. output-only:
        tokens ``x[:L]``, position t predicts ``x[t+1:t+s+1]``. s = 1: standard ``[b, L]``
        next-token labels.
    """
    expected = spec.window_length(seq_length)
    if windows.dim() != 2 or windows.shape[1] != expected:
        raise TSTConfigError(
            f"a sample for seq_length={seq_length}, bag size {spec.bag_size}, mode "
            f"{spec.mode!r} needs {expected} tokens; got windows of shape {tuple(windows.shape)}"
        )
    if target_mask is None:
        target_mask = torch.ones_like(windows, dtype=torch.float)
    batch, s, latent = windows.shape[0], spec.bag_size, spec.latent_length(seq_length)
    positions = torch.arange(latent, device=windows.device).unsqueeze(0).expand(batch, -1)

    if spec.is_standard:
        return TSTBatch(windows[:, :-1], positions, windows[:, 1:], target_mask[:, 1:])

    if spec.mode == "output-only":
        tokens = windows[:, :latent]
        labels = windows[:, 1:].unfold(1, s, 1)
        mask = target_mask[:, 1:].unfold(1, s, 1)
    else:
        tokens = windows[:, : s * latent]
        labels = windows[:, s:].reshape(batch, latent, s)
        mask = target_mask[:, s:].reshape(batch, latent, s)
        if spec.mode == "input-only":
            labels, mask = labels[..., :1], mask[..., :1]
    return TSTBatch(tokens, positions, labels.contiguous(), mask.contiguous())
