"""The trainer's own memory footprint: the planner's memory model for this run's layout, and the
measured peak beside it (Megatron-LM's ``report_theoretical_memory`` and ``report_memory``).

The parameters each GPU holds are counted on the model the trainer built (one small all-gather
over the pipeline group at start-up), so they are what the builder enabled; bytes per
parameter, optimizer sharding, activations, logits and TST bag inputs come from
`memory.one_stage_memory`, the model ``tools/plan.py`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from tst_megatron.planning.memory import MemorySettings, StageMemory, one_stage_memory
from tst_megatron.planning.params import StageParams, is_routed_expert, layer_stage
from tst_megatron.settings import ModelConfig, ParallelConfig, ScheduleConfig

MB = 1024**2  # Megatron-LM's memory reports say MB for MiB


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes on one GPU of every pipeline stage.

    ``in_flight`` holds the activations of the micro-batches the schedule keeps at once,
    ``per_microbatch`` those of one micro-batch; ``phases`` the TST phases the run trains in.
    """

    in_flight: list[StageMemory]
    per_microbatch: list[StageMemory]
    phases: tuple[int, ...]
    recompute: bool


def stage_layers(model: ModelConfig, parallel: ParallelConfig, stage: int) -> list[int]:
    """The layers pipeline rank ``stage`` holds (`params.layer_stage`)."""
    return [
        i for i in range(model.num_layers) if layer_stage(i, model.num_layers, parallel) == stage
    ]


def held_parameters(
    model: ModelConfig, parallel: ParallelConfig, models: list[torch.nn.Module]
) -> StageParams:
    """What this GPU holds: the parameters of its model chunks, routed experts apart."""
    stage = parallel_state.get_pipeline_model_parallel_rank()
    held = StageParams(layers=stage_layers(model, parallel, stage))
    for chunk in models:
        for name, param in chunk.named_parameters():
            if is_routed_expert(name):
                held.experts += param.numel()
            else:
                held.dense += param.numel()
    return held


def pipeline_held_parameters(
    model: ModelConfig, parallel: ParallelConfig, models: list[torch.nn.Module]
) -> list[StageParams]:
    """`held_parameters` of this GPU's peer in every pipeline stage (a collective over the
    pipeline-parallel group: every rank calls it)."""
    mine = held_parameters(model, parallel, models)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
    local = torch.tensor([mine.dense, mine.experts], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(parallel.pipeline_model_parallel_size)]
    torch.distributed.all_gather(
        gathered, local, group=parallel_state.get_pipeline_model_parallel_group()
    )
    return [
        StageParams(
            layers=stage_layers(model, parallel, p),
            dense=float(counts[0]),
            experts=float(counts[1]),
        )
        for p, counts in enumerate(gathered)
    ]


def run_footprint(
    settings: MemorySettings,
    schedule: ScheduleConfig,
    models: list[torch.nn.Module],
    num_microbatches: int,
) -> Footprint:
    """The estimate for this run (a collective: every rank calls it)."""
    stages = pipeline_held_parameters(settings.model, settings.parallel, models)
    phase1 = settings.tst.phase1_iterations(schedule.train_iters) > 0
    return Footprint(
        in_flight=[
            one_stage_memory(settings, p, s, num_microbatches) for p, s in enumerate(stages)
        ],
        per_microbatch=[one_stage_memory(settings, p, s, 1) for p, s in enumerate(stages)],
        phases=(1, 2) if phase1 else (2,),
        recompute=settings.recompute.recompute_granularity == "full",
    )


def peak_bytes(memory: StageMemory, phase: int) -> int:
    """The total bytes of ``memory`` in TST phase ``phase``."""
    return getattr(memory, f"total_phase{phase}_bytes")


def estimate_lines(footprint: Footprint) -> list[str]:
    """One log line per pipeline stage, in Megatron-LM's MB."""
    pp = len(footprint.in_flight)
    lines = []
    for total, one in zip(footprint.in_flight, footprint.per_microbatch, strict=True):
        kept = "activations_recompute_bytes" if footprint.recompute else "activations_bytes"
        per_micro = {2: getattr(one, kept), 1: getattr(one, kept) + one.phase1_bag_input_bytes}
        states = total.weights_bytes + total.grads_bytes + total.optimizer_bytes
        phases = footprint.phases
        lines.append(
            f"theoretical memory footprint per GPU of pipeline stage {total.stage} of {pp} "
            f"(tst_megatron.planning, as tools/plan.py): weights+grads+optimizer="
            f"{states / MB:.2f} MB (weights {total.weights_bytes / MB:.2f}, grads "
            f"{total.grads_bytes / MB:.2f}, optimizer {total.optimizer_bytes / MB:.2f}), "
            "activations per micro-batch: "
            + ", ".join(f"phase {ph} {per_micro[ph] / MB:.2f} MB" for ph in phases)
            + f" ({getattr(total, kept) / MB:.2f} MB in flight"
            + (", full recompute" if footprint.recompute else "")
            + f"), logits {total.logits_bytes / MB:.2f} MB"
            + (
                f", FSDP all-gathered units {total.fsdp_gathered_bytes / MB:.2f} MB"
                if total.fsdp_gathered_bytes
                else ""
            )
            + ", peak: "
            + ", ".join(f"phase {ph} {peak_bytes(total, ph) / MB:.2f} MB" for ph in phases)
        )
    return lines


def measured_peaks(parallel: ParallelConfig) -> list[int]:
    """The largest ``torch.cuda.max_memory_allocated`` of the GPUs of every pipeline stage (a
    collective over all ranks)."""
    pp = parallel.pipeline_model_parallel_size
    peaks = torch.zeros(pp, dtype=torch.int64, device="cuda")
    peaks[parallel_state.get_pipeline_model_parallel_rank()] = torch.cuda.max_memory_allocated()
    torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    return peaks.tolist()


def measured_line(footprint: Footprint, measured: list[int], iteration: int, phase: int) -> str:
    """The measured peaks beside the estimate of the phase they were measured in."""
    stages = ", ".join(
        f"stage {m.stage} {peak / MB:.2f} MB (estimate {peak_bytes(m, phase) / MB:.2f} MB)"
        for m, peak in zip(footprint.in_flight, measured, strict=True)
    )
    return (
        f"memory after {iteration} iterations (TST phase {phase}), max allocated "
        f"(torch.cuda.max_memory_allocated, largest GPU per pipeline stage): {stages}"
    )
