"""The validation loss of a checkpoint, apart from the trainer (``tools/evaluate.py``).

`Evaluator` builds what an evaluation needs and nothing else: the model chunks
(`loop.model_chunks`), the checkpoint's model weights (no optimizer, scheduler, RNG or
data position), the validation micro-batches (`loop.validation_microbatches`), and computes
the loss with the trainer's own path (`loop.validation_loss`: `forward_step`, `loss_func`,
the pipeline schedule), so it is the number the trainer logs for the same weights.
"""

from __future__ import annotations

from argparse import Namespace
from typing import cast

import torch

from tst_megatron.data.builders import check_evaluation_datasets
from tst_megatron.data.documents import DocumentMasking
from tst_megatron.training import checkpointing as ckpt
from tst_megatron.training.loop import (
    loaded_line,
    model_chunks,
    training_tokenizer,
    validation_loss,
    validation_microbatches,
)
from tst_megatron.training.metrics import MetricsLogger
from tst_megatron.training.run_config import from_validated_args


class Evaluator:
    """Model chunks and validation samples of validated ``args`` (``--eval-iters``
    micro-batches of ``--micro-batch-size`` per data-parallel rank), on an initialised
    process group (`loop.initialize_distributed`)."""

    def __init__(self, args: Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer, self.settings = training_tokenizer(from_validated_args(args))
        args.padded_vocab_size = self.settings.model.padded_vocab_size  # read by checkpointing
        data = self.settings.data
        check_evaluation_datasets(data, self.settings.model.padded_vocab_size)  # before the model
        self.metrics = MetricsLogger(
            self.settings.logging,
            self.settings.model,
            self.settings.schedule,
            self.settings.precision,
            0,
        )
        self.chunks = model_chunks(self.settings)
        eod = cast(int, self.tokenizer.eod)  # the training tokenizer requires one
        self.documents = DocumentMasking(eod, data.reset_position_ids, data.reset_attention_mask)

    def load(self, path: str) -> int:
        """Load the model weights of published checkpoint ``path``; returns its iteration.

        Raises:
            CheckpointError: the checkpoint does not fit this model, or cannot be read.
        """
        meta = ckpt.read_checkpoint_meta(path)
        for note in ckpt.check_compatible(self.args, meta, path):
            self.metrics.print(f"note: {note}")
        same_layout = meta["layout"] == ckpt.layout(self.args)
        progress = ckpt.load_checkpoint(self.args, self.chunks, None, None, path, load_rng=False)
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
