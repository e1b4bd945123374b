"""Fusion flags: Megatron-LM's defaults and ``--no-...`` flags reach `TransformerConfig`.

`resolve_fusions` is a pure function of the requested fusions and the kernels present, so the
GPU cases run here with settings resolved for a stated `KernelAvailability` (what a CUDA node
with apex and TE offers, or a plain PyTorch CUDA install). The CPU case is this machine.
"""

from __future__ import annotations

import pytest
import torch

from tst_megatron.kernels import KernelAvailability
from tst_megatron.settings import Environment, RunConfig
from tst_megatron.training.arguments import (
    ConfigError,
    parse_args,
    requested_fusions,
    validate_args,
)
from tst_megatron.training.fusions import resolve_fusions
from tst_megatron.training.model_builder import transformer_config
from tst_megatron.training.run_config import settings_from_flags

BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --train-iters 10 --lr 1e-3 --mock-data --vocab-size 512 "
    "--swiglu --position-embedding-type rope"
).split()
ALL_KERNELS = KernelAvailability(
    cuda=True,
    transformer_engine=True,
    apex_layer_norm=True,
    apex_persistent_layer_norm=True,
    masked_softmax=True,
    fused_wgrad=True,
)
PLAIN_CUDA = KernelAvailability(cuda=True)  # a pip PyTorch CUDA install: no apex, no TE
DEFAULT_ON = (
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
)
NO_FLAGS = {
    "bias_activation_fusion": "--no-bias-swiglu-fusion",
    "bias_dropout_fusion": "--no-bias-dropout-fusion",
    "masked_softmax_fusion": "--no-masked-softmax-fusion",
    "persist_layer_norm": "--no-persist-layer-norm",
    "apply_rope_fusion": "--no-rope-fusion",
    "gradient_accumulation_fusion": "--no-gradient-accumulation-fusion",
}


@pytest.fixture(autouse=True)
def te_rope(monkeypatch):
    """TransformerConfig checks TE's fused RoPE imports when apply_rope_fusion is on."""
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", object(), raising=False)


def config_of(settings: RunConfig):
    return transformer_config(
        settings.model, settings.parallel, settings.precision, settings.kernels, settings.recompute
    )


def config_on(kernels: KernelAvailability, *flags: str):
    """The config of settings resolved for ``kernels``, and the notes of what they lack."""
    argv = [*BASE, "--transformer-impl", "local", *flags]
    settings = settings_from_flags(argv, 1, Environment(kernels=kernels))
    _, notes = resolve_fusions(
        requested_fusions(parse_args(argv)),
        kernels,
        transformer_impl="local",
        normalization=settings.model.normalization,
    )
    return config_of(settings), notes


def test_every_default_on_fusion_reaches_the_config_where_the_kernels_exist():
    config, notes = config_on(ALL_KERNELS, "--normalization", "LayerNorm")
    assert notes == []
    for name in DEFAULT_ON:
        assert getattr(config, name) is True, name
    assert config.cross_entropy_loss_fusion is False  # opt-in, as in Megatron-LM


@pytest.mark.parametrize("name", DEFAULT_ON)
def test_each_no_flag_turns_its_fusion_off(name):
    config, _ = config_on(ALL_KERNELS, "--normalization", "LayerNorm", NO_FLAGS[name])
    assert getattr(config, name) is False
    for other in DEFAULT_ON:
        if other != name:
            assert getattr(config, other) is True, other


def test_cross_entropy_fusion_is_opt_in():
    config, _ = config_on(ALL_KERNELS, "--cross-entropy-loss-fusion")
    assert config.cross_entropy_loss_fusion is True
    assert config.cross_entropy_fusion_impl == "native"


def test_plain_cuda_keeps_the_jit_fusions_and_says_what_is_missing():
    config, notes = config_on(PLAIN_CUDA)
    assert config.bias_activation_fusion and config.bias_dropout_fusion
    for name in ("masked_softmax_fusion", "persist_layer_norm", "apply_rope_fusion"):
        assert getattr(config, name) is False
    assert config.gradient_accumulation_fusion is False
    text = "\n".join(notes)
    for needed in ("masked_softmax_cuda", "persistent LayerNorm", "fused RoPE",
                   "fused_weight_gradient_mlp_cuda"):  # fmt: skip
        assert needed in text


def test_cpu_resolves_every_fusion_off_with_one_line():
    args = parse_args([*BASE, "--cross-entropy-loss-fusion"])
    validate_args(args, world_size=1)
    config = config_of(settings_from_flags([*BASE, "--cross-entropy-loss-fusion"]))
    for name in (*DEFAULT_ON, "cross_entropy_loss_fusion"):
        assert getattr(config, name) is False, name
    lines = [note for note in args.startup_notes if "fusions off" in note]
    assert len(lines) == 1 and "cross_entropy_loss_fusion" in lines[0]


def test_gelu_without_bias_has_no_bias_activation_fusion():
    args = parse_args([*BASE[:-3], "--disable-bias-linear", "--transformer-impl", "local"])
    validate_args(args, world_size=1)
    fused, _ = resolve_fusions(
        requested_fusions(args), ALL_KERNELS, transformer_impl="local", normalization="LayerNorm"
    )
    assert fused.bias_activation_fusion is False  # Megatron-LM's rule (gelu needs the bias)


def test_rope_fusion_only_with_rope():
    config, _ = config_on(ALL_KERNELS, "--position-embedding-type", "learned_absolute")
    assert config.apply_rope_fusion is False


def test_te_cross_entropy_needs_te():
    args = parse_args(
        [*BASE, "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"]
    )
    with pytest.raises(ConfigError, match="--cross-entropy-fusion-impl te needs Transformer"):
        validate_args(args, world_size=1)


# ------------------------------------------------------------------ pipeline p2p ------------

INTERLEAVED = "--num-layers 8 --num-layers-per-virtual-pipeline-stage 1 --global-batch-size 8"


# One H100 without Transformer Engine or apex (nccl is its default backend).
HOPPER = Environment(kernels=KernelAvailability(cuda=True), device_name="h100", capability=(9, 0))


def p2p(*flags: str, world_size: int, env: Environment | None = None):
    argv = [*BASE, "--transformer-impl", "local", *" ".join(flags).split()]
    config = config_of(settings_from_flags(argv, world_size, env))
    return config.overlap_p2p_comm, config.batch_p2p_comm


def test_interleaved_p2p_is_megatron_lms_on_nccl():
    pp2 = "--pipeline-model-parallel-size 2"
    assert p2p(pp2, INTERLEAVED, world_size=2, env=HOPPER) == (True, False)
    assert p2p(pp2, world_size=2, env=HOPPER) == (False, True)  # 1F1B
    no_overlap = ("--pipeline-model-parallel-size 4", INTERLEAVED, "--no-overlap-p2p-communication")
    assert p2p(*no_overlap, world_size=4, env=HOPPER) == (False, True)


def test_unbatched_interleaving_at_pp2_is_refused_on_nccl():
    flags = ("--pipeline-model-parallel-size 2", INTERLEAVED, "--no-overlap-p2p-communication")
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size > 2"):
        p2p(*flags, world_size=2, env=HOPPER)


def test_gloo_neither_batches_nor_overlaps():
    assert p2p("--pipeline-model-parallel-size 2", INTERLEAVED, world_size=2) == (False, False)
    flags = ("--pipeline-model-parallel-size 2", INTERLEAVED, "--no-overlap-p2p-communication")
    assert p2p(*flags, world_size=2) == (False, False)
    assert p2p("--pipeline-model-parallel-size 2", world_size=2) == (False, False)


# ------------------------------------------------------------------ planner ties ------------

TOKENS, HIDDEN, FFN = 64, 64, 96


def mlp_saved_bytes() -> dict[bool, int]:
    """Rank side: bytes autograd keeps for backward in mcore's SwiGLU MLP, fused and unfused.

    The fused kernels are swapped for their eager bodies (same autograd.Function, same saved
    tensors; torch.compile would run inductor on CPU for minutes).
    """
    import torch.nn.functional as F
    from megatron.core.fusions import fused_bias_swiglu
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tst_megatron.layers.spec import local_layer_spec
    from tst_megatron.mcore_compat import build_mlp

    for name in ("swiglu", "swiglu_back"):
        setattr(fused_bias_swiglu, name, getattr(fused_bias_swiglu, name).__wrapped__)
    spec = local_layer_spec(
        num_experts=None, moe_grouped_gemm=False, qk_layernorm=False, normalization="RMSNorm",
        apex=False,
    ).submodules.mlp  # fmt: skip
    kept = {}
    for fused in (True, False):
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=4,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            bias_activation_fusion=fused, params_dtype=torch.bfloat16, bf16=True,
            use_cpu_initialization=True, gradient_accumulation_fusion=False,
        )  # fmt: skip
        mlp = build_mlp(spec, config)
        x = torch.randn(TOKENS, 1, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        storages = {}

        def pack(tensor, storages=storages):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out, _ = mlp(x)
        out.float().sum().backward()  # the saved tensors suffice
        kept[fused] = sum(storages.values())
    return kept


def test_planner_activation_memory_follows_the_swiglu_fusion(tmp_path):
    """The planner's per-layer MLP bytes move by exactly what mcore's unfused SwiGLU keeps."""

    from tests.support.multirank import run_single
    from tests.tool_import import import_tool
    from tst_megatron.planning.memory import layer_activation_bytes
    from tst_megatron.settings import Environment
    from tst_megatron.training.run_config import settings_from_flags

    measured = run_single(mlp_saved_bytes, timeout_s=240)
    extra = measured[False] - measured[True]
    assert extra > 0 and extra % (TOKENS * FFN * 2) == 0  # whole bf16 [tokens, ffn] tensors

    def planned(*flags: str) -> float:
        argv = [*BASE, "--hidden-size", str(HIDDEN), "--ffn-hidden-size", str(FFN), *flags]
        settings = settings_from_flags(argv, 1, Environment.gpu("h100"))
        memory = import_tool("plan").memory_settings(settings)
        return layer_activation_bytes(memory, moe=False, tokens=TOKENS)

    assert planned("--no-bias-swiglu-fusion") - planned() == extra
