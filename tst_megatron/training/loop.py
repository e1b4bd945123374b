"""The pre-training loop: Megatron-Core schedules, DDP, optimizer, checkpoints, TST phases.

Only the loop and what TST needs are written here; every parallel mechanism is mcore's:
`get_forward_backward_func` (1F1B / interleaved pipeline), `DistributedDataParallel` (or
FSDP, `data_parallel`),
`get_megatron_optimizer` (ZeRO-1 with ``--use-distributed-optimizer``),
`OptimizerParamScheduler`, the num-microbatches calculator and `dist_checkpointing`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import Any, cast

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.distributed import finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    get_num_microbatches,
    init_num_microbatches_calculator,
    update_num_microbatches,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import get_model_config

from tst_megatron.config import STANDARD_PHASE, PhaseSpec
from tst_megatron.data.batches import StepLayout, read_step
from tst_megatron.data.builders import build_train_samples, build_valid_dataset, mock_valid_windows
from tst_megatron.data.documents import (
    DocumentMasking,
    apply_document_masking,
    eod_target_mask,
    standard_document_fields,
)
from tst_megatron.data.masks import attention_mask_from_documents
from tst_megatron.data.prefetch import StepPrefetcher, StepRequest
from tst_megatron.data.tokenizer import (
    Tokenizer,
    TokenizerSpec,
    build_training_tokenizer,
    model_vocab_size,
)
from tst_megatron.loss import positions_with_targets, target_entropy
from tst_megatron.mcore_compat import batch_on_this_cp_rank
from tst_megatron.model import TSTGPTModel
from tst_megatron.planning import footprint
from tst_megatron.planning.memory import MemorySettings
from tst_megatron.settings import (
    BatchConfig,
    DataConfig,
    KernelsConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    ReliabilityConfig,
    RunConfig,
)
from tst_megatron.targets import build_batch
from tst_megatron.training import checkpointing as ckpt
from tst_megatron.training import data_parallel, fault_injection, placement, precision
from tst_megatron.training.faults import BadStepGuard, ExitRequests, TrainingStopped, check_step
from tst_megatron.training.manual_gc import ManualGarbageCollection
from tst_megatron.training.metrics import MetricsLogger
from tst_megatron.training.model_builder import build_model, transformer_config
from tst_megatron.training.moe_metrics import MoEStepMetrics
from tst_megatron.training.optimizer import build_optimizer, build_scheduler, describe_kernels
from tst_megatron.training.timers import StepTimers, attach_timers

# Megatron-LM reports the measured memory after the second step, which includes the optimizer
# state (Adam's moments are allocated at the first step).
MEASURE_MEMORY_AFTER_STEPS = 2


def initialize_distributed(
    parallel: ParallelConfig, batch: BatchConfig, reliability: ReliabilityConfig, seed: int
) -> None:
    """Process group, model-parallel groups, seeds and the micro-batch calculator.

    On CUDA, first this rank's device (`placement.set_cuda_device`; the entry point checked the
    environment Megatron-LM requires, ``CUDA_DEVICE_MAX_CONNECTIONS``). Collectives time out
    after ``--collective-timeout-s`` when given, else ``--distributed-timeout-minutes``.
    """
    if not torch.cuda.is_available():
        from tst_megatron.cpu.shim import install_cpu_shim

        install_cpu_shim()
    timeout = (
        timedelta(seconds=reliability.collective_timeout_s)
        if reliability.collective_timeout_s
        else timedelta(minutes=parallel.distributed_timeout_minutes)
    )
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            placement.set_cuda_device()
        torch.distributed.init_process_group(parallel.distributed_backend, timeout=timeout)
    ps.initialize_model_parallel(
        # mcore's own groups (data, tensor, pipeline, ...) otherwise wait 30 minutes
        distributed_timeout_minutes=timeout.total_seconds() / 60,
        **parallel.mcore_sizes(),
    )
    rank_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(rank_seed)
    init_num_microbatches_calculator(
        torch.distributed.get_rank(),
        list(batch.rampup_batch_size) if batch.rampup_batch_size else None,
        batch.global_batch_size,
        batch.micro_batch_size,
        ps.get_data_parallel_world_size(),
        decrease_batch_size_if_needed=False,
    )


def shutdown_distributed() -> None:
    """Tear down what `initialize_distributed` set up (model-parallel groups, process group)."""
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def build_model_chunks(
    config: TransformerConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    precision_config: PrecisionConfig,
    kernels: KernelsConfig,
    *,
    document_attention: bool,
    checkpointed: bool,
) -> list[torch.nn.Module]:
    """One `TSTGPTModel` per virtual pipeline stage on this rank, in its data-parallel wrapper
    (DDP, torch FSDP2 or Megatron-FSDP: `tst_megatron.training.data_parallel`).

    ``config`` is `model_builder.transformer_config` of the same sections; it gets the
    gradient hooks. ``document_attention``: ``--reset-attention-mask``; ``checkpointed``:
    ``--save`` or ``--load``.
    """
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = build_model(
            model,
            kernels,
            config,
            document_attention=document_attention,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        # Megatron-LM: FSDP2 moves CPU-initialised parameters to the GPU shard by shard
        if torch.cuda.is_available() and not (
            parallel.use_torch_fsdp2 and kernels.use_cpu_initialization
        ):
            chunk.cuda(torch.cuda.current_device())
        wrapped = precision.wrap_model_chunk(chunk, config)
        chunks.append(
            data_parallel.wrap_chunk(
                parallel, precision_config, config, wrapped, vp_stage, checkpointed=checkpointed
            )
        )
    if parallel.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return chunks


unwrap = precision.unwrap


def tst_model(chunk: torch.nn.Module) -> TSTGPTModel:
    """The `TSTGPTModel` inside ``chunk``'s wrappers (`data_parallel.wrap_chunk`)."""
    return cast("TSTGPTModel", unwrap(chunk))


def loss_func(
    position_mask: torch.Tensor,
    output: torch.Tensor,
    per_token: bool = False,
    target_entropy: torch.Tensor | None = None,
):
    """Mean loss over the unmasked positions of the micro-batch, global over context parallel.

    Args:
        position_mask: ``[b, L/CP]`` 1 where the position has at least one unmasked target.
        output: ``[b, L/CP]`` per-position loss from the model.
        per_token: ``--calculate-per-token-loss`` (see `per_token_loss`).
        target_entropy: TST multi-hot phases: ``[b, L/CP]`` entropy of each position's
            target distribution, reported (its sum over the positions of ``"lm loss"``)
            as ``"target entropy"`` for the KL form of the loss (`check_step`).

    Returns the legacy 2-tuple: mcore's schedule multiplies the loss by the CP size and
    divides it by the number of micro-batches, and DDP averages gradients over DP x CP.
    """
    mask = position_mask.reshape(-1).float()
    sums = [(output.float().reshape(-1) * mask).sum(), mask.sum()]
    if target_entropy is not None:
        sums.append((target_entropy.reshape(-1) * mask).sum())
    total = torch.stack(sums)
    if per_token:
        return per_token_loss(total)
    if ps.get_context_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=ps.get_context_parallel_group())
    loss = total[0] / total[1].clamp(min=1)
    return loss, _loss_report(total.detach().clone())


def per_token_loss(total: torch.Tensor):
    """``--calculate-per-token-loss``: Megatron-LM's 3-tuple ``(sum, count, report)``.

    ``total`` is ``[loss sum, loss tokens]`` (+ the target entropy sum) of this rank's share of
    the micro-batch (a token is a position with an unmasked target; in TST phase 1 a latent
    position, whose loss is the multi-hot CE over its unmasked target slots). The schedule
    leaves the sum alone and passes the step's token count to `finalize_model_grads`, which
    sums it over data and context parallel and divides the gradients by it: the step minimises
    the global sum over the global token count. The report is summed over context parallel
    for logging.
    """
    report = total.detach().clone()
    if ps.get_context_parallel_world_size() > 1:
        torch.distributed.all_reduce(report, group=ps.get_context_parallel_group())
    return total[0], total[1].detach().to(torch.int), _loss_report(report)


def _loss_report(total: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"lm loss": [sum, count]}`` and, with a third entry, ``{"target entropy": [sum]}``
    (summed over the same positions, so `check_step` divides it by the same count)."""
    report = {"lm loss": total[:2]}
    if total.numel() > 2:
        report["target entropy"] = total[2:]
    return report


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    mask = batch["loss_mask"]
    position_mask, entropy = mask, None
    if mask.dim() == 3:  # TST multi-hot targets: weighted positions, entropy for the KL form
        weights = _target_weights(model, mask.device)
        position_mask = positions_with_targets(mask, weights)
        if mask.shape[-1] > 1:
            entropy = target_entropy(batch["labels"], mask, weights)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        document_attention_mask(batch),
        labels=batch["labels"],
        loss_mask=mask,
        **bag_token_kwargs(batch),
    )
    per_token = get_model_config(model).calculate_per_token_loss
    return output, partial(loss_func, position_mask, per_token=per_token, target_entropy=entropy)


def document_attention_mask(batch: dict) -> torch.Tensor | None:
    """``--reset-attention-mask``: the ``[b, 1, L, L]`` mask (True = masked), built here on the
    device from the batch's ``[b, L]`` document ids; None (causal) otherwise."""
    document_ids = batch.get("document_ids")
    return None if document_ids is None else attention_mask_from_documents(document_ids)


def bag_token_kwargs(batch: dict) -> dict:
    """The bag-average token mask for `TSTGPTModel.forward`, when the batch has one."""
    mask = batch.get("bag_token_mask")
    return {} if mask is None else {"bag_token_mask": mask}


def _target_weights(model, device: torch.device) -> torch.Tensor | None:
    """The phase's bag-loss weights of a (DDP-wrapped) `TSTGPTModel`; None = uniform."""
    target_weights = getattr(unwrap(model), "target_weights", None)
    return None if target_weights is None else target_weights(device)


def split_for_context_parallel(batch: dict, bag_size: int) -> dict:
    """This CP rank's share of latent positions (Megatron's load-balanced 2*CP chunks).

    Bag-mode tokens ``[b, s*L]`` are split as ``[b, L, s]`` so whole bags move together.
    """
    if ps.get_context_parallel_world_size() == 1:
        return batch
    tokens = batch["tokens"]
    b = tokens.shape[0]
    shaped = {**batch, "tokens": tokens.view(b, -1, bag_size)}
    local = batch_on_this_cp_rank(shaped, ps.get_context_parallel_group())
    local["tokens"] = local["tokens"].reshape(b, -1)
    return local


def run_schedule(
    chunks: list[torch.nn.Module],
    batches: list[dict],
    forward_only: bool,
    seq_length: int,
    micro_batch_size: int,
    context_parallel_size: int,
    step_func=forward_step,
    spec: PhaseSpec = STANDARD_PHASE,
) -> list[dict]:
    """The pipeline schedule over ``batches``; its p2p shapes follow the phase's fold
    (``L/s`` latent positions and ``s*b`` samples per micro-batch with the batch fold)."""
    iterators = [iter(batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=step_func,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=spec.latent_length(seq_length) // context_parallel_size,
        micro_batch_size=spec.micro_batch_rows(micro_batch_size),
        forward_only=forward_only,
    )


def validation_loss(
    chunks: list[torch.nn.Module],
    batches: list[dict],
    seq_length: int,
    micro_batch_size: int,
    context_parallel_size: int,
) -> float:
    """Global mean next-token loss of the validation ``batches`` (`validation_microbatches`):
    the chunks in the standard (phase-2) view and eval mode, forward only; the chunks are left
    in train mode and the standard view (the caller restores its phase)."""
    for chunk in chunks:
        tst_model(chunk).set_phase(STANDARD_PHASE)
        chunk.eval()
    with torch.no_grad():
        outputs = run_schedule(
            chunks, batches, True, seq_length, micro_batch_size, context_parallel_size
        )
    for chunk in chunks:
        chunk.train()
    return _reduce_lm_loss(outputs)


def validation_microbatches(
    data: DataConfig,
    seed: int,
    seq_length: int,
    micro_batch_size: int,
    eval_iters: int,
    tokenizer: Tokenizer,
    documents: DocumentMasking,
    device: torch.device,
) -> list[dict]:
    """This data-parallel rank's ``eval_iters`` validation micro-batches on ``device``
    (``[mbs, L]`` tensors, split for context parallelism): ``--mock-data`` windows or the
    validation `GPTDataset`; empty when there is no validation data."""
    mbs, dp_size = micro_batch_size, ps.get_data_parallel_world_size()
    per_rank = eval_iters * mbs
    total = per_rank * dp_size
    first = ps.get_data_parallel_rank() * per_rank
    if data.mock_data:
        windows = mock_valid_windows(tokenizer, seed, total, seq_length + 1)
        target_mask = eod_target_mask(windows, documents.eod) if data.eod_mask_loss else None
        samples = [
            apply_document_masking(
                build_batch(
                    windows[first + i : first + i + 1],
                    STANDARD_PHASE,
                    seq_length,
                    None if target_mask is None else target_mask[first + i : first + i + 1],
                ).as_dict(),
                windows[first + i : first + i + 1],
                STANDARD_PHASE,
                documents,
            )
            for i in range(per_rank)
        ]
    else:
        dataset = build_valid_dataset(data, seed, seq_length, tokenizer, total)
        if dataset is None:
            return []
        samples = []
        for i in range(per_rank):
            item = dataset[first + i]
            samples.append(
                {
                    "tokens": torch.as_tensor(item["tokens"]).long().unsqueeze(0),
                    "position_ids": torch.as_tensor(item["position_ids"]).long().unsqueeze(0),
                    "labels": torch.as_tensor(item["labels"]).long().unsqueeze(0),
                    "loss_mask": torch.as_tensor(item["loss_mask"]).float().unsqueeze(0),
                }
            )
            samples[-1].update(standard_document_fields(samples[-1]["tokens"], documents))
    batches = []
    for start in range(0, per_rank, mbs):
        group = samples[start : start + mbs]
        batch = {k: torch.cat([g[k] for g in group]) for k in group[0]}
        batch = split_for_context_parallel(batch, 1)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def loaded_line(path: str, progress: ckpt.TrainingProgress, same_layout: bool, extra: str) -> str:
    """The log line of a loaded checkpoint (``extra``: what else was loaded, e.g. the
    optimizer state's format)."""
    return (
        f"loaded checkpoint {path} at iteration {progress.iteration} (phase {progress.phase}, "
        f"layout {'unchanged' if same_layout else 'changed: resharded'}{extra})"
    )


def training_tokenizer(run: RunConfig) -> tuple[Tokenizer, RunConfig]:
    """The run's tokenizer and ``run`` with the model's vocabulary padded for it (the
    tokenizer's or ``--vocab-size``, to a multiple of ``--make-vocab-size-divisible-by`` x TP)."""
    model = run.model
    tokenizer = build_training_tokenizer(TokenizerSpec.from_settings(run.data, model.vocab_size))
    padded = model_vocab_size(
        tokenizer,
        model.vocab_size,
        model.make_vocab_size_divisible_by,
        run.parallel.tensor_model_parallel_size,
    )
    return tokenizer, run.with_padded_vocab_size(padded)


def run_transformer_config(run: RunConfig) -> TransformerConfig:
    """The `TransformerConfig` of ``run``'s sections (`model_builder.transformer_config`)."""
    return transformer_config(
        run.model,
        run.parallel,
        run.precision,
        run.kernels,
        run.recompute,
        calculate_per_token_loss=run.batch.calculate_per_token_loss,
        barrier_with_L1_time=run.logging.barrier_with_L1_time,
    )


def whole_model(run: RunConfig, config: TransformerConfig) -> TSTGPTModel:
    """The whole model of ``run`` (first and last pipeline stage) in one process, unwrapped
    (conversion, tests); ``config``: `run_transformer_config`."""
    return build_model(
        run.model,
        run.kernels,
        config,
        document_attention=run.data.reset_attention_mask,
        pre_process=True,
        post_process=True,
    )


def model_chunks(run: RunConfig) -> list[torch.nn.Module]:
    """`build_model_chunks` of ``run`` (its padded vocabulary set: `training_tokenizer`)."""
    return build_model_chunks(
        run_transformer_config(run),
        run.model,
        run.parallel,
        run.precision,
        run.kernels,
        document_attention=run.data.reset_attention_mask,
        checkpointed=bool(run.checkpoint.save or run.checkpoint.load),
    )


class Trainer:
    """State of one run: model chunks, optimizer, data stream, counters."""

    def __init__(
        self,
        settings: RunConfig,
        checkpoints: ckpt.Checkpointer | None = None,
        startup_notes: Sequence[str] = (),
    ) -> None:
        """``settings``: the run's (`run_config.resolve`), on an initialised process group
        (`initialize_distributed`). ``checkpoints``: the job's `Checkpointer`, opened by the
        entry point (default: one of this run's checkpoint settings, not opened: saves without
        the ``--save`` lock). ``startup_notes``: what validation noticed, logged first."""
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer, self.settings = training_tokenizer(settings)
        run = self.settings
        data = run.data
        eod = self.tokenizer.eod
        assert eod is not None  # build_training_tokenizer refuses a tokenizer without one
        self.documents = DocumentMasking(eod, data.reset_position_ids, data.reset_attention_mask)
        self.step_layout = StepLayout(
            seq_length=run.model.seq_length,
            micro_batch_size=run.batch.micro_batch_size,
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            eod=eod,
            eod_mask_loss=data.eod_mask_loss,
            documents=self.documents,
            pin_memory=self.device.type == "cuda",
        )
        self.stream = StepPrefetcher(
            build_train_samples(data, run.schedule, run.batch, run.tst, run.model, self.tokenizer),
            self._host_microbatches,
            data.num_workers,
        )
        self.chunks = model_chunks(run)
        self.optimizer = build_optimizer(
            run.optimizer, run.schedule, run.precision, run.parallel, self.chunks
        )
        precision.attach_loss_scale(self.chunks, self.optimizer)
        self.scheduler = build_scheduler(run.optimizer, run.schedule, run.batch, self.optimizer)
        self.checkpoints = checkpoints or ckpt.Checkpointer(run.checkpoint)
        self.phase1_iters = run.tst.phase1_iterations(run.schedule.train_iters)
        self.progress = ckpt.TrainingProgress(0, 0, 1 if self.phase1_iters else 2, {})
        self.guard = BadStepGuard(run.reliability.max_bad_steps)
        self.exits = ExitRequests(run.reliability)
        self.metrics = MetricsLogger(
            run.logging,
            run.model,
            run.schedule,
            run.precision,
            self.phase1_iters,
            wandb_config=run.to_dict(),
        )
        self._valid: list[dict] | None = None
        self.timers = StepTimers(run.logging)
        attach_timers(self.timers, get_model_config(self.chunks[0]), self.optimizer)
        self.metrics.attach_timers(self.timers)
        self.moe = MoEStepMetrics(run.model, self.chunks) if run.model.moe else None
        self.gc = ManualGarbageCollection(run.reliability)
        if run.reliability.manual_gc:
            self.metrics.print(self.gc.describe())
        for note in startup_notes:
            self.metrics.print(note)
        self.metrics.print(
            f"transformer impl: {run.kernels.transformer_impl}; optimizer kernel: "
            f"{describe_kernels(self.optimizer)} (Megatron-Core uses Transformer Engine or apex "
            "fused Adam when installed, torch otherwise)"
        )

    # --- phases -------------------------------------------------------------------------
    def phase_spec(self, phase: int) -> PhaseSpec:
        return self.settings.tst.phase_spec(phase)

    def set_phase(self, phase: int) -> None:
        self.progress.phase = phase
        for chunk in self.chunks:
            tst_model(chunk).set_phase(self.phase_spec(phase))

    def last_iteration(self) -> int:
        """Where this invocation stops: end of phase 1 for ``--tst-phase 1``."""
        if self.settings.schedule.tst_phase == "1":
            return self.phase1_iters
        return self.settings.schedule.train_iters

    # --- checkpoints --------------------------------------------------------------------
    def maybe_load(self) -> None:
        checkpoint = self.settings.checkpoint
        if not checkpoint.load:
            if self.settings.schedule.tst_phase == "2":
                raise ckpt.CheckpointError("--tst-phase 2 needs --load of a phase-1 checkpoint")
            return
        path = ckpt.find_checkpoint(checkpoint.load)
        if path is None:
            if checkpoint.allow_fresh_start:
                self.metrics.print(f"no checkpoint under --load {checkpoint.load}; starting fresh")
                return
            raise ckpt.CheckpointError(
                f"--load {checkpoint.load}: no checkpoint found (no {ckpt.TRACKER} and no "
                f"{ckpt.META}); pass --allow-fresh-start to start from scratch"
            )
        meta = ckpt.read_checkpoint_meta(path)
        run = ckpt.CheckpointedRun.of(self.settings)
        for note in ckpt.check_compatible(run, checkpoint, meta, path):
            self.metrics.print(f"note: {note}")
        same_layout = meta["layout"] == ckpt.layout(self.settings.parallel)
        self.timers("load-checkpoint", log_level=0).start(barrier=True)
        self.progress = ckpt.load_checkpoint(
            run, checkpoint, self.chunks, self.optimizer, self.scheduler, path, same_layout
        )
        self.timers("load-checkpoint").stop(barrier=True)
        self.metrics.checkpoint_time(self.progress.iteration, "load-checkpoint")
        if self.progress.data_state:
            self.stream.load_state(self.progress.data_state)
        optimizer = ""
        loads_optimizer = not (checkpoint.no_load_optim or checkpoint.finetune)
        if self.settings.parallel.use_distributed_optimizer and loads_optimizer:
            optimizer = f", optimizer state {meta.get('optimizer_format', 'fully_reshardable')}"
        self.metrics.print(loaded_line(path, self.progress, same_layout, optimizer))

    def save(self, async_save: bool = False) -> None:
        """Save now (``async_save``: write in the background, publish in `finalize_saves`)."""
        save = self.settings.checkpoint.save
        if not save:
            return
        self.progress.data_state = self.stream.state.as_dict()
        start = time.time()
        self.timers("save-checkpoint", log_level=0).start(barrier=True)
        overlapped = self.settings.parallel.overlap_param_gather
        if overlapped:  # finish the pending all-gather of updated params before writing them
            for chunk in self.chunks:
                chunk.disable_forward_pre_hook(param_sync=True)  # type: ignore[operator]  # mcore DDP's
        path = self.checkpoints.save(
            ckpt.CheckpointedRun.of(self.settings),
            self.chunks,
            self.optimizer,
            self.scheduler,
            self.progress,
            async_save,
        )
        if overlapped:
            for chunk in self.chunks:
                chunk.enable_forward_pre_hook()  # type: ignore[operator]  # mcore DDP's
        self.timers("save-checkpoint").stop(barrier=True)
        if path is None:
            self.metrics.print(
                f"checkpoint {ckpt.iteration_dir(save, self.progress.iteration)} of "
                f"iteration {self.progress.iteration} is published and intact: not saved again "
                "(a published checkpoint is never rewritten)"
            )
            return
        done = "scheduled async save of" if async_save else "saved"
        self.metrics.print(
            f"{done} checkpoint {path} at iteration {self.progress.iteration} "
            f"({time.time() - start:.1f}s)"
        )
        for note in self.checkpoints.pop_notes():
            self.metrics.print(f"note: {note}")
        self.metrics.checkpoint_time(self.progress.iteration, "save-checkpoint")

    def finalize_saves(self, blocking: bool) -> None:
        """Publish the async saves every rank finished writing (all when ``blocking``)."""
        for path in self.checkpoints.finalize_async_saves(blocking):
            self.metrics.print(f"saved checkpoint {path} (async save published)")
        for note in self.checkpoints.pop_notes():
            self.metrics.print(f"note: {note}")

    # --- data ---------------------------------------------------------------------------
    def print_data_notices(self) -> None:
        """Print the samples' notes once (blend normalised, the data budget before step 1)."""
        for notice in self.stream.pop_notices():
            self.metrics.print(notice)

    def _microbatches(self, spec: PhaseSpec) -> list[dict]:
        """This step's micro-batches on the device (prepared ahead with ``--num-workers``), of
        ``spec.micro_batch_rows(mbs)`` model samples each (s times more with the batch fold)."""
        request = StepRequest(spec, get_num_microbatches())
        host = self.stream.next_step(request, self._upcoming_requests(request))
        non_blocking = self.device.type == "cuda"  # host tensors are pinned on CUDA
        return [
            {k: v.to(self.device, non_blocking=non_blocking) for k, v in sample.items()}
            for sample in host
        ]

    def _upcoming_requests(self, request: StepRequest) -> list[StepRequest]:
        """What the next ``--num-workers`` steps will ask for (the schedule's phases)."""
        schedule, after = self.settings.schedule, self.progress.iteration + 1
        upcoming = []
        for completed in range(after, min(after + self.stream.depth, self.last_iteration())):
            phase = (
                2
                if schedule.tst_phase == "2"
                else self.settings.tst.phase_at(completed, schedule.train_iters)
            )
            upcoming.append(StepRequest(self.phase_spec(phase), request.num_microbatches))
        return upcoming

    def _host_microbatches(self, stream, request: StepRequest) -> list[dict]:
        """One step's host micro-batches (on the prefetch thread with ``--num-workers`` >= 1)."""
        return read_step(
            stream,
            request,
            self.step_layout,
            lambda sample, spec: split_for_context_parallel(sample, spec.input_bag_size),
        )

    # --- steps --------------------------------------------------------------------------
    def train_step(self, spec: PhaseSpec) -> dict:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()  # type: ignore[operator]  # mcore DDP's
        self.optimizer.zero_grad()
        iteration = self.progress.iteration + 1
        step_func = fault_injection.forward_step(forward_step, iteration)
        self.timers("batch-generator", log_level=1).start()
        batches = self._microbatches(spec)
        self.timers("batch-generator").stop()
        run = self.settings
        outputs = run_schedule(
            self.chunks, batches, False, run.model.seq_length, run.batch.micro_batch_size,
            run.parallel.context_parallel_size, step_func, spec,
        )  # fmt: skip
        health = check_step(outputs, self.chunks)
        fp16 = run.precision.params_dtype == "fp16"
        scale = precision.current_loss_scale(self.optimizer) if fp16 else None
        bad = health.is_bad(loss_scaling=fp16)
        self.timers("optimizer", log_level=1).start(barrier=run.logging.barrier_with_L1_time)
        if bad:
            updated, grad_norm = False, float("nan")
        else:  # fp16: the optimizer skips an overflow step itself and lowers the loss scale
            updated, grad_norm, _ = self.optimizer.step()
        self.timers("optimizer").stop()
        overflow = fp16 and not bad and not updated
        gbs = get_current_global_batch_size()
        if updated:
            self.scheduler.step(increment=gbs)
        # an overflow at the minimum loss scale cannot be scaled away: a bad step too
        at_floor = scale is not None and scale <= run.precision.min_loss_scale
        self.guard.record(bad or (overflow and at_floor), iteration)
        return {
            "loss": health.loss,
            "loss_kl": health.loss - health.target_entropy,
            "grad_norm": grad_norm,
            "updated": updated,
            "nan": bad,
            "overflow": overflow,
            "loss_scale": precision.current_loss_scale(self.optimizer) if fp16 else None,
            "global_batch_size": gbs,
            "lr": self.optimizer.param_groups[0]["lr"],
            "moe": self.moe.collect(len(batches)) if self.moe else None,
        }

    def evaluate(self) -> float | None:
        """Standard next-token validation loss (comparable across phases and baselines)."""
        run = self.settings
        if not run.logging.eval_iters:
            return None
        if self._valid is None:
            self._valid = validation_microbatches(
                run.data, run.schedule.seed, run.model.seq_length, run.batch.micro_batch_size,
                run.logging.eval_iters, self.tokenizer, self.documents, self.device,
            )  # fmt: skip
        if not self._valid:
            return None
        config = get_model_config(self.chunks[0])
        config.timers = None  # like Megatron-LM: evaluation stays out of the step timers
        with self.gc.evaluation():
            loss = validation_loss(
                self.chunks, self._valid, run.model.seq_length, run.batch.micro_batch_size,
                run.parallel.context_parallel_size,
            )  # fmt: skip
        config.timers = self.timers.timers
        self.set_phase(self.progress.phase)
        return loss

    # --- memory footprint ---------------------------------------------------------------
    def log_memory_estimate(self) -> None:
        """Log the planner's memory estimate per GPU of every pipeline stage for this run
        (Megatron-LM's "theoretical memory footprints"; a collective: every rank calls it)."""
        run = self.settings
        memory = MemorySettings(model=run.model, parallel=run.parallel, recompute=run.recompute,
                                precision=run.precision, optimizer=run.optimizer,
                                batch=run.batch, kernels=run.kernels, tst=run.tst)  # fmt: skip
        models = [unwrap(chunk) for chunk in self.chunks]
        self.footprint = footprint.run_footprint(memory, run.schedule, models,
                                                 run.num_microbatches)  # fmt: skip
        for line in footprint.estimate_lines(self.footprint):
            self.metrics.print(line)

    def log_measured_memory(self) -> None:
        """On CUDA, log every stage's measured ``max_memory_allocated`` beside the estimate
        (a collective: every rank calls it)."""
        if self.device.type != "cuda":
            return
        measured = footprint.measured_peaks(self.settings.parallel)
        self.metrics.print(
            footprint.measured_line(
                self.footprint, measured, self.progress.iteration, self.progress.phase
            )
        )

    # --- the loop -----------------------------------------------------------------------
    def train(self) -> dict:
        run = self.settings
        checkpoint, schedule = run.checkpoint, run.schedule
        self.maybe_load()
        self.log_memory_estimate()
        # The schedule, not the checkpoint, decides the phase: an imported or --finetune
        # checkpoint at iteration 0 starts with TST phase 1 when it is configured.
        scheduled = run.tst.phase_at(self.progress.iteration, schedule.train_iters)
        if schedule.tst_phase == "2":
            scheduled = 2
        if self.progress.phase == 1 and scheduled == 2:  # also a boundary moved before it
            self.metrics.phase_boundary(self.progress.iteration, self.stream.state)
        self.set_phase(scheduled)
        self.print_data_notices()
        early = self.exits.signal_before_start()
        if early:  # nothing trained in this job yet: the checkpoint on disk (if any) is current
            self.metrics.print(
                f"exiting at iteration {self.progress.iteration} before the first step: "
                f"{early}; nothing new to save"
            )
            return {"iteration": self.progress.iteration, "exit_reason": early}
        stop_at = self.last_iteration()
        update_num_microbatches(self.progress.consumed_samples, consistency_check=False)
        final: dict[str, Any] = {"iteration": self.progress.iteration}
        measure_at = min(self.progress.iteration + MEASURE_MEMORY_AFTER_STEPS, stop_at)
        self.gc.start()
        while self.progress.iteration < stop_at:
            if self.progress.phase == 1 and self.progress.iteration >= self.phase1_iters:
                self.set_phase(2)
                self.metrics.phase_boundary(self.progress.iteration, self.stream.state)
            update_num_microbatches(self.progress.consumed_samples, consistency_check=True)
            spec = self.phase_spec(self.progress.phase)
            fault_injection.before_iteration(self.progress.iteration + 1)
            start = time.time()
            step = self.train_step(spec)
            self.progress.iteration += 1
            self.progress.consumed_samples += step["global_batch_size"]
            if not step["updated"]:
                self.progress.skipped_iterations += 1
            self.metrics.step(
                self.progress, spec, step, time.time() - start, self.stream.state, stop_at
            )
            self.print_data_notices()
            if self.progress.iteration == measure_at:
                self.log_measured_memory()
            self.gc.after_step(self.progress.iteration)
            final = {"iteration": self.progress.iteration, "loss": step["loss"]}
            if self.guard.should_stop():
                raise TrainingStopped(self.guard.stop_message())
            at_end = self.progress.iteration == stop_at
            if not at_end and self.progress.iteration % run.logging.eval_interval == 0:
                self.metrics.validation(self.progress.iteration, self.evaluate())
            if checkpoint.async_save:
                self.finalize_saves(blocking=False)
            saved = False
            interval = checkpoint.save_interval
            if interval and self.progress.iteration % interval == 0:
                self.save(async_save=checkpoint.async_save and not at_end)
                saved = True
            reason = self.exits.check(self.progress.iteration, self.metrics.start_time)
            if reason:
                self.finalize_saves(blocking=True)
                if not saved:
                    self.save()
                self.metrics.print(f"exiting at iteration {self.progress.iteration}: {reason}")
                final["exit_reason"] = reason
                return final
        self.finalize_saves(blocking=True)
        interval = checkpoint.save_interval
        if checkpoint.save and (not interval or self.progress.iteration % interval):
            self.save()
        valid = self.evaluate()
        self.metrics.validation(self.progress.iteration, valid, final=True)
        final["valid_loss"] = valid
        return final


def _reduce_lm_loss(outputs: list[dict]) -> float:
    """Global mean lm loss of a step: sums and counts over micro-batches and data parallel."""
    total = torch.zeros(2)
    for out in outputs or []:
        total += out["lm loss"].detach().float().cpu()
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        group = ps.get_data_parallel_group()
        total = total.to(torch.cuda.current_device()) if torch.cuda.is_available() else total
        torch.distributed.all_reduce(total, group=group)
    src = torch.distributed.get_world_size() - 1
    total = total.to(torch.cuda.current_device()) if torch.cuda.is_available() else total
    torch.distributed.broadcast(total, src=src)
    return (total[0] / total[1].clamp(min=1)).item()
