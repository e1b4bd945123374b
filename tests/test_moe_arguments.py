"""MoE routing / capacity, recompute, per-token loss, timing and GC flags: parsing, refusals,
and the values they put into Megatron-Core's `TransformerConfig` (no model is built)."""

from __future__ import annotations

import warnings

import pytest

from tests import model_settings
from tst_megatron.kernels import KernelAvailability
from tst_megatron.settings import Environment
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args
from tst_megatron.training.run_config import settings_from_flags

BASE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "100", "--lr", "1e-3",
    "--mock-data", "--vocab-size", "1000", "--distributed-backend", "gloo",
]  # fmt: skip
MOE = ["--num-experts", "8", "--moe-router-topk", "2"]


def validated(*extra: str, world_size: int = 1, moe: bool = True, env: Environment | None = None):
    args = parse_args([*BASE, *(MOE if moe else []), *" ".join(extra).split()])
    validate_args(args, world_size=world_size, env=env)
    return args


def config_of(*extra: str, world_size: int = 1, moe: bool = True):
    argv = [*BASE, *(MOE if moe else []), *" ".join(extra).split()]
    return model_settings.config_of(settings_from_flags(argv, world_size))


def test_routing_and_capacity_flags_reach_transformer_config():
    config = config_of(
        "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
        "--moe-router-bias-update-rate 0.01 --moe-router-topk-scaling-factor 2.5 "
        "--moe-router-num-groups 4 --moe-router-group-topk 2 --moe-router-dtype fp64 "
        "--moe-expert-capacity-factor 1.5 --moe-token-drop-policy position "
        "--moe-pad-expert-input-to-capacity --moe-token-dispatcher-type alltoall"
    )
    assert config.moe_router_score_function == "sigmoid"
    assert config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate == 0.01
    assert config.moe_router_topk_scaling_factor == 2.5
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (4, 2)
    assert config.moe_router_dtype == "fp64"
    assert config.moe_expert_capacity_factor == 1.5
    assert config.moe_token_drop_policy == "position"
    assert config.moe_pad_expert_input_to_capacity


def test_defaults_reach_transformer_config():
    config = config_of()
    assert not config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate == 1e-3
    assert config.moe_router_topk_scaling_factor is None
    assert config.moe_router_num_groups is None and config.moe_router_group_topk is None
    assert config.moe_router_dtype == "fp32"  # ours: Megatron-LM leaves it unset
    assert config.moe_expert_capacity_factor is None and not config.moe_pad_expert_input_to_capacity
    assert config.moe_permute_fusion is False  # no Transformer Engine / GPU here
    assert config_of("--moe-router-dtype none").moe_router_dtype is None


@pytest.mark.parametrize(
    ("types", "coeffs", "expected_type", "expected_coeff"),
    [
        ("aux_loss", "0.01", "aux_loss", 0.01),
        ("seq_aux_loss", "0.01", "seq_aux_loss", 0.01),
        ("global_aux_loss", "0.01", "global_aux_loss", 0.01),
        ("sinkhorn", "0", "sinkhorn", 0.0),
        ("none", "0", "none", 0.0),
        ("aux_loss seq_aux_loss", "0.01 0.001", ["aux_loss", "seq_aux_loss"], [0.01, 0.001]),
    ],
)
def test_every_load_balancing_type_megatron_core_accepts(
    types, coeffs, expected_type, expected_coeff
):
    extra = f"--moe-router-load-balancing-type {types} --moe-aux-loss-coeff {coeffs}"
    config = config_of(extra)  # Megatron-Core's own __post_init__ checks run here too
    assert config.moe_router_load_balancing_type == expected_type
    assert config.moe_aux_loss_coeff == expected_coeff


def test_yaml_takes_one_value_or_a_list_for_list_flags(tmp_path):
    path = tmp_path / "moe.yaml"
    path.write_text("moe-aux-loss-coeff: 1.0e-3\nmoe-router-load-balancing-type: aux_loss\n")
    args = parse_args([*BASE, *MOE, "--yaml-config", str(path)])
    validate_args(args, 1)
    assert (args.moe_aux_loss_coeff, args.moe_router_load_balancing_type) == (1e-3, "aux_loss")
    path.write_text(
        "moe-aux-loss-coeff: [1.0e-2, 1.0e-4]\n"
        "moe-router-load-balancing-type: [aux_loss, global_aux_loss]\n"
        "no-moe-permute-fusion: true\n"
    )
    args = parse_args([*BASE, *MOE, "--yaml-config", str(path)])
    validate_args(args, 1)
    assert args.moe_aux_loss_coeff == [1e-2, 1e-4]
    assert args.moe_router_load_balancing_type == ["aux_loss", "global_aux_loss"]
    assert args.moe_permute_fusion is False


def test_permute_fusion_resolves_off_without_transformer_engine_kernels():
    assert validated().moe_permute_fusion is False
    assert validated("--no-moe-permute-fusion").moe_permute_fusion is False
    cpu_with_te = Environment(kernels=KernelAvailability(cuda=False, transformer_engine=True))
    args = validated("--transformer-impl transformer_engine", env=cpu_with_te)  # no GPU
    assert args.moe_permute_fusion is False


def test_grouped_gemm_resolves_off_where_the_automatic_implementation_cannot_run_it():
    with pytest.warns(UserWarning, match="--moe-grouped-gemm.*SequentialMLP"):
        args = validated("--moe-grouped-gemm")
    assert args.transformer_impl == "local" and args.moe_grouped_gemm is False


def test_recompute_flags_reach_transformer_config():
    config = config_of("--recompute-activations", moe=False)
    assert config.recompute_granularity == "selective"
    assert config.recompute_modules == ["core_attn"]  # Megatron-Core's default
    config = config_of("--recompute-activations --recompute-modules core_attn moe")
    assert config.recompute_modules == ["core_attn", "moe"]
    config = config_of(
        "--recompute-granularity full --recompute-method block --recompute-num-layers 2"
    )
    assert (config.recompute_granularity, config.recompute_method) == ("full", "block")
    assert config.recompute_num_layers == 2
    assert config_of().recompute_granularity is None


def test_per_token_loss_and_timer_barrier_reach_transformer_config():
    config = config_of("--calculate-per-token-loss --no-barrier-with-level-1-timing")
    assert config.calculate_per_token_loss and config.barrier_with_L1_time is False
    config = config_of()
    assert not config.calculate_per_token_loss and config.barrier_with_L1_time is True


def test_timing_and_gc_flags_parse():
    args = validated(
        "--timing-log-level 2 --timing-log-option all --manual-gc --manual-gc-interval 5 "
        "--no-manual-gc-eval"
    )
    assert (args.timing_log_level, args.timing_log_option) == (2, "all")
    assert args.manual_gc and args.manual_gc_interval == 5 and not args.manual_gc_eval


@pytest.mark.parametrize(
    ("extra", "moe", "parts"),
    [
        # routing
        (
            "--moe-router-enable-expert-bias",
            True,
            ("--moe-router-enable-expert-bias", "--moe-router-score-function sigmoid", "softmax"),
        ),
        (
            "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
            "--moe-router-bias-update-rate 0",
            True,
            ("--moe-router-bias-update-rate", "> 0"),
        ),
        ("--moe-router-topk-scaling-factor 0", True, ("--moe-router-topk-scaling-factor", "> 0")),
        ("--moe-router-num-groups 4", True, ("--moe-router-num-groups", "--moe-router-group-topk")),
        ("--moe-router-group-topk 1", True, ("--moe-router-num-groups", "--moe-router-group-topk")),
        (
            "--moe-router-num-groups 3 --moe-router-group-topk 1",
            True,
            ("--moe-router-num-groups 3", "--num-experts 8"),
        ),
        (
            "--moe-router-num-groups 4 --moe-router-group-topk 3",
            True,
            ("--moe-router-group-topk 3", "--moe-router-topk 2"),
        ),
        (
            "--moe-router-num-groups 8 --moe-router-group-topk 1",
            True,
            ("--moe-router-group-topk 1", "fewer than", "--moe-router-topk 2"),
        ),
        (
            "--moe-router-load-balancing-type sinkhorn --moe-aux-loss-coeff 0 "
            "--moe-router-topk-scaling-factor 2",
            True,
            ("sinkhorn", "--moe-router-topk-scaling-factor"),
        ),
        (
            "--moe-router-load-balancing-type aux_loss sinkhorn --moe-aux-loss-coeff 0.1 0",
            True,
            ("--moe-router-load-balancing-type aux_loss sinkhorn", "stand alone"),
        ),
        (
            "--moe-router-load-balancing-type aux_loss seq_aux_loss --moe-aux-loss-coeff 0.1",
            True,
            ("--moe-router-load-balancing-type aux_loss seq_aux_loss", "--moe-aux-loss-coeff"),
        ),
        (
            "--moe-router-load-balancing-type aux_loss aux_loss --moe-aux-loss-coeff 0.1 0.1",
            True,
            ("--moe-router-load-balancing-type aux_loss aux_loss", "once"),
        ),
        ("--moe-aux-loss-coeff -1", True, ("--moe-aux-loss-coeff", ">= 0")),
        # capacity
        ("--moe-expert-capacity-factor 0", True, ("--moe-expert-capacity-factor", "dropless")),
        (
            "--moe-pad-expert-input-to-capacity",
            True,
            ("--moe-pad-expert-input-to-capacity", "--moe-expert-capacity-factor"),
        ),
        (
            "--moe-token-drop-policy position",
            True,
            ("--moe-token-drop-policy position", "--moe-expert-capacity-factor"),
        ),
        (
            "--moe-expert-capacity-factor 1 --moe-router-load-balancing-type sinkhorn "
            "--moe-aux-loss-coeff 0",
            True,
            ("--moe-expert-capacity-factor 1", "sinkhorn"),
        ),
        # speed flags
        ("--moe-permute-fusion", True, ("--moe-permute-fusion", "Transformer Engine", "GPU")),
        # biases and expert tensor parallelism
        (
            "--tensor-model-parallel-size 2 --sequence-parallel",
            True,
            ("--expert-tensor-parallel-size 2", "--disable-bias-linear"),
        ),
        # MoE flags without experts
        (
            "--moe-router-enable-expert-bias --moe-expert-capacity-factor 1",
            False,
            ("--moe-router-enable-expert-bias", "--moe-expert-capacity-factor", "--num-experts"),
        ),
        # recompute
        (
            "--recompute-activations --recompute-granularity full --recompute-method uniform "
            "--recompute-num-layers 1",
            True,
            ("--recompute-activations", "--recompute-granularity full"),
        ),
        (
            "--recompute-method uniform",
            True,
            ("--recompute-method", "--recompute-granularity full"),
        ),
        (
            "--recompute-granularity full --recompute-method block --recompute-num-layers 5",
            True,
            ("--recompute-num-layers 5", "4 layers"),
        ),
        (
            "--recompute-activations --recompute-num-layers 1",
            True,
            ("--recompute-num-layers 1", "selective"),
        ),
        ("--recompute-modules core_attn", True, ("--recompute-modules", "--recompute-activations")),
        ("--recompute-activations --recompute-modules", True, ("--recompute-modules",)),
        (
            "--recompute-activations --recompute-modules moe_act",
            True,
            ("--recompute-modules moe_act", "--moe-grouped-gemm"),
        ),
        ("--recompute-activations --recompute-modules moe", False, ("--recompute-modules moe",)),
        (
            "--recompute-activations --recompute-modules shared_experts",
            True,
            ("--recompute-modules shared_experts", "--moe-shared-expert-intermediate-size"),
        ),
        (
            "--recompute-activations --recompute-modules mlp",
            True,
            ("--recompute-modules mlp", "every layer is MoE"),
        ),
        (
            "--recompute-activations --recompute-modules layernorm",
            True,
            ("--recompute-modules layernorm", "Transformer Engine"),
        ),
        # timing and gc
        ("--manual-gc-interval 10", True, ("--manual-gc-interval", "--manual-gc")),
        ("--no-manual-gc-eval", True, ("--no-manual-gc-eval", "--manual-gc")),
        ("--manual-gc --manual-gc-interval -1", True, ("--manual-gc-interval", ">= 0")),
        ("--log-timers-to-tensorboard", True, ("--log-timers-to-tensorboard", "--tensorboard-dir")),
    ],
)
def test_refused_combinations_name_the_flags(extra, moe, parts):
    args = parse_args([*BASE, *(MOE if moe else []), *extra.split()])
    world = 2 if "--tensor-model-parallel-size 2" in extra else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as info:
            validate_args(args, world_size=world)
    for part in parts:
        assert part in str(info.value), f"{part!r} missing from: {info.value}"
