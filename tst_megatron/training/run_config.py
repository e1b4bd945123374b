"""The one mapping from ``pretrain_tst.py``'s flags to `RunConfig`, resolved for an environment.

`FLAG_FIELDS` names the section field every flag sets (``dest`` -> ``"section.field"``);
flags that validation folds into another field map to that field
(``--group-query-attention`` -> ``model.num_query_groups``). `ENTRY_POINT_ONLY` lists the flags
the entry point consumes itself, `DERIVED_FIELDS` the fields no single flag sets.
``tests/test_settings_audit.py`` checks both ways: every flag reaches its field, every field is
read from a flag.

`resolve` is the path of an entry point: the flags as given, `validate_args` for the
`Environment` passed in (its checks and messages; the machine-dependent fields resolved for
that environment), then the sections, so the same command line resolves for a GPU node on a
CPU host; `from_validated_args` is its second half, the mapping of a namespace `validate_args`
already resolved.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any, cast

from tst_megatron.settings import (
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    Environment,
    KernelsConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RecomputeConfig,
    ReliabilityConfig,
    RunConfig,
    ScheduleConfig,
)
from tst_megatron.settings.reliability import ExitSignal
from tst_megatron.training.arguments import parse_args, validate_args

ENTRY_POINT_ONLY: dict[str, str] = {
    "yaml_config": "read by parse_args: its values become the other flags' defaults",
}
DERIVED_FIELDS: dict[str, str] = {
    "model.padded_vocab_size": "--vocab-size (or the tokenizer's) padded by "
    "--make-vocab-size-divisible-by x TP",
    "parallel.world_size": "the launcher's WORLD_SIZE",
    "parallel.data_parallel_size": "world size / (TP x PP x CP)",
    "parallel.virtual_pipeline_model_parallel_size": "layers per stage / "
    "--num-layers-per-virtual-pipeline-stage",
    "environment": "the machine (Environment.detect) or a described one (Environment.gpu)",
}

_MODEL = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "seq_length", "max_position_embeddings", "vocab_size",
    "make_vocab_size_divisible_by", "position_embedding_type", "rotary_base", "rotary_percent",
    "normalization", "norm_epsilon", "apply_layernorm_1p", "swiglu",
    "untie_embeddings_and_output_weights", "add_bias_linear", "qk_layernorm", "init_method_std",
    "hidden_dropout", "attention_dropout",
)  # fmt: skip
_MOE = (
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "moe_token_dispatcher_type", "moe_layer_freq",
    "moe_router_score_function", "moe_router_pre_softmax", "moe_z_loss_coeff",
    "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "moe_router_dtype",
    "moe_expert_capacity_factor", "moe_token_drop_policy", "moe_pad_expert_input_to_capacity",
)  # fmt: skip
_PARALLEL = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "context_parallel_size",
    "expert_model_parallel_size", "expert_tensor_parallel_size", "sequence_parallel",
    "use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather",
    "overlap_p2p_comm", "distributed_timeout_minutes", "use_torch_fsdp2",
    "torch_fsdp2_reshard_after_forward", "use_megatron_fsdp", "data_parallel_sharding_strategy",
)  # fmt: skip
_RECOMPUTE = ("recompute_granularity", "recompute_method", "recompute_num_layers")
_PRECISION = (
    "fp8", "fp8_recipe", "fp8_param_gather", "attention_softmax_in_fp32",
    "accumulate_allreduce_grads_in_fp32", "loss_scale", "initial_loss_scale", "min_loss_scale",
    "loss_scale_window", "hysteresis",
)  # fmt: skip
_OPTIMIZER = (
    "optimizer", "weight_decay", "start_weight_decay", "end_weight_decay",
    "weight_decay_incr_style", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
)  # fmt: skip
_SCHEDULE = (
    "train_iters", "lr", "min_lr", "lr_decay_style", "lr_decay_iters", "lr_wsd_decay_style",
    "lr_wsd_decay_iters", "lr_warmup_iters", "lr_warmup_init", "tst_phase", "seed",
)  # fmt: skip
_BATCH = ("micro_batch_size", "global_batch_size", "calculate_per_token_loss")
_DATA = (
    "split", "data_cache_path", "mock_data", "tokenizer_type", "tokenizer_model", "vocab_file",
    "merge_file", "eod_mask_loss", "reset_position_ids", "reset_attention_mask",
    "create_attention_mask_in_dataloader", "num_workers",
)  # fmt: skip
_DATA_PATHS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")
_CHECKPOINT = (
    "save", "load", "save_interval", "ckpt_format", "no_load_optim", "no_load_rng", "finetune",
    "ckpt_keep_last", "allow_fresh_start", "ckpt_fully_reshardable",
    "ckpt_fully_parallel_save", "ckpt_fully_parallel_load", "async_save",
    "use_persistent_ckpt_worker", "override_save_lock",
    "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler",
    "tst_allow_schedule_change",
)  # fmt: skip
_LOGGING = (
    "log_interval", "eval_interval", "eval_iters", "tensorboard_dir", "wandb_project",
    "wandb_exp_name", "wandb_save_dir", "metrics_jsonl", "log_throughput", "timing_log_level",
    "timing_log_option", "barrier_with_L1_time", "log_timers_to_tensorboard",
)  # fmt: skip
_RELIABILITY = (
    "exit_signal_handler", "exit_duration_in_mins", "exit_interval", "max_bad_steps",
    "collective_timeout_s", "manual_gc", "manual_gc_interval", "manual_gc_eval",
)  # fmt: skip
_FUSION_FIELD = {
    "masked_softmax_fusion": "masked_softmax_fusion",
    "bias_gelu_fusion": "bias_activation_fusion",
    "bias_swiglu_fusion": "bias_activation_fusion",
    "bias_dropout_fusion": "bias_dropout_fusion",
    "apply_rope_fusion": "apply_rope_fusion",
    "no_persist_layer_norm": "persist_layer_norm",
    "gradient_accumulation_fusion": "gradient_accumulation_fusion",
    "cross_entropy_loss_fusion": "cross_entropy_loss_fusion",
    "cross_entropy_fusion_impl": "cross_entropy_fusion_impl",
}

FLAG_FIELDS: dict[str, str] = {
    **{dest: f"model.{dest}" for dest in _MODEL},
    "group_query_attention": "model.num_query_groups",
    **{dest: f"model.moe.{dest}" for dest in _MOE},
    "moe_aux_loss_coeff": "model.moe.moe_aux_loss_coeff",
    "moe_router_load_balancing_type": "model.moe.moe_router_load_balancing_type",
    **{dest: f"parallel.{dest}" for dest in _PARALLEL},
    "distributed_backend": "parallel.distributed_backend",
    **{dest: f"recompute.{dest}" for dest in _RECOMPUTE},
    "recompute_activations": "recompute.recompute_granularity",
    "recompute_modules": "recompute.recompute_modules",
    "bf16": "precision.params_dtype",
    "fp16": "precision.params_dtype",
    **{dest: f"precision.{dest}" for dest in _PRECISION},
    "transformer_impl": "kernels.transformer_impl",
    "use_cpu_initialization": "kernels.use_cpu_initialization",
    "moe_grouped_gemm": "kernels.moe_grouped_gemm",
    "moe_permute_fusion": "kernels.moe_permute_fusion",
    "tst_fused_output_loss": "kernels.tst_fused_output_loss",
    **{dest: f"kernels.fusions.{field}" for dest, field in _FUSION_FIELD.items()},
    **{dest: f"optimizer.{dest}" for dest in _OPTIMIZER},
    **{dest: f"schedule.{dest}" for dest in _SCHEDULE},
    "lr_warmup_fraction": "schedule.lr_warmup_iters",
    **{dest: f"batch.{dest}" for dest in _BATCH},
    "rampup_batch_size": "batch.rampup_batch_size",
    **{dest: f"data.{dest}" for dest in (*_DATA_PATHS, *_DATA)},
    **{dest: f"checkpoint.{dest}" for dest in _CHECKPOINT},
    **{dest: f"logging.{dest}" for dest in _LOGGING},
    "peak_tflops": "logging.peak_tflops",
    **{dest: f"reliability.{dest}" for dest in _RELIABILITY},
    "exit_signal": "reliability.exit_signal",
    "tst_bag_size": "tst.bag_size",
    "tst_mode": "tst.mode",
    "tst_phase1_fraction": "tst.phase1_fraction",
    "tst_phase1_iters": "tst.phase1_iters",
    "tst_fold": "tst.fold",
    "tst_bag_weighting": "tst.bag_weighting",
    "tst_bag_weights": "tst.bag_weights",
}


def resolve(args: argparse.Namespace, world_size: int, env: Environment) -> RunConfig:
    """Validate the flags ``args`` as given for ``env`` (`validate_args`, which fills
    ``args``) and map them to their sections.

    Raises:
        ConfigError: from `validate_args` (e.g. Transformer Engine asked for where ``env``
            has none).
    """
    validate_args(args, world_size, env)
    return from_validated_args(args, env)


def settings_from_flags(
    argv: list[str], world_size: int = 1, env: Environment | None = None
) -> RunConfig:
    """`RunConfig` of a command line (``pretrain_tst.py``'s flags, ``--yaml-config`` included)
    for ``world_size`` ranks on ``env`` (default: this machine, `Environment.detect`)."""
    return resolve(parse_args(argv), world_size, env or Environment.detect())


def from_validated_args(args: argparse.Namespace, env: Environment | None = None) -> RunConfig:
    """`RunConfig` of arguments `validate_args` resolved for ``env`` (default
    `Environment.detect`, this machine, which `validate_args` defaults to as well).

    Raises:
        SettingsError: ``env`` is not the environment ``args`` were validated for and cannot
            run them (e.g. Transformer Engine where it is missing).
    """
    return _run_config(args, env or Environment.detect())


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The model section of validated ``args``."""
    moe = None
    if args.num_experts:
        moe = MoEConfig(
            **_take(args, _MOE),
            moe_aux_loss_coeff=_scalar_or_tuple(args.moe_aux_loss_coeff),
            moe_router_load_balancing_type=_scalar_or_tuple(args.moe_router_load_balancing_type),
        )
    return ModelConfig(**_take(args, _MODEL), padded_vocab_size=args.padded_vocab_size, moe=moe)


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """The parallel section of validated ``args``."""
    return ParallelConfig(
        **_take(args, _PARALLEL),
        world_size=args.world_size,
        data_parallel_size=args.data_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        distributed_backend=args.distributed_backend,
    )


def _run_config(args: argparse.Namespace, env: Environment) -> RunConfig:
    return RunConfig(
        environment=env,
        model=model_config(args),
        parallel=parallel_config(args),
        recompute=RecomputeConfig(
            **_take(args, _RECOMPUTE),
            recompute_modules=_tuple(args.recompute_modules),
        ),
        precision=PrecisionConfig(
            **_take(args, _PRECISION),
            params_dtype="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        ),
        kernels=KernelsConfig(
            transformer_impl=args.transformer_impl,
            use_cpu_initialization=args.use_cpu_initialization,
            fusions=args.fusions,
            moe_grouped_gemm=args.moe_grouped_gemm,
            moe_permute_fusion=bool(args.moe_permute_fusion),
            tst_fused_output_loss=args.tst_fused_output_loss,
        ),
        optimizer=OptimizerConfig(**_take(args, _OPTIMIZER)),
        schedule=ScheduleConfig(**_take(args, _SCHEDULE)),
        batch=BatchConfig(**_take(args, _BATCH), rampup_batch_size=_tuple(args.rampup_batch_size)),
        data=DataConfig(
            **_take(args, _DATA),
            data_path=_tuple(args.data_path),
            train_data_path=_tuple(args.train_data_path),
            valid_data_path=_tuple(args.valid_data_path),
            test_data_path=_tuple(args.test_data_path),
        ),
        checkpoint=CheckpointConfig(**_take(args, _CHECKPOINT)),
        logging=LoggingConfig(**_take(args, _LOGGING), peak_tflops=args.peak_tflops),
        reliability=ReliabilityConfig(
            **_take(args, _RELIABILITY), exit_signal=_exit_signal(args.exit_signal)
        ),
        tst=args.tst,
    )


def _take(args: argparse.Namespace, dests: tuple[str, ...]) -> dict[str, Any]:
    return {dest: getattr(args, dest) for dest in dests}


def _tuple(value: Any) -> tuple | None:
    return None if value is None else tuple(value)


def _scalar_or_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _exit_signal(value: str | signal.Signals) -> ExitSignal:
    """``--exit-signal`` as given (a name) or as `validate_args` leaves it (a signal)."""
    return cast(ExitSignal, value if isinstance(value, str) else value.name)
