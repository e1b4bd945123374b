"""Megatron-Core optimizer + LR scheduler of the run's sections, with the torch-AdamW fallback
fixed.

Without apex/Transformer Engine, `get_megatron_optimizer` falls back to `torch.optim.AdamW`,
and three mcore 0.16.1 paths then break checkpointing (found on CPU, and they bite on GPUs
without apex/TE too):
1. `init_state_fn` (optimizer/__init__.py) creates ``exp_avg``/``exp_avg_sq`` but no
   ``step``, so `DistributedOptimizer.state_dict` asserts on a fresh optimizer and a
   fully-reshardable load fails with ``KeyError: 'step'``.
2. After a load, every parameter's state shares ONE ``step`` tensor; torch's in-place
   ``step += 1`` then advances it once per parameter, breaking bias correction.
3. `DistributedOptimizer.sharded_state_dict(is_loading=True)` reads the state before it
   initialises it, which asserts on a fresh optimizer; and its fully-reshardable load
   copies every per-parameter state key from the checkpoint, ``step`` included, which is
   stored once per optimizer instead (``KeyError: 'step'``).

`fix_torch_adam_state` patches (1) and the copy of (3) per optimizer instance,
`init_optimizer_state` fills a fresh optimizer's state before a load, and
`unshare_adam_steps` undoes (2) after every load. All are no-ops with apex/TE Adam.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from tst_megatron.settings import (
    BatchConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    ScheduleConfig,
)


def megatron_optimizer_config(
    optimizer: OptimizerConfig,
    schedule: ScheduleConfig,
    precision: PrecisionConfig,
    parallel: ParallelConfig,
) -> MegatronOptimizerConfig:
    """Megatron-Core's `OptimizerConfig` of the run's sections."""
    return MegatronOptimizerConfig(
        optimizer=optimizer.optimizer,
        lr=schedule.lr,
        min_lr=schedule.min_lr,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.adam_beta1,
        adam_beta2=optimizer.adam_beta2,
        adam_eps=optimizer.adam_eps,
        clip_grad=optimizer.clip_grad,
        bf16=precision.params_dtype == "bf16",
        fp16=precision.params_dtype == "fp16",
        params_dtype=precision.torch_dtype,
        loss_scale=precision.loss_scale,
        initial_loss_scale=precision.initial_loss_scale,
        min_loss_scale=precision.min_loss_scale,
        loss_scale_window=precision.loss_scale_window,
        hysteresis=precision.hysteresis,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )


def build_optimizer(
    optimizer: OptimizerConfig,
    schedule: ScheduleConfig,
    precision: PrecisionConfig,
    parallel: ParallelConfig,
    model_chunks: list,
):
    """`get_megatron_optimizer` (ZeRO-1 with ``--use-distributed-optimizer``) + fixes."""
    config = megatron_optimizer_config(optimizer, schedule, precision, parallel)
    megatron_optimizer = get_megatron_optimizer(config, model_chunks)
    for inner in _inner_optimizers(megatron_optimizer):
        fix_torch_adam_state(inner)
    return megatron_optimizer


def build_scheduler(
    optimizer: OptimizerConfig, schedule: ScheduleConfig, batch: BatchConfig, megatron_optimizer
) -> OptimizerParamScheduler:
    """Megatron's LR/WD schedule of ``megatron_optimizer`` in units of samples, like
    Megatron-LM's training loop (``schedule``'s warm-up and decay are resolved iterations)."""
    gbs = batch.global_batch_size
    wsd = schedule.lr_decay_style == "WSD"
    return OptimizerParamScheduler(
        megatron_optimizer,
        init_lr=schedule.lr_warmup_init,
        max_lr=schedule.lr,
        min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.lr_warmup_iters * gbs,
        lr_decay_steps=schedule.lr_decay_iters * gbs,
        lr_decay_style=schedule.lr_decay_style,
        start_wd=optimizer.start_weight_decay,
        end_wd=optimizer.end_weight_decay,
        wd_incr_steps=schedule.train_iters * gbs,
        wd_incr_style=optimizer.weight_decay_incr_style,
        wsd_decay_steps=(schedule.lr_wsd_decay_iters or 0) * gbs if wsd else None,
        lr_wsd_decay_style=schedule.lr_wsd_decay_style,
    )


def describe_kernels(optimizer) -> str:
    """Which optimizer kernel Megatron-Core picked (TE/apex fused Adam, else torch)."""
    names = sorted(
        {
            f"{type(inner.optimizer).__module__}.{type(inner.optimizer).__name__}"
            for inner in _inner_optimizers(optimizer)
            if getattr(inner, "optimizer", None)
        }
    )
    return ", ".join(names) or "none"


def _inner_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def fix_torch_adam_state(megatron_optimizer) -> None:
    """Make ``init_state_fn`` also create a per-parameter ``step`` (see module doc, 1)."""
    inner = getattr(megatron_optimizer, "optimizer", None)
    original = getattr(megatron_optimizer, "init_state_fn", None)
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW) or original is None:
        return

    def init_state_with_step(opt, config=None):
        original(opt, config)
        for group in opt.param_groups:
            for param in group["params"]:
                opt.state[param].setdefault("step", torch.tensor(0.0))

    megatron_optimizer.init_state_fn = init_state_with_step
    if isinstance(megatron_optimizer, DistributedOptimizer) and not (
        megatron_optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
    ):
        megatron_optimizer._set_main_param_and_optimizer_states = partial(
            _set_main_param_and_states_except_step, megatron_optimizer
        )


@torch.no_grad()  # the main params are leaves that require grad (dp_reshardable load)
def _set_main_param_and_states_except_step(optimizer, model_param, tensors: dict) -> None:
    """`DistributedOptimizer._set_main_param_and_optimizer_states` minus the ``step`` key."""
    group_index, group_order = optimizer.model_param_group_index_map[model_param]
    main_param = optimizer.optimizer.param_groups[group_index]["params"][group_order]
    for key, destination in {"param": main_param, **optimizer.optimizer.state[main_param]}.items():
        if key != "step":
            destination.copy_(tensors[key])


def init_optimizer_state(optimizer) -> None:
    """Create zero optimizer state (moments and step) so a load has tensors to fill."""
    for megatron_optimizer in _inner_optimizers(optimizer):
        inner = getattr(megatron_optimizer, "optimizer", None)
        init = getattr(megatron_optimizer, "init_state_fn", None)
        if inner is not None and init is not None:
            init(inner, megatron_optimizer.config)


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own ``step`` tensor after a load (see module doc, 2)."""
    for megatron_optimizer in _inner_optimizers(optimizer):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for state in inner.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def restore_steps_after_in_place_load(optimizer, state_dict: dict) -> None:
    """Finish a torch-FSDP2 optimizer load, which (as in Megatron-LM) skips ``load_state_dict``.

    `dist_checkpointing.load` wrote the moments (and, in bf16, the fp32 main parameters)
    straight into this optimizer's own DTensor shards; ``load_state_dict`` would replace
    them with plain tensors. What it cannot write in place is the step: Megatron-Core saves
    it once (``common_step``, or a param group's ``step`` for fused Adams). Set it here,
    one tensor per parameter (module doc, 2). ``state_dict`` is the loaded optimizer part.
    """
    inners = _inner_optimizers(optimizer)
    states = [state_dict] if len(inners) == 1 else [state_dict[k] for k in sorted(state_dict)]
    for megatron_optimizer, state in zip(inners, states, strict=True):
        saved = state.get("optimizer", state)
        inner = megatron_optimizer.optimizer
        step = saved["state"].get("common_step")
        if step is not None:
            for param_state in inner.state.values():
                param_state["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        for group, saved_group in zip(inner.param_groups, saved["param_groups"], strict=True):
            if "step" in saved_group:
                group["step"] = saved_group["step"]
