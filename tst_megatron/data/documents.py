"""Document boundaries inside a sample window: ``--reset-position-ids``, ``--reset-attention-mask``
and ``--eod-mask-loss``, in every TST layout.

A window concatenates documents, each ending with the EOD token. Token ``j`` belongs to
document ``doc[j]`` = the number of EODs before it, so an EOD belongs to the document it ends
(Megatron-Core's `gpt_dataset._get_ltor_masks_and_position_ids`, which this reproduces
exactly for standard ``L+1`` windows). Every latent position ``p`` has an *anchor*, the last
data token of its input, and belongs to the anchor's document:

- token inputs (standard, output-only): the anchor of position ``t`` is token ``t``;
- bag inputs (full, input-only): the anchor of bag ``i`` is its last token ``(i+1)*s - 1``.

With ``--reset-attention-mask`` a position attends only to earlier positions of its document;
in a bag that spans a boundary the tokens of the earlier document(s) are dropped from the bag
average (``bag_token_mask``), and a target token ``x[j]`` of position ``p`` is kept only when
``doc[j-1] == doc(p)``: targets inside the position's document plus the first token of the next
one, which the EOD predicts in standard training too. With ``--reset-position-ids`` position
ids count from 0 at each document's first latent position. ``--eod-mask-loss`` drops every
target whose preceding data token is the EOD (the first token of each document), which for
standard windows is Megatron-Core's "input token is EOD" loss mask. docs/method.md gives the
reasons for the rule and what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tst_megatron.config import PhaseSpec


@dataclass(frozen=True)
class DocumentMasking:
    """The document flags of one run and the EOD token id."""

    eod: int
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    @property
    def active(self) -> bool:
        return self.reset_position_ids or self.reset_attention_mask


@dataclass
class DocumentLayout:
    """Per-position document facts of a micro-batch.

    document_ids: ``[b, L]`` document of each latent position (non-decreasing along L).
    position_ids: ``[b, L]`` positions restarting at 0 at each document's first position.
    target_keep: the labels' shape (``[b, L]`` or ``[b, L, w]``), False for a target of
        another document.
    bag_token_keep: ``[b, s*L]`` tokens kept in their bag's average (bag inputs only).
    """

    document_ids: torch.Tensor
    position_ids: torch.Tensor
    target_keep: torch.Tensor
    bag_token_keep: torch.Tensor | None


def token_documents(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """``[b, n]`` -> ``[b, n]`` int32 document index of every token (an EOD ends its document)."""
    is_eod = (tokens == eod).int()
    return torch.cumsum(is_eod, dim=1, dtype=torch.int32) - is_eod


def restarted_positions(position_docs: torch.Tensor) -> torch.Tensor:
    """``[b, L]`` non-decreasing document ids -> positions counting from 0 in each document."""
    batch, latent = position_docs.shape
    positions = torch.arange(latent, device=position_docs.device).expand(batch, -1)
    starts_here = torch.ones_like(position_docs, dtype=torch.bool)
    starts_here[:, 1:] = position_docs[:, 1:] != position_docs[:, :-1]
    first = torch.cummax(torch.where(starts_here, positions, 0), dim=1).values
    return positions - first


def eod_target_mask(windows: torch.Tensor, eod: int) -> torch.Tensor:
    """``[b, W]`` per-token target mask for ``--eod-mask-loss``: 0 where the previous token is EOD.

    A target slot inherits its token's entry (`tst_megatron.targets.build_batch`), so the
    prediction made *from* an EOD (the next document's first token) is dropped, as
    Megatron-Core's ``loss_mask[tokens == eod] = 0`` does for standard samples.
    """
    mask = torch.ones_like(windows, dtype=torch.float)
    mask[:, 1:] = (windows[:, :-1] != eod).float()
    return mask


def slot_previous_documents(docs: torch.Tensor, spec: PhaseSpec, latent: int) -> torch.Tensor:
    """Document of the token *before* each target slot, in the labels' shape.

    Target slot ``(i, k)`` holds window token ``(i+1)s + k`` (full), ``(i+1)s`` (input-only),
    ``t + 1 + k`` (output-only) or ``t + 1`` (standard), as `build_batch` lays them out (a
    test ties the two); the previous token is one before. Views of ``docs``, no gather.
    """
    batch, s = docs.shape[0], spec.bag_size
    if spec.is_standard:
        return docs[:, :latent]
    if spec.mode == "output-only":
        return docs[:, : latent + s - 1].unfold(1, s, 1)
    bags = docs[:, s - 1 : s - 1 + s * latent].view(batch, latent, s)
    return bags[..., : spec.target_width]


def document_layout(
    windows: torch.Tensor, spec: PhaseSpec, latent: int, eod: int
) -> DocumentLayout:
    """The `DocumentLayout` of ``[b, spec.window_length(latent)]`` windows."""
    docs = token_documents(windows, eod)
    batch, s = windows.shape[0], spec.input_bag_size
    position_docs = docs[:, s - 1 : s * latent : s]  # the anchors (p+1)s - 1, [b, L]
    position_ids = restarted_positions(position_docs)
    previous = slot_previous_documents(docs, spec, latent)
    target_keep = previous == (position_docs if spec.is_standard else position_docs[..., None])
    bag_token_keep = None
    if s > 1:
        bag_docs = docs[:, : s * latent].view(batch, latent, s)
        bag_token_keep = (bag_docs == position_docs[..., None]).reshape(batch, s * latent)
    return DocumentLayout(position_docs, position_ids, target_keep, bag_token_keep)


def apply_document_masking(
    batch: dict[str, torch.Tensor],
    windows: torch.Tensor,
    spec: PhaseSpec,
    masking: DocumentMasking,
) -> dict[str, torch.Tensor]:
    """Add the document fields to a `build_batch` dict (``batch`` is not modified).

    ``--reset-position-ids`` replaces ``position_ids``; ``--reset-attention-mask`` adds
    ``document_ids`` ``[b, L]`` (the model's attention mask is built from them on the device,
    `tst_megatron.data.masks.attention_mask_from_documents`), multiplies ``loss_mask`` by the
    kept targets and, for bag inputs, adds ``bag_token_mask`` ``[b, s*L]``.
    """
    if not masking.active:
        return batch
    latent = batch["position_ids"].shape[1]
    layout = document_layout(windows, spec, latent, masking.eod)
    out = dict(batch)
    if masking.reset_position_ids:
        out["position_ids"] = layout.position_ids
    if masking.reset_attention_mask:
        out["document_ids"] = layout.document_ids
        out["loss_mask"] = batch["loss_mask"] * layout.target_keep.to(batch["loss_mask"].dtype)
        if layout.bag_token_keep is not None:
            out["bag_token_mask"] = layout.bag_token_keep
    return out


def standard_document_fields(
    tokens: torch.Tensor, masking: DocumentMasking
) -> dict[str, torch.Tensor]:
    """Document fields of standard samples given only their ``[b, L]`` input tokens.

    For validation samples from Megatron-Core's `GPTDataset`: standard targets are never
    dropped by the document rule (``doc[t] == doc(t)``), so the inputs are all it needs.
    """
    if not masking.active:
        return {}
    docs = token_documents(tokens, masking.eod)
    fields = {}
    if masking.reset_position_ids:
        fields["position_ids"] = restarted_positions(docs)
    if masking.reset_attention_mask:
        fields["document_ids"] = docs
    return fields
