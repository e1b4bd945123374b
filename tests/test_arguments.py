"""`pretrain_tst.py` arguments: parsing, YAML defaults, validation messages, derived fields."""

from __future__ import annotations

import dataclasses
import signal
import warnings

import pytest
import torch

from tests.model_settings import config_of
from tst_megatron.config import TSTConfig
from tst_megatron.data.tokenizer import pad_vocab_size
from tst_megatron.kernels import KernelAvailability
from tst_megatron.settings import Environment, RunConfig
from tst_megatron.training.arguments import (
    ConfigError,
    parse_args,
    validate_args,
)
from tst_megatron.training.run_config import from_validated_args

BASE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "100", "--lr", "1e-3",
    "--mock-data", "--vocab-size", "1000",
]  # fmt: skip


def validated(*extra: str, world_size: int = 1, env: Environment | None = None):
    args = parse_args([*BASE, *" ".join(extra).split()])
    validate_args(args, world_size=world_size, env=env)
    return args


def rejected(
    *extra: str,
    world_size: int = 1,
    base: tuple[str, ...] = tuple(BASE),
    env: Environment | None = None,
) -> str:
    """Validate and return the ConfigError message (the test fails if nothing is raised)."""
    args = parse_args([*base, *" ".join(extra).split()])
    with pytest.raises(ConfigError) as info:
        validate_args(args, world_size=world_size, env=env)
    return str(info.value)


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} missing from: {message}"


# A CPU host with Transformer Engine installed (the CPU test machine has none).
CPU_WITH_TE = Environment(kernels=KernelAvailability(cuda=False, transformer_engine=True))


# ------------------------------------------------------------------ parser ------------------


def test_help_lists_every_group(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    groups = (
        "model",
        "moe",
        "parallelism",
        "precision",
        "optimization",
        "learning-rate",
        "data",
        "checkpointing",
        "logging",
        "TST",
        "reliability",
        "config file",
    )
    for group in groups:
        assert f"\n{group}:" in text, group
    for flag in ("--num-layers", "--tst-bag-size", "--max-bad-steps", "--yaml-config"):
        assert flag in text


def test_megatron_attribute_names_and_defaults():
    args = parse_args(BASE)
    assert args.tensor_model_parallel_size == 1
    assert args.make_vocab_size_divisible_by == 128
    assert args.add_bias_linear is True
    assert args.create_attention_mask_in_dataloader is True
    assert args.fp8 is None and args.fp8_recipe == "delayed"
    assert args.split == "969, 30, 1"
    assert args.position_embedding_type == "learned_absolute"
    assert (args.tst_bag_size, args.tst_mode, args.tst_phase) == (1, "full", "auto")
    args = parse_args([*BASE, "--disable-bias-linear", "--no-create-attention-mask-in-dataloader"])
    assert args.add_bias_linear is False and args.create_attention_mask_in_dataloader is False


def test_unknown_flag_fails_with_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([*BASE, "--no-such-flag", "3"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_abbreviated_flag_is_not_accepted(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--num-lay", "4"])
    assert "--num-lay" in capsys.readouterr().err


def test_data_path_blend_and_rampup_values():
    args = parse_args(
        [*BASE, "--data-path", "0.3", "a", "0.7", "b", "--rampup-batch-size", "2", "2", "1000"]
    )
    assert args.data_path == ["0.3", "a", "0.7", "b"]
    assert args.rampup_batch_size == [2, 2, 1000]


# ------------------------------------------------------------------ YAML --------------------


def write_yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_values_are_defaults_and_command_line_wins(tmp_path):
    path = write_yaml(tmp_path, "num_layers: 8\nhidden-size: 128\nlr: 3e-4\nswiglu: true\n")
    args = parse_args([*BASE, "--yaml-config", str(path)])
    assert args.num_layers == 4  # BASE gives --num-layers 4 on the command line
    assert args.hidden_size == 64
    assert args.lr == 1e-3
    assert args.swiglu is True  # only in the file
    args = parse_args(["--config", str(path)])
    assert (args.num_layers, args.hidden_size, args.lr) == (8, 128, 3e-4)


def test_yaml_flag_keys_and_attribute_keys(tmp_path):
    path = write_yaml(
        tmp_path,
        "disable_bias_linear: true\nfp8_recipe: mxfp8\ndata-path: 0.5 a 0.5 b\n"
        "rampup_batch_size: [2, 2, 100]\ntst_phase: 1\n",
    )
    args = parse_args(["--yaml-config", str(path)])
    assert args.add_bias_linear is False
    assert args.fp8_recipe == "mxfp8"
    assert args.data_path == ["0.5", "a", "0.5", "b"]
    assert args.rampup_batch_size == [2, 2, 100]
    assert args.tst_phase == "1"
    path = write_yaml(tmp_path, "add_bias_linear: false\n")
    assert parse_args(["--yaml-config", str(path)]).add_bias_linear is False


def test_yaml_unknown_key_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "num_layers: 2\nnum_layerz: 3\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--yaml-config", str(path)])
    assert_names(str(info.value), "'num_layerz'", str(path))


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("num_layers: two\n", ("'num_layers'", "'two'")),
        ("num_layers: 2.5\n", ("'num_layers'", "2.5")),
        ("normalization: BatchNorm\n", ("'normalization'", "LayerNorm, RMSNorm", "BatchNorm")),
        ("swiglu: 1\n", ("'swiglu'", "true or false")),
        ("rampup_batch_size: [1, 2]\n", ("'rampup_batch_size'", "3 values")),
        ("- num_layers\n", ("mapping",)),
    ],
)
def test_yaml_bad_values(tmp_path, text, parts):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_args(["--yaml-config", str(path)])
    assert_names(str(info.value), *parts)


def test_yaml_missing_file():
    with pytest.raises(ConfigError, match="cannot read --yaml-config"):
        parse_args(["--yaml-config", "/nonexistent/run.yaml"])


# ------------------------------------------------------------------ derived fields ----------


def test_derived_fields_defaults():
    args = validated()
    assert args.world_size == 1 and args.data_parallel_size == 1
    assert args.padded_vocab_size == 1024
    assert args.ffn_hidden_size == 256
    assert args.kv_channels == 16
    assert args.num_query_groups == 4 and not args.group_query_attention
    assert args.max_position_embeddings == 32
    assert args.global_batch_size == 2
    assert args.lr_decay_iters == 100
    assert args.params_dtype == torch.float32
    assert args.transformer_impl == "local"  # no CUDA / no Transformer Engine here
    assert args.use_cpu_initialization is True
    assert args.tokenizer_type == "NullTokenizer"
    assert args.tst == TSTConfig()
    assert args.exit_signal is signal.SIGTERM
    assert args.collective_timeout_s == 600.0
    assert args.peak_tflops is None  # CPU
    assert args.start_weight_decay == args.end_weight_decay == 0.01
    assert args.virtual_pipeline_model_parallel_size is None


def test_padded_vocab_and_data_parallel_size():
    args = validated(
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2", world_size=8
    )
    assert args.data_parallel_size == 2
    assert args.padded_vocab_size == 1024  # multiple of 128 * TP 2
    assert pad_vocab_size(50257, 128, 2) == 50432
    args = validated("--make-vocab-size-divisible-by 64 --vocab-size 1030")
    assert args.padded_vocab_size == 1088


def test_swiglu_ffn_default_follows_megatron():
    args = validated("--swiglu --hidden-size 4096 --num-attention-heads 32")
    assert args.ffn_hidden_size == 10880  # int(4*4096*2/3 / 64) * 64


def test_query_groups_and_gqa_flag():
    assert validated("--num-query-groups 2").group_query_attention is True
    assert validated("--group-query-attention").num_query_groups == 1


def test_virtual_pipeline_size_and_batch_defaults():
    args = validated(
        "--num-layers 8 --pipeline-model-parallel-size 2 "
        "--num-layers-per-virtual-pipeline-stage 2 --global-batch-size 16",
        world_size=4,
    )
    assert args.virtual_pipeline_model_parallel_size == 2
    assert args.data_parallel_size == 2


def test_precision_and_warmup_derived():
    args = validated(
        "--bf16 --lr-warmup-fraction 0.1 --exit-signal SIGUSR1 "
        "--collective-timeout-s 30 --peak-tflops 500"
    )
    assert args.params_dtype == torch.bfloat16
    assert args.accumulate_allreduce_grads_in_fp32 is True
    assert args.lr_warmup_iters == 10
    assert args.exit_signal is signal.SIGUSR1
    assert args.collective_timeout_s == 30.0
    assert args.peak_tflops == 500.0


def test_moe_derived_fields():
    args = validated(
        "--num-experts 8 --ffn-hidden-size 128 --expert-model-parallel-size 2", world_size=2
    )
    assert args.moe_ffn_hidden_size == 128
    assert args.expert_tensor_parallel_size == 1
    assert validated("--num-experts 0").num_experts is None


def test_tst_config_built():
    args = validated("--tst-bag-size 4 --tst-phase1-fraction 0.3 --tst-mode output-only")
    assert args.tst == TSTConfig(bag_size=4, mode="output-only", phase1_fraction=0.3)
    assert args.tst.phase1_iterations(args.train_iters) == 30
    args = validated("--tst-bag-size 4 --tst-phase1-iters 25 --tst-phase 2 --load /ckpt")
    assert args.tst.phase1_iters == 25 and args.tst_phase == "2"


def test_sequence_parallel_without_tp_is_disabled_with_warning():
    with pytest.warns(UserWarning, match="--sequence-parallel"):
        args = validated("--sequence-parallel")
    assert args.sequence_parallel is False


def test_fp8_passes_with_transformer_engine():
    args = validated(
        "--fp8-format hybrid --bf16 --transformer-impl transformer_engine", env=CPU_WITH_TE
    )
    assert args.fp8 == "hybrid"


# ------------------------------------------------------------------ rejections --------------


@pytest.mark.parametrize(
    ("extra", "world_size", "parts"),
    [
        # parallel layout
        (
            "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2",
            6,
            ("world size 6", "--tensor-model-parallel-size 2", "--pipeline-model-parallel-size 2"),
        ),
        ("--num-layers 3 --pipeline-model-parallel-size 2", 2, ("--num-layers 3", "2")),
        (
            "--num-layers-per-virtual-pipeline-stage 2",
            1,
            ("--num-layers-per-virtual-pipeline-stage 2", "--pipeline-model-parallel-size > 1"),
        ),
        (
            "--num-layers 8 --pipeline-model-parallel-size 2 "
            "--num-layers-per-virtual-pipeline-stage 3",
            2,
            ("--num-layers-per-virtual-pipeline-stage 3", "4 layers per pipeline stage"),
        ),
        (
            "--num-layers 8 --pipeline-model-parallel-size 2 "
            "--num-layers-per-virtual-pipeline-stage 2 --global-batch-size 6",
            2,
            ("interleaved pipeline", "--pipeline-model-parallel-size 2", "--global-batch-size"),
        ),
        (
            "--num-layers 8 --pipeline-model-parallel-size 2 "
            "--num-layers-per-virtual-pipeline-stage 2 --global-batch-size 4 --eval-iters 3",
            2,
            ("interleaved pipeline", "--eval-iters gives 3 per step"),
        ),
        (
            "--tensor-model-parallel-size 4 --sequence-parallel --seq-length 30",
            4,
            ("--sequence-parallel", "--seq-length 30", "--tensor-model-parallel-size 4"),
        ),
        (
            "--context-parallel-size 2 --seq-length 30",
            2,
            ("--seq-length 30", "--context-parallel-size 2", "latent"),
        ),
        ("--overlap-param-gather", 1, ("--overlap-param-gather", "--use-distributed-optimizer")),
        # attention heads
        (
            "--tensor-model-parallel-size 4 --num-attention-heads 6 --hidden-size 96",
            4,
            ("--num-attention-heads 6", "--tensor-model-parallel-size 4"),
        ),
        (
            "--tensor-model-parallel-size 4 --num-attention-heads 8 --num-query-groups 2",
            4,
            ("--num-query-groups 2", "--tensor-model-parallel-size 4"),
        ),
        (
            "--num-attention-heads 8 --num-query-groups 3",
            1,
            ("--num-attention-heads 8", "--num-query-groups 3"),
        ),
        ("--hidden-size 66", 1, ("--hidden-size 66", "--num-attention-heads 4", "--kv-channels")),
        ("--max-position-embeddings 16", 1, ("--max-position-embeddings 16", "--seq-length 32")),
        ("--recompute-granularity full", 1, ("--recompute-granularity full", "--recompute-method")),
        (
            "--recompute-granularity selective --recompute-method block",
            1,
            ("--recompute-method block", "selective"),
        ),
        # MoE
        (
            "--num-experts 6 --expert-model-parallel-size 4",
            4,
            ("--num-experts 6", "--expert-model-parallel-size 4"),
        ),
        (
            "--num-experts 8 --expert-model-parallel-size 4",
            2,
            ("world size 2", "--expert-model-parallel-size 4", "--expert-tensor-parallel-size 1"),
        ),
        ("--expert-model-parallel-size 2", 2, ("--expert-model-parallel-size 2", "--num-experts")),
        ("--num-experts 4 --moe-router-topk 5", 1, ("--moe-router-topk 5", "--num-experts 4")),
        (
            "--num-experts 4 --moe-router-topk 1",
            1,
            ("--moe-router-topk 1", "--moe-router-pre-softmax"),
        ),
        (
            "--num-experts 4 --tensor-model-parallel-size 2",
            2,
            ("--num-experts 4", "--tensor-model-parallel-size 2", "--sequence-parallel"),
        ),
        (
            "--num-experts 4 --moe-shared-expert-intermediate-size 64",
            1,
            ("--moe-shared-expert-intermediate-size", "--disable-bias-linear"),
        ),
        ("--num-experts 4 --moe-layer-freq 0", 1, ("--moe-layer-freq", "0")),
        (
            "--num-experts 4 --moe-grouped-gemm --transformer-impl local",
            1,
            ("--moe-grouped-gemm", "--transformer-impl local", "grouped_gemm"),
        ),
        # batch
        (
            "--global-batch-size 6 --micro-batch-size 4",
            1,
            ("--global-batch-size 6", "--micro-batch-size 4"),
        ),
        (
            "--global-batch-size 8 --rampup-batch-size 3 2 100",
            1,
            ("--rampup-batch-size", "START 3"),
        ),
        (
            "--global-batch-size 8 --rampup-batch-size 2 3 100",
            1,
            ("--rampup-batch-size", "INCREMENT 3"),
        ),
        (
            "--global-batch-size 8 --rampup-batch-size 2 4 100",
            1,
            ("--rampup-batch-size 2 4 100", "--global-batch-size 8"),
        ),
        # precision and implementation (Transformer Engine is not installed here)
        ("--bf16 --fp16", 1, ("--bf16", "--fp16")),
        (
            "--fp8-format e4m3",
            1,
            ("--fp8-format e4m3", "install transformer-engine[pytorch]", "drop --fp8-format"),
        ),
        (
            "--transformer-impl transformer_engine",
            1,
            (
                "--transformer-impl transformer_engine",
                "install transformer-engine[pytorch]",
                "--transformer-impl local",
            ),
        ),
        ("--fp8-param-gather", 1, ("--fp8-param-gather", "--fp8-format")),
        # learning rate
        ("--lr-decay-style WSD", 1, ("--lr-decay-style WSD", "--lr-wsd-decay-iters")),
        ("--lr-decay-style WSD --lr-wsd-decay-iters 200", 1, ("--lr-wsd-decay-iters 200",)),
        ("--min-lr 0.1", 1, ("--min-lr 0.1", "--lr 0.001")),
        (
            "--lr-warmup-fraction 0.1 --lr-warmup-iters 5",
            1,
            ("--lr-warmup-fraction 0.1", "--lr-warmup-iters 5"),
        ),
        ("--lr-warmup-iters 100", 1, ("--lr-warmup-iters 100", "--lr-decay-iters 100")),
        (
            "--weight-decay-incr-style linear",
            1,
            ("--weight-decay-incr-style linear", "--start-weight-decay"),
        ),
        # data
        ("--data-path a", 1, ("--data-path", "--mock-data")),
        ("--valid-data-path v", 1, ("--train-data-path", "--mock-data")),
        (
            "--tokenizer-type HuggingFaceTokenizer",
            1,
            ("--tokenizer-type HuggingFaceTokenizer", "--tokenizer-model"),
        ),
        (
            "--tokenizer-type GPT2BPETokenizer",
            1,
            ("GPT2BPETokenizer", "--vocab-file", "--merge-file"),
        ),
        # checkpointing
        ("--ckpt-format torch", 1, ("--ckpt-format torch", "torch_dist")),
        ("--save /ckpt --save-interval 0", 1, ("--save-interval must be >= 1", "got 0")),
        ("--ckpt-keep-last -1", 1, ("--ckpt-keep-last", "-1")),
        # logging and reliability
        ("--log-interval 0", 1, ("--log-interval", "0")),
        ("--peak-tflops 0", 1, ("--peak-tflops", "0")),
        ("--max-bad-steps 0", 1, ("--max-bad-steps", "0")),
        ("--collective-timeout-s -1", 1, ("--collective-timeout-s", "-1")),
        # TST
        ("--tst-bag-size 0", 1, ("--tst-bag-size", "0")),
        ("--tst-bag-size 4 --tst-phase1-fraction 1.0", 1, ("--tst-phase1-fraction", "1.0")),
        ("--tst-bag-size 4 --tst-phase1-fraction 0", 1, ("--tst-phase1-fraction", "0")),
        (
            "--tst-bag-size 4 --tst-phase1-fraction 0.3 --tst-phase1-iters 3",
            1,
            ("--tst-phase1-fraction 0.3", "--tst-phase1-iters 3"),
        ),
        (
            "--tst-bag-size 4 --tst-phase1-iters 101",
            1,
            ("--tst-phase1-iters 101", "--train-iters 100"),
        ),
        (
            "--tst-bag-size 4",
            1,
            ("--tst-bag-size 4", "--tst-phase1-fraction", "--tst-phase1-iters"),
        ),
        (
            "--tst-bag-size 4 --tst-phase1-fraction 0.3 --tst-phase 2",
            1,
            ("--tst-phase 2", "--load"),
        ),
        ("--tst-phase 1", 1, ("--tst-phase 1", "--tst-bag-size 1")),
        ("--tst-phase 2 --load /ckpt", 1, ("--tst-phase 2", "--tst-bag-size 1")),
    ],
)
def test_rejections_name_flags_and_values(extra, world_size, parts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = rejected(extra, world_size=world_size)
    assert_names(message, *parts)


def test_fp8_needs_transformer_engine_impl():
    message = rejected("--fp8-format e4m3 --transformer-impl local", env=CPU_WITH_TE)
    assert_names(message, "--fp8-format e4m3", "--transformer-impl transformer_engine", "local")


@pytest.mark.parametrize(
    "missing", ["--num-layers", "--seq-length", "--micro-batch-size", "--train-iters", "--lr"]
)
def test_required_flags(missing):
    base = list(BASE)
    index = base.index(missing)
    del base[index : index + 2]
    assert_names(rejected(base=tuple(base)), missing, "required")


@pytest.mark.parametrize(
    ("sources", "parts"),
    [
        ("", ("exactly one data source", "none")),
        ("--mock-data --data-path a", ("--data-path and --mock-data",)),
    ],
)
def test_exactly_one_data_source(sources, parts):
    base = [arg for arg in BASE if arg != "--mock-data"]
    assert_names(rejected(sources, base=tuple(base)), *parts)


@pytest.mark.parametrize(
    ("extra", "parts"),
    [
        ("", ("--tokenizer-type", "--vocab-size")),
        ("--tokenizer-type NullTokenizer", ("--tokenizer-type NullTokenizer", "--vocab-size")),
    ],
)
def test_tokenizer_needs_a_vocabulary(extra, parts):
    index = BASE.index("--vocab-size")
    base = BASE[:index] + BASE[index + 2 :]
    assert_names(rejected(extra, base=tuple(base)), *parts)


# ------------------------------------------------------------------ TransformerConfig -------


def test_transformer_config_mapping():
    args = validated(
        "--swiglu --normalization RMSNorm --disable-bias-linear --qk-layernorm "
        "--num-query-groups 2 --norm-epsilon 1e-6 --hidden-dropout 0 "
        "--num-experts 4 --moe-router-topk 1 --moe-router-pre-softmax "
        "--moe-ffn-hidden-size 32 "
        "--moe-layer-freq 2 --moe-aux-loss-coeff 0.01 "
        "--moe-token-dispatcher-type alltoall --distributed-backend gloo"
    )
    config = config_of(from_validated_args(args))
    assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-6
    assert not config.add_bias_linear and config.qk_layernorm
    assert config.num_query_groups == 2 and config.kv_channels == 16
    assert config.hidden_dropout == 0.0
    assert config.num_moe_experts == 4 and config.moe_router_topk == 1
    assert config.moe_ffn_hidden_size == 32
    assert config.moe_layer_freq == 2 and config.moe_aux_loss_coeff == 0.01
    assert config.moe_token_dispatcher_type == "alltoall"
    assert config.batch_p2p_comm is False  # gloo
    assert config.deallocate_pipeline_outputs and not config.variable_seq_lengths
    assert not config.cross_entropy_loss_fusion
    assert config.fp8 is None and config.use_cpu_initialization
    assert config.transformer_impl == "local"


def on_nccl(args) -> RunConfig:
    settings = from_validated_args(args)
    parallel = dataclasses.replace(settings.parallel, distributed_backend="nccl")
    return dataclasses.replace(settings, parallel=parallel)


def test_batched_p2p_only_where_it_is_safe():
    one_f_one_b = validated("--pipeline-model-parallel-size 2", world_size=2)
    nccl = config_of(on_nccl(one_f_one_b))  # as on a GPU job (no CUDA here)
    assert nccl.batch_p2p_comm is True and nccl.overlap_p2p_comm is False
    interleaved = validated(
        "--num-layers 8 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2 "
        "--global-batch-size 4",
        world_size=2,
    )
    config = config_of(on_nccl(interleaved))
    assert config.virtual_pipeline_model_parallel_size == 2
    # Megatron-LM's interleaved default: overlapped, unbatched (PP=2 batching swaps tensors)
    assert config.batch_p2p_comm is False and config.overlap_p2p_comm is True
