"""The validation loss of a checkpoint, apart from the trainer (``tools/evaluate.py``).

`Evaluator` builds what an evaluation needs and nothing else: the model chunks
(`loop.model_chunks`), the checkpoint's model weights (no optimizer, scheduler, RNG or
data position), the validation micro-batches (`loop.validation_microbatches`), and computes
the loss with the trainer's own path (`loop.validation_loss`: `forward_step`, `loss_func`,
the pipeline schedule), so it is the number the trainer logs for the same weights.
"""

from __future__ import annotations

from typing import cast

import torch

from tst_megatron.data.builders import check_evaluation_datasets
from tst_megatron.data.documents import DocumentMasking
from tst_megatron.settings import RunConfig
from tst_megatron.training import checkpointing as ckpt
from tst_megatron.training.loop import (
    loaded_line,
    model_chunks,
    training_tokenizer,
    validation_loss,
    validation_microbatches,
)
from tst_megatron.training.metrics import MetricsLogger


class Evaluator:
    """Model chunks and validation samples of a run's settings (``--eval-iters`` micro-batches
    of ``--micro-batch-size`` per data-parallel rank), on an initialised process group
    (`loop.initialize_distributed`)."""

    def __init__(self, settings: RunConfig) -> None:
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer, self.settings = training_tokenizer(settings)
        run = self.settings
        check_evaluation_datasets(run.data, run.model.padded_vocab_size)  # before the model
        self.metrics = MetricsLogger(run.logging, run.model, run.schedule, run.precision, 0)
        self.chunks = model_chunks(run)
        eod = cast(int, self.tokenizer.eod)  # the training tokenizer requires one
        self.documents = DocumentMasking(
            eod, run.data.reset_position_ids, run.data.reset_attention_mask
        )

    def load(self, path: str) -> int:
        """Load the model weights of published checkpoint ``path``; returns its iteration.

        Raises:
            CheckpointError: the checkpoint does not fit this model, or cannot be read.
        """
        meta = ckpt.read_checkpoint_meta(path)
        run, checkpoint = ckpt.CheckpointedRun.of(self.settings), self.settings.checkpoint
        for note in ckpt.check_compatible(run, checkpoint, meta, path, evaluation_only=True):
            self.metrics.print(f"note: {note}")
        same_layout = meta["layout"] == ckpt.layout(self.settings.parallel)
        progress = ckpt.load_checkpoint(
            run, checkpoint, self.chunks, None, None, path, load_rng=False
        )
        self.metrics.print(loaded_line(path, progress, same_layout, ", model weights only"))
        return progress.iteration

    def evaluate(self) -> float | None:
        """The global mean next-token loss over the validation samples; None without any."""
        run = self.settings
        batches = validation_microbatches(
            run.data, run.schedule.seed, run.model.seq_length, run.batch.micro_batch_size,
            run.logging.eval_iters, self.tokenizer, self.documents, self.device,
        )  # fmt: skip
        if not batches:
            return None
        settings = self.settings
        return validation_loss(
            self.chunks,
            batches,
            settings.model.seq_length,
            settings.batch.micro_batch_size,
            settings.parallel.context_parallel_size,
        )
