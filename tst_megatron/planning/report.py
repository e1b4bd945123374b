"""The whole plan of a layout as one JSON-ready dict (``tools/plan.py --json``), and its table.

`plan` checks the layout with the trainer's `validate_args` plus what only a planner can see
(virtual-pipeline divisibility, memory per GPU against the GPU's), and reports parameters,
FLOPs and data tokens per step in each TST phase, memory per pipeline stage, step time and run
totals. ``report["ok"]`` says if the layout is accepted; ``report["errors"]`` say why not.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from tst_megatron.planning.layout import (
    PlanError,
    PlanRequest,
    apply_layout,
    config_args,
    single_gpu_layout,
    validated,
)
from tst_megatron.planning.memory import (
    GIB,
    GPU_MEMORY_GIB,
    peak_stage_and_phase,
    recompute_setting,
    recomputed_forward_fraction,
    stage_memory,
)
from tst_megatron.planning.params import (
    NamedParams,
    count_parameters,
    meta_parameters,
    place_parameters,
)
from tst_megatron.planning.step_time import step_time
from tst_megatron.training.flops import peak_tflops_for_device, phase_flops_per_step
from tst_megatron.training.run_config import model_config, parallel_config


def plan(request: PlanRequest) -> dict[str, Any]:
    """The report for ``request``; ``report["ok"]`` says if it is accepted.

    Raises:
        PlanError: the config cannot be read or describes no model.
    """
    world = request.world_size
    args, fp8 = config_args(request)
    requested_batch = args.global_batch_size
    errors = apply_layout(args, request)
    layout_error = validated(args, world)
    if layout_error:
        errors.append(layout_error)
    layout_ok = not errors
    if layout_ok:
        batch = args.global_batch_size
    else:  # the layout-free numbers still come from a one-GPU view
        args, _ = config_args(request)
        single_gpu_layout(args)
        shape_error = validated(args, world_size=1)
        if shape_error:
            if shape_error != layout_error:
                errors.append(shape_error)
            return {"config": request.config, "gpu": request.gpu, "ok": False, "errors": errors}
        batch = requested_batch or args.global_batch_size
    if args.padded_vocab_size is None:
        raise PlanError(
            f"{request.config} gives no vocab-size: the planner needs the vocabulary size "
            "(add vocab-size: N, the tokenizer's size)"
        )
    shape = model_config(args)
    named = meta_parameters(shape)
    counts = count_parameters(shape, named)
    seq = args.seq_length
    phase1, phase2 = args.tst.phase_spec(1), args.tst.phase_spec(2)
    phase1_iters = args.tst.phase1_iterations(args.train_iters)
    # the batch fold runs phase 1 as s*b samples of L/s positions: s times cheaper attention
    phase1_flops = phase_flops_per_step(shape, phase1, seq, batch)
    phase2_flops = phase_flops_per_step(shape, phase2, seq, batch)
    report: dict[str, Any] = {
        "config": request.config,
        "gpu": request.gpu,
        "ok": False,
        "errors": errors,
        "notes": [],
        "layout": {
            "nodes": request.nodes,
            "gpus_per_node": request.gpus_per_node,
            "world_size": world,
            "tp": request.tp,
            "pp": request.pp,
            "vpp": request.vpp,
            "cp": request.cp,
            "ep": request.ep,
            "etp": request.etp or request.tp,
            "dp": args.data_parallel_size if layout_ok else None,
            "sequence_parallel": bool(args.sequence_parallel),
            "distributed_optimizer": bool(args.use_distributed_optimizer),
            "recompute": recompute_setting(args),
            "micro_batch_size": args.micro_batch_size,
            "global_batch_size": batch,
            "seq_length": seq,
        },
        "tst": {
            "bag_size": args.tst.bag_size,
            "mode": args.tst.mode,
            "fold": args.tst.fold,
            "train_iters": args.train_iters,
            "phase1_iters": phase1_iters,
            "phase2_iters": args.train_iters - phase1_iters,
        },
        "total_params": counts.total,
        "active_params": counts.active,
        "routed_expert_params": counts.routed_experts,
        "analytic_total_params": counts.analytic_total,
        "analytic_active_params": counts.analytic_active,
        "flops_per_step_phase1": phase1_flops,
        "flops_per_step_phase2": phase2_flops,
        "model_tokens_per_step": batch * seq,
        "data_tokens_per_step_phase1": batch * phase1.data_tokens_per_sample(seq),
        "data_tokens_per_step_phase2": batch * phase2.data_tokens_per_sample(seq),
        "memory_per_gpu_bytes": None,
    }
    if (counts.total, counts.active) != (counts.analytic_total, counts.analytic_active):
        report["notes"].append(
            f"meta-model counts ({counts.total}, {counts.active}) differ from the analytic "
            f"formula ({counts.analytic_total}, {counts.analytic_active})"
        )
    if fp8:
        report["notes"].append("FP8: time at FP8 peak FLOPs; memory assumes bf16 weights")
    if getattr(args, "fsdp_untied", False):
        report["notes"].append(
            "FSDP2 needs untied embeddings: planned with a separate LM head (the config ties)"
        )
    if layout_ok:
        _add_layout_estimates(report, args, request, named, fp8)
    report["ok"] = not report["errors"]
    return report


def _add_layout_estimates(
    report: dict[str, Any],
    args: argparse.Namespace,
    request: PlanRequest,
    named: NamedParams,
    fp8: bool,
) -> None:
    """Memory per GPU, its check against the GPU, and the time estimates."""
    layout = report["layout"]
    num_micro = layout["global_batch_size"] // (args.micro_batch_size * args.data_parallel_size)
    layout["num_microbatches"] = num_micro
    placed = place_parameters(model_config(args), parallel_config(args), named)
    stages = stage_memory(args, placed, num_micro)
    peak_stage, peak_phase = peak_stage_and_phase(stages, bool(report["tst"]["phase1_iters"]))
    peak = getattr(peak_stage, f"total_phase{peak_phase}_bytes")
    capacity = GPU_MEMORY_GIB[request.gpu] * GIB
    budget = capacity * request.usable_memory_fraction
    report.update(
        memory_per_gpu_bytes=peak,
        memory_peak_stage=peak_stage.stage,
        memory_peak_phase=peak_phase,
        gpu_memory_bytes=capacity,
        memory_budget_bytes=round(budget),
        fits=peak <= budget,
        memory_stages=[asdict(m) for m in stages],
    )
    if peak > budget:
        report["errors"].append(
            f"estimated peak memory {peak / GIB:.1f} GiB per GPU (pipeline stage "
            f"{peak_stage.stage}, phase {peak_phase}) exceeds the usable "
            f"{budget / GIB:.1f} GiB of one {request.gpu} ({GPU_MEMORY_GIB[request.gpu]} GiB x "
            f"{request.usable_memory_fraction:g}); try {_memory_remedies(args, request)}"
        )
    peak_tflops = peak_tflops_for_device(request.gpu, fp8=fp8)
    world = layout["world_size"]
    step_seconds = {
        phase: step_time(
            report[f"flops_per_step_phase{phase}"],
            world,
            peak_tflops,
            request.mfu,
            recomputed_fraction=recomputed_forward_fraction(args),
            pp=request.pp,
            vpp=request.vpp,
            num_microbatches=num_micro,
        )
        for phase in (1, 2)
    }
    step, step1 = step_seconds[2].seconds, step_seconds[1].seconds
    tst = report["tst"]
    seconds = step1 * tst["phase1_iters"] + step * tst["phase2_iters"]
    report.update(
        mfu=request.mfu,
        peak_tflops_per_gpu=peak_tflops,
        pipeline_bubble=step_seconds[2].bubble,
        step_time_s=step,
        step_time_s_phase1=step1,
        model_tokens_per_s=report["model_tokens_per_step"] / step,
        data_tokens_per_s_phase1=report["data_tokens_per_step_phase1"] / step1,
        data_tokens_per_s_phase2=report["data_tokens_per_step_phase2"] / step,
        run_hours=seconds / 3600,
        run_gpu_hours=seconds * world / 3600,
        run_data_tokens=tst["phase1_iters"] * report["data_tokens_per_step_phase1"]
        + tst["phase2_iters"] * report["data_tokens_per_step_phase2"],
    )


def _memory_remedies(args: argparse.Namespace, request: PlanRequest) -> str:
    remedies = ["more TP/PP" + ("/EP" if args.num_experts else "")]
    if args.recompute_granularity != "full":
        remedies.append("--recompute")
    if not args.use_distributed_optimizer:
        remedies.append("use-distributed-optimizer in the config")
    if args.micro_batch_size > 1:
        remedies.append(f"a --micro-batch-size below {args.micro_batch_size}")
    return ", ".join(remedies)


# --------------------------------------------------------------------------------------------
# Human-readable rendering
# --------------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"plan for {report['config']} on {report['gpu']}"]
    if "total_params" in report:
        lines += _render_model(report)
    if report.get("memory_stages"):
        lines += _render_memory(report)
        lines += _render_time(report)
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if report["ok"]:
        lines.append("layout OK")
    else:
        lines.append("layout REJECTED:")
        lines += [f"  - {error}" for error in report["errors"]]
    return "\n".join(lines)


def _render_model(report: dict[str, Any]) -> list[str]:
    lay, tst = report["layout"], report["tst"]
    dp = lay["dp"] if lay["dp"] is not None else "?"
    micro = lay.get("num_microbatches", "?")
    if tst["phase1_iters"]:
        schedule = (
            f"s={tst['bag_size']} ({tst['mode']}, {tst['fold']} fold), phase 1 = steps "
            f"1-{tst['phase1_iters']} "
            f"of {tst['train_iters']}"
        )
    else:
        schedule = f"off (baseline), {tst['train_iters']} steps"
    agrees = (report["total_params"], report["active_params"]) == (
        report["analytic_total_params"],
        report["analytic_active_params"],
    )
    return [
        f"  layout            {lay['nodes']} node(s) x {lay['gpus_per_node']} GPUs = "
        f"{lay['world_size']}: TP {lay['tp']}, PP {lay['pp']}, VPP {lay['vpp']}, "
        f"CP {lay['cp']}, EP {lay['ep']} (ETP {lay['etp']}), DP {dp}",
        f"  batch             micro {lay['micro_batch_size']}, global {lay['global_batch_size']} "
        f"({micro} micro-batches per step), L = {lay['seq_length']}, "
        f"recompute {lay['recompute']}",
        f"  parameters        {_billions(report['total_params'])} total, "
        f"{_billions(report['active_params'])} active (meta model; analytic formula "
        f"{'agrees' if agrees else 'DIFFERS'})",
        f"  TST               {schedule}",
        f"  FLOPs/step        phase 1 {report['flops_per_step_phase1']:.4g}, "
        f"phase 2 {report['flops_per_step_phase2']:.4g}",
        f"  data tokens/step  phase 1 {report['data_tokens_per_step_phase1']:,}, "
        f"phase 2 {report['data_tokens_per_step_phase2']:,} "
        f"(model positions {report['model_tokens_per_step']:,})",
    ]


def _render_memory(report: dict[str, Any]) -> list[str]:
    header = ("stage", "layers", "params", "weights", "grads", "optim", "activ", "activ(rc)",
              "logits", "bags(p1)", "total")  # fmt: skip
    lines = ["  memory per GPU (GiB):", "    " + " ".join(f"{h:>9}" for h in header)]
    for m in report["memory_stages"]:
        total = max(m["total_phase1_bytes"], m["total_phase2_bytes"])
        cells = [str(m["stage"]), str(m["layers"]), _billions(m["params"])] + [
            f"{m[key] / GIB:.2f}"
            for key in ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                        "activations_recompute_bytes", "logits_bytes", "phase1_bag_input_bytes")
        ] + [f"{total / GIB:.2f}"]  # fmt: skip
        lines.append("    " + " ".join(f"{c:>9}" for c in cells))
    gathered = max(m["fsdp_gathered_bytes"] for m in report["memory_stages"])
    if gathered:
        lines.append(
            f"  FSDP              weights/grads/optimizer sharded over DP x CP; all-gathered "
            f"units at peak {gathered / GIB:.2f} GiB (in total)"
        )
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines.append(
        f"  peak              {report['memory_per_gpu_bytes'] / GIB:.2f} GiB (stage "
        f"{report['memory_peak_stage']}, phase {report['memory_peak_phase']}) of "
        f"{report['memory_budget_bytes'] / GIB:.2f} GiB usable: {verdict}"
    )
    return lines


def _render_time(report: dict[str, Any]) -> list[str]:
    return [
        f"  time at {report['mfu']:.0%} MFU   step {report['step_time_s']:.3f} s, phase 1 "
        f"{report['step_time_s_phase1']:.3f} s "
        f"(peak {report['peak_tflops_per_gpu']:g} TFLOP/s/GPU, bubble "
        f"{report['pipeline_bubble']:.1%}); tokens/s: model {report['model_tokens_per_s']:,.0f}, "
        f"data phase 1 {report['data_tokens_per_s_phase1']:,.0f}, "
        f"phase 2 {report['data_tokens_per_s_phase2']:,.0f}",
        f"  run               {report['run_hours']:.1f} h, {report['run_gpu_hours']:,.0f} "
        f"GPU-h, {report['run_data_tokens'] / 1e9:,.1f}B data tokens",
    ]


def _billions(count: float) -> str:
    return f"{count / 1e9:.3f}B"
