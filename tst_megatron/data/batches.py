"""One training step's micro-batches on the host: windows read, laid out, document-masked.

This is what the prefetch thread runs (`tst_megatron.data.prefetch`); the trainer copies
the result to its device. Every data-parallel rank advances the phase's sample count over
the whole global batch and reads only its own rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tst_megatron.config import PhaseSpec
from tst_megatron.data.documents import DocumentMasking, apply_document_masking, eod_target_mask
from tst_megatron.data.prefetch import StepRequest
from tst_megatron.data.samples import TrainingSamples
from tst_megatron.targets import build_batch


@dataclass(frozen=True)
class StepLayout:
    """What does not change between steps: shapes, this rank's share, the masking flags."""

    seq_length: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    eod: int
    eod_mask_loss: bool
    documents: DocumentMasking
    pin_memory: bool = False


def read_step(
    stream: TrainingSamples,
    request: StepRequest,
    layout: StepLayout,
    finish: Callable[[dict, PhaseSpec], dict] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """This rank's ``request.num_microbatches`` micro-batches (dicts of host tensors) of
    ``spec.micro_batch_rows(micro_batch_size)`` model samples each (``s`` times the configured
    micro-batch with the batch fold, whose samples have ``L/s`` latent positions).

    ``finish(sample, spec)`` post-processes each micro-batch (the trainer's context-parallel
    split). With ``layout.pin_memory`` the tensors are pinned for ``non_blocking`` copies.
    """
    spec = request.spec
    rows_per_micro = spec.micro_batch_rows(layout.micro_batch_size)
    per_rank = request.num_microbatches * rows_per_micro
    rows = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
    windows = torch.from_numpy(stream.next_windows(spec, per_rank * layout.dp_size, rows))
    target_mask = eod_target_mask(windows, layout.eod) if layout.eod_mask_loss else None
    batches = []
    for i in range(request.num_microbatches):
        rows_i = slice(i * rows_per_micro, (i + 1) * rows_per_micro)
        sample = build_batch(
            windows[rows_i],
            spec,
            layout.seq_length,
            None if target_mask is None else target_mask[rows_i],
        ).as_dict()
        sample = apply_document_masking(sample, windows[rows_i], spec, layout.documents)
        if finish is not None:
            sample = finish(sample, spec)
        if layout.pin_memory:
            sample = {k: v.pin_memory() for k, v in sample.items()}
        batches.append(sample)
    return batches
