"""Phase-1 output side: fused, vocab-parallel multi-hot cross-entropy (MCE).

For logits z of one latent position and its s target tokens y_1..y_s,

    MCE(z, y) = logsumexp(z) - (1/s) * sum_k z[y_k]
    dMCE/dz   = softmax(z) - (1/s) * sum_k onehot(y_k)

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

IGNORE_TARGET = -1
"""Target id of a masked target slot (the model encodes its 3-D loss mask this way)."""


class _MultiHotCrossEntropy(torch.autograd.Function):
    """Autograd function over ``[L, b, V/TP]`` logits and ``[L, b, s]`` targets."""

    @staticmethod
    def forward(
        ctx,
        vocab_parallel_logits: torch.Tensor,
        targets: torch.Tensor,
        tp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        # Like Megatron's vocab_parallel_cross_entropy, fp32 logits are reused in place to
        # hold exp(z - max) and then the softmax: the loss needs no second V-wide buffer.
        logits = vocab_parallel_logits.float()
        partition_vocab = logits.size(-1)
        tp_rank, tp_size = _rank_and_size(tp_group)
        vocab_start = tp_rank * partition_vocab

        logits_max = logits.max(dim=-1)[0]
        if tp_size > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        logits.sub_(logits_max.unsqueeze(-1))

        valid = targets >= 0
        local_targets = targets - vocab_start
        owned = valid & (local_targets >= 0) & (local_targets < partition_vocab)
        local_index = torch.where(owned, local_targets, torch.zeros_like(local_targets))
        target_logits = logits.gather(-1, local_index).masked_fill_(~owned, 0.0)

        torch.exp(logits, out=logits)
        sum_exp_and_targets = torch.cat([logits.sum(dim=-1, keepdim=True), target_logits], -1)
        if tp_size > 1:
            dist.all_reduce(sum_exp_and_targets, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, target_logits = sum_exp_and_targets[..., 0], sum_exp_and_targets[..., 1:]

        num_valid = valid.sum(dim=-1)
        inv_num_valid = torch.where(
            num_valid > 0, 1.0 / num_valid.clamp(min=1).float(), torch.zeros_like(sum_exp)
        )
        target_sum = (target_logits * valid).sum(dim=-1)
        loss = (torch.log(sum_exp) - target_sum * inv_num_valid) * (num_valid > 0)

        softmax = logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_index, owned, inv_num_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_index, owned, inv_num_valid = ctx.saved_tensors
        # Positions whose targets are all masked carry no loss and get no gradient.
        grad = softmax.mul_((grad_loss * (inv_num_valid > 0)).unsqueeze(-1))
        target_weight = (grad_loss * inv_num_valid).unsqueeze(-1) * owned
        grad.scatter_add_(-1, local_index, -target_weight)
        return grad, None, None


def multi_hot_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-position multi-hot cross-entropy over vocab-parallel logits.

    Args:
        logits: ``[L, b, V/TP]`` this rank's vocabulary shard (Megatron layout). fp32
            logits are overwritten in place, as by `vocab_parallel_cross_entropy`.
        targets: ``[b, L, s]`` int64 target token ids (global vocabulary ids); a negative
            id (``IGNORE_TARGET``) marks a masked slot.
        loss_mask: optional ``[b, L, s]``; zero/False drops that target.
        tp_group: the tensor-parallel group the vocabulary is split over; ``None`` when the
            logits hold the whole vocabulary.

    Returns:
        ``[b, L]`` fp32: the mean over unmasked targets of ``-log softmax(z)[y_k]``
        (0 where every target of a position is masked).
    """
    if targets.dim() != 3 or logits.dim() != 3:
        raise ValueError(
            f"expected logits [L, b, V/TP] and targets [b, L, s], got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if targets.shape[:2] != (logits.shape[1], logits.shape[0]):
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}: "
            "expected targets [b, L, s] for logits [L, b, V/TP]"
        )
    if loss_mask is not None:
        if loss_mask.shape != targets.shape:
            raise ValueError(
                f"loss_mask {tuple(loss_mask.shape)} must have the targets' shape "
                f"{tuple(targets.shape)}"
            )
        targets = targets.masked_fill(loss_mask == 0, IGNORE_TARGET)
    loss = _MultiHotCrossEntropy.apply(logits, targets.transpose(0, 1), tp_group)
    return loss.transpose(0, 1)


def _rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
