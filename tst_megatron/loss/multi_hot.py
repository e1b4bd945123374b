"""Phase-1 output side: fused, vocab-parallel multi-hot cross-entropy (MCE).

For logits z of one latent position, its s target tokens y_1..y_s and the normalised target
weights p_k (`normalized_target_weights`: bag-loss weights ``g(k)`` over the unmasked
targets; uniform ``1/s`` by default),

    MCE(z, y) = logsumexp(z) - sum_k p_k z[y_k]
    dMCE/dz   = softmax(z) - sum_k p_k onehot(y_k)

The vocabulary is split across tensor-parallel ranks exactly like Megatron-Core's
`vocab_parallel_cross_entropy`: one all-reduce (MAX) for the logit maximum and one (SUM)
carrying the sum of exponentials together with the s target logits, each of which only
its owning rank contributes. Nothing of shape ``[..., s, V]`` is ever built: the target
logits are gathered with ``gather`` and the gradient is ``softmax`` plus an s-way
``scatter_add_``, so a repeated target adds its mass and a masked target drops out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tst_megatron.loss.target_weights import normalized_target_weights

IGNORE_TARGET = -1
"""Target id of a masked target slot (the model encodes its 3-D loss mask this way)."""


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) in ``group``; (0, 1) for None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def owned_targets(
    targets: torch.Tensor, vocab_start: int, partition_vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local index, owned) of global target ids on the shard ``[vocab_start, +partition)``.

    Masked (negative) and foreign targets get index 0 and ``owned`` False.
    """
    local = targets - vocab_start
    owned = (targets >= 0) & (local >= 0) & (local < partition_vocab)
    return torch.where(owned, local, torch.zeros_like(local)), owned


class _MultiHotCrossEntropy(torch.autograd.Function):
    """Autograd function over ``[L, b, V/TP]`` logits and ``[L, b, s]`` targets."""

    @staticmethod
    def forward(
        ctx,
        vocab_parallel_logits: torch.Tensor,
        targets: torch.Tensor,
        target_probs: torch.Tensor,
        tp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        # Like Megatron's vocab_parallel_cross_entropy, fp32 logits are reused in place to
        # hold exp(z - max) and then the softmax: the loss needs no second V-wide buffer.
        logits = vocab_parallel_logits.float()
        partition_vocab = logits.size(-1)
        tp_rank, tp_size = rank_and_size(tp_group)

        logits_max = logits.max(dim=-1)[0]
        if tp_size > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        logits.sub_(logits_max.unsqueeze(-1))

        local_index, owned = owned_targets(targets, tp_rank * partition_vocab, partition_vocab)
        target_logits = logits.gather(-1, local_index).masked_fill_(~owned, 0.0)

        torch.exp(logits, out=logits)
        sum_exp_and_targets = torch.cat([logits.sum(dim=-1, keepdim=True), target_logits], -1)
        if tp_size > 1:
            dist.all_reduce(sum_exp_and_targets, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, target_logits = sum_exp_and_targets[..., 0], sum_exp_and_targets[..., 1:]

        active = target_probs.sum(dim=-1) > 0
        loss = (torch.log(sum_exp) - (target_probs * target_logits).sum(dim=-1)) * active

        softmax = logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_index, owned, target_probs, active)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_index, owned, target_probs, active = ctx.saved_tensors
        # Positions without weighted targets carry no loss and get no gradient.
        grad = softmax.mul_((grad_loss * active).unsqueeze(-1))
        target_grad = target_probs * grad_loss.unsqueeze(-1) * owned
        grad.scatter_add_(-1, local_index, -target_grad)
        return grad, None, None, None


def multi_hot_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position (weighted) multi-hot cross-entropy over vocab-parallel logits.

    Args:
        logits: ``[L, b, V/TP]`` this rank's vocabulary shard (Megatron layout). fp32
            logits are overwritten in place, as by `vocab_parallel_cross_entropy`.
        targets: ``[b, L, s]`` int64 target token ids (global vocabulary ids); a negative
            id (``IGNORE_TARGET``) marks a masked slot.
        loss_mask: optional ``[b, L, s]``; zero/False drops that target.
        tp_group: the tensor-parallel group the vocabulary is split over; ``None`` when the
            logits hold the whole vocabulary.
        weights: optional ``[s]`` bag-loss weights ``g(1..s)`` of the target slots (None =
            uniform), normalised over each position's unmasked targets.

    Returns:
        ``[b, L]`` fp32: ``-sum_k p_k log softmax(z)[y_k]`` with ``p`` the normalised weights
        of the unmasked targets (0 where no target of positive weight is left).
    """
    check_targets(logits.shape[:2], targets, loss_mask, "logits", "[L, b, V/TP]", logits.dim())
    if loss_mask is not None:
        targets = targets.masked_fill(loss_mask == 0, IGNORE_TARGET)
    targets = targets.transpose(0, 1)
    probs = normalized_target_weights(targets >= 0, weights)
    loss = _MultiHotCrossEntropy.apply(logits, targets, probs, tp_group)
    return loss.transpose(0, 1)


def check_targets(
    leading: torch.Size,
    targets: torch.Tensor,
    loss_mask: torch.Tensor | None,
    name: str,
    layout: str,
    dim: int,
) -> None:
    """Raise ValueError unless ``targets`` is ``[b, L, s]`` for a ``[L, b, ...]`` input."""
    if targets.dim() != 3 or dim != 3:
        raise ValueError(
            f"expected {name} {layout} and targets [b, L, s], got {name} of {dim} dims "
            f"and targets {tuple(targets.shape)}"
        )
    if targets.shape[:2] != (leading[1], leading[0]):
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match {name} [L, b] = {tuple(leading)}: "
            f"expected targets [b, L, s] for {name} {layout}"
        )
    if loss_mask is not None and loss_mask.shape != targets.shape:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must have the targets' shape "
            f"{tuple(targets.shape)}"
        )
