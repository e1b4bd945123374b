"""FLOPs per step, analytic parameter counts (checked against built models), peak table, MFU."""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings

import pytest
import torch

from tests.model_settings import config_of, model_of
from tst_megatron.settings import Environment, ModelConfig, MoEConfig
from tst_megatron.training.arguments import parse_args, validate_args
from tst_megatron.training.flops import (
    achieved_tflops_per_gpu,
    current_device_peak_tflops,
    flops_per_step,
    flops_per_token,
    mfu,
    moe_layer_pattern,
    peak_tflops_for_device,
    total_and_active_params,
)
from tst_megatron.training.model_builder import build_meta_model, single_process_parallel_state
from tst_megatron.training.run_config import model_config, settings_from_flags

SHAPE = {"num_layers": 2, "hidden_size": 8, "ffn_hidden_size": 32, "seq_length": 4,
         "max_position_embeddings": 4, "padded_vocab_size": 16}  # fmt: skip
DENSE = ModelConfig(**SHAPE, num_attention_heads=2, num_query_groups=2, kv_channels=4)
MOE = ModelConfig(
    **SHAPE,
    num_attention_heads=4,
    num_query_groups=1,
    kv_channels=2,
    swiglu=True,
    moe=MoEConfig(
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=8,
        moe_layer_freq=2,
    ),
)


# ------------------------------------------------------------------ FLOPs -------------------


def test_dense_flops_by_hand():
    # Multiply-adds per token and layer: QKV 8*(8+2*8), proj 8*8, fc1 8*32, fc2 32*8.
    per_layer = 8 * 24 + 64 + 256 + 256
    per_token = 2 * per_layer + 8 * 16  # + LM head
    # Causal core per layer and sample: QK^T and softmax*V over half the 4x4 scores, q = 8.
    core = 2 * (4 * 4 // 2) * 8
    macs = 3 * 4 * per_token + 3 * 2 * core  # batch 3, seq 4
    assert flops_per_step(DENSE, seq_length=4, batch_size=3) == 6 * macs  # fwd+bwd, 2 per MAC


def test_moe_flops_by_hand():
    # Layer 0 is MoE (i % 2 == 0), layer 1 dense. q = 4*2 = 8, one kv group of 2.
    attention = 8 * (8 + 2 * 2) + 8 * 8
    dense_mlp = 3 * 8 * 32  # SwiGLU: three h x ffn matrices
    moe_mlp = 2 * 3 * 8 * 16 + 3 * 8 * 8 + 8 * 4  # 2 routed experts, shared expert, router
    per_token = 2 * attention + dense_mlp + moe_mlp + 8 * 16
    core = 2 * (5 * 5 / 2) * 8
    macs = 2 * 5 * per_token + 2 * 2 * core  # batch 2, seq 5
    assert flops_per_step(MOE, seq_length=5, batch_size=2) == pytest.approx(6 * macs)


def megatron_flops(args, batch_size: int) -> float:
    """Megatron-LM's `num_floating_point_operations` (transformer path), transcribed."""
    moe_pattern = [1 if i % args.moe_layer_freq == 0 else 0 for i in range(args.num_layers)]
    num_moe_layers = sum(moe_pattern) if args.num_experts else 0
    num_dense_layers = args.num_layers - num_moe_layers
    routed = args.moe_router_topk if args.num_experts else 0
    shared = args.moe_shared_expert_intermediate_size or 0
    ffn_factor = 3 if args.swiglu else 2
    moe_ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size
    query = args.kv_channels * args.num_attention_heads
    kv = args.kv_channels * args.num_query_groups
    self_attn = 3 * 2 * (args.hidden_size * (query + 2 * kv) + query * args.hidden_size)
    core = 3 * 2 * query / 2 * 2
    return (
        batch_size
        * args.seq_length
        * (
            3
            * 2
            * args.hidden_size
            * (
                args.ffn_hidden_size * ffn_factor * num_dense_layers
                + moe_ffn * routed * ffn_factor * num_moe_layers
                + shared * ffn_factor * num_moe_layers
            )
            + self_attn * args.num_layers
            + 3 * 2 * args.hidden_size * args.padded_vocab_size
        )
        + batch_size * args.seq_length**2 * core * args.num_layers
    )


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "--swiglu --num-query-groups 2 --kv-channels 32",
        "--swiglu --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 48 "
        "--moe-shared-expert-intermediate-size 96 --moe-layer-freq 2 --disable-bias-linear",
    ],
)
def test_matches_megatron_formula_plus_router(extra):
    args = validated_args(extra)
    shape = model_config(args)
    router = 6 * args.hidden_size * (args.num_experts or 0) * shape.num_moe_layers
    expected = megatron_flops(args, batch_size=4) + 4 * args.seq_length * router
    assert flops_per_step(shape, args.seq_length, 4) == pytest.approx(expected, rel=1e-12)


def test_flops_per_token_and_tied_untied_equal():
    assert flops_per_token(DENSE, 4) == flops_per_step(DENSE, 4, 1) / 4
    untied = dataclasses.replace(DENSE, untie_embeddings_and_output_weights=True)
    assert flops_per_step(untied, 4, 2) == flops_per_step(DENSE, 4, 2)


def test_moe_layer_pattern():
    assert moe_layer_pattern(5, 1) == [1, 1, 1, 1, 1]
    assert moe_layer_pattern(5, 2) == [1, 0, 1, 0, 1]
    assert (MOE.num_moe_layers, MOE.num_dense_layers) == (1, 1)
    assert (DENSE.num_moe_layers, DENSE.num_dense_layers) == (0, 2)


# ------------------------------------------------------------------ parameters --------------

BASE = (
    "--num-layers 3 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--micro-batch-size 1 --train-iters 10 --lr 1e-3 --mock-data --vocab-size 100"
)
PARAM_CASES = [
    "",  # LayerNorm, biases, tied, learned positions
    "--untie-embeddings-and-output-weights --position-embedding-type rope",
    "--swiglu --normalization RMSNorm --num-query-groups 2 --qk-layernorm --disable-bias-linear "
    "--untie-embeddings-and-output-weights --position-embedding-type rope",
    "--qk-layernorm --kv-channels 16 --ffn-hidden-size 48",
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 24",  # MoE with biases
    "--swiglu --normalization RMSNorm --disable-bias-linear --num-experts 4 --moe-router-topk 2 "
    "--moe-ffn-hidden-size 24 --moe-shared-expert-intermediate-size 40 --moe-layer-freq 2 "
    "--qk-layernorm --num-query-groups 1 --untie-embeddings-and-output-weights",
]


def validated_args(extra: str):
    args = parse_args(f"{BASE} {extra}".split())
    validate_args(args, world_size=1)
    return args


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def routed_expert_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)


@pytest.mark.parametrize("extra", PARAM_CASES)
def test_param_counts_match_meta_model(extra):
    shape = settings_from_flags(f"{BASE} {extra}".split()).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_meta_model(shape)
    assert all(p.device.type == "meta" for p in model.parameters())
    total, active = total_and_active_params(shape)
    assert total == count(model)
    inactive = 0
    if shape.moe is not None:
        experts, topk = shape.moe.num_experts, shape.moe.moe_router_topk
        inactive = routed_expert_params(model) * (experts - topk) // experts
    assert active == total - inactive


CPU_SPEC = importlib.util.find_spec("tst_megatron.cpu.layer_spec") is not None


@pytest.mark.skipif(not CPU_SPEC, reason="tst_megatron.cpu.layer_spec not written yet")
@pytest.mark.parametrize("extra", [PARAM_CASES[2], PARAM_CASES[-1]])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_param_counts_match_real_cpu_model(extra, sequence_parallel):
    """The model `build_model` makes on CPU (construction needs no CPU shim)."""
    settings = settings_from_flags(f"{BASE} {extra}".split())
    config = config_of(settings)
    if sequence_parallel:  # the SP final norm, built at TP=1 (forward needs TP > 1)
        config.sequence_parallel = True
    with warnings.catch_warnings(), single_process_parallel_state():
        warnings.simplefilter("ignore")
        model = model_of(settings, config)
    assert count(model) == total_and_active_params(settings.model)[0]
    layers = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    moe = settings.model.moe
    expected = ["MoELayer", "MLP", "MoELayer"] if moe and moe.moe_layer_freq == 2 else ["MLP"] * 3
    assert layers == expected


# ------------------------------------------------------------------ peak and MFU ------------


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GB200", 2500.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table(name, tflops):
    assert peak_tflops_for_device(name) == tflops
    if tflops is not None:
        assert peak_tflops_for_device(name, fp8=True) == 2 * tflops


def test_fp8_mfu_is_against_the_bf16_peak():
    """--fp8-format on an H100: the default --peak-tflops is the BF16 peak, not twice it."""
    flags = [*BASE.split(), "--transformer-impl", "transformer_engine"]
    for extra in ([], ["--fp8-format", "hybrid"]):
        args = parse_args([*flags, *extra])
        validate_args(args, world_size=1, env=Environment.gpu("h100"))
        assert args.peak_tflops == 989.0


def test_cpu_has_no_peak():
    if torch.cuda.is_available():
        pytest.skip("CUDA device present")
    assert current_device_peak_tflops() is None


def test_mfu():
    step_flops = 4.0e15
    tflops = achieved_tflops_per_gpu(step_flops, step_seconds=2.0, num_gpus=4)
    assert tflops == pytest.approx(500.0)
    assert mfu(tflops, 1000.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak"):
        mfu(tflops, 0.0)
