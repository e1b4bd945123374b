"""`TSTGPTModel`: Megatron-Core's `GPTModel` with the two TST hooks and nothing else.

Why a subclass rather than a wrapper: both hooks sit on seams `GPTModel` already has —
the ``decoder_input`` argument of `GPTModel.forward` (input side) and
`compute_language_model_loss` (output side) — so the pipeline schedules, DDP, the
distributed optimizer and `dist_checkpointing` see an ordinary `GPTModel`. The subclass
adds no parameters or buffers: its ``state_dict`` and ``sharded_state_dict`` keys are
exactly stock `GPTModel`'s, so any checkpoint it writes loads into plain Megatron-Core.

What a forward does depends on `phase_spec` (set with `set_phase`):
- standard (s = 1, phase 2, baseline): exactly `GPTModel.forward`.
- bag input (modes full, input-only): on the first pipeline stage, the ``[b, s*L]`` token
  ids are embedded by the model's own (vocab-parallel, sequence-parallel) embedding at
  latent positions ``0..L-1`` and averaged per bag into the ``[L, b, h]`` decoder input
  (``[L/TP, b, h]`` under sequence parallel). Later stages receive hidden states as usual.
- multi-hot targets (modes full, output-only; ``labels`` of shape ``[b, L, s]``): the loss
  is `tst_megatron.loss.multi_hot_cross_entropy` on the vocab-parallel logits.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from tst_megatron.bags import average_bag_rows, bag_rows
from tst_megatron.config import STANDARD_PHASE, PhaseSpec, TSTConfigError
from tst_megatron.loss import IGNORE_TARGET, multi_hot_cross_entropy


class TSTGPTModel(GPTModel):
    """A `GPTModel` (dense or MoE, local or Transformer Engine spec) that can run TST."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.phase_spec: PhaseSpec = STANDARD_PHASE

    def set_phase(self, spec: PhaseSpec) -> None:
        """Switch how inputs and labels are interpreted; weights are untouched."""
        if not spec.is_standard and getattr(self.config, "mtp_num_layers", None):
            raise TSTConfigError(
                "TST phase 1 replaces the next-token target; it cannot be combined with "
                f"multi-token prediction (mtp_num_layers={self.config.mtp_num_layers})"
            )
        self.phase_spec = spec

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *args,
        loss_mask: torch.Tensor | None = None,
        bag_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`GPTModel.forward` plus the TST hooks.

        Args:
            input_ids: ``[b, s*L]`` in a bag phase, else ``[b, L]``.
            position_ids: ``[b, L]`` latent positions.
            labels: ``[b, L]`` (standard) or ``[b, L, s]`` (multi-hot).
            loss_mask: with multi-hot labels, ``[b, L, s]`` per-target mask.
            bag_token_mask: ``[b, s*L]`` bool, the tokens each bag averages
                (``--reset-attention-mask``, `tst_megatron.data.documents`); None = all.

        Returns:
            Per-position loss ``[b, L]`` when labels are given, else logits ``[b, L, V/TP]``.
        """
        bag_size = self.phase_spec.input_bag_size
        if bag_size > 1 and decoder_input is None and self.pre_process:
            decoder_input = self.embed_bags(input_ids, position_ids, bag_size, bag_token_mask)
        if labels is not None and labels.dim() == 3:
            if loss_mask is not None:
                labels = labels.masked_fill(loss_mask == 0, IGNORE_TARGET)
            loss_mask = None
        return super().forward(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input,
            labels,
            *args,
            loss_mask=loss_mask,
            **kwargs,
        )

    def embed_bags(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        bag_size: int,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[b, s*L]`` token ids -> ``[L, b, h]`` bag-averaged embeddings.

        Under sequence parallel the result is this rank's ``[L/TP, b, h]`` shard: the
        embedding scatters the latent sequence, so every bag is averaged on one rank.
        ``token_mask`` ``[b, s*L]`` (bool) limits each average to the kept tokens.
        """
        latent = input_ids.shape[1] // bag_size
        tp_size = self.config.tensor_model_parallel_size
        if self.config.sequence_parallel and latent % tp_size:
            raise TSTConfigError(
                f"sequence parallel splits the {latent} latent positions of this sample over "
                f"tensor-parallel size {tp_size}; the latent sequence length must be a "
                "multiple of it"
            )
        rows = bag_rows(input_ids, bag_size)
        row_positions = None
        if position_ids is not None:
            row_positions = position_ids.repeat_interleave(bag_size, dim=0)
        row_embeddings = self.embedding(input_ids=rows, position_ids=row_positions)
        local_mask = self._local_bag_mask(token_mask, bag_size, row_embeddings.shape[0])
        return average_bag_rows(row_embeddings, bag_size, local_mask)

    def _local_bag_mask(
        self, token_mask: torch.Tensor | None, bag_size: int, local_latent: int
    ) -> torch.Tensor | None:
        """``[b, s*L]`` -> ``[L_local, b, s]``, this rank's latent rows under sequence parallel
        (the embedding scatters the latent sequence over the tensor-parallel group)."""
        if token_mask is None:
            return None
        per_bag = token_mask.view(token_mask.shape[0], -1, bag_size).transpose(0, 1)
        if per_bag.shape[0] != local_latent:
            start = torch.distributed.get_rank(group=self.tp_group) * local_latent
            per_bag = per_bag[start : start + local_latent]
        return per_bag

    def compute_language_model_loss(
        self, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """Standard CE for ``[b, L]`` labels; multi-hot CE for ``[b, L, s]`` labels.

        Args:
            labels: ``[b, L]`` or ``[b, L, s]`` (masked targets set to ``IGNORE_TARGET``).
            logits: ``[L, b, V/TP]`` vocab-parallel logits.

        Returns:
            ``[b, L]`` per-position loss.
        """
        if labels.dim() == 2:
            return super().compute_language_model_loss(labels, logits)
        return multi_hot_cross_entropy(logits, labels, tp_group=self.tp_group)
