"""The local and Transformer Engine specs share one TST model class and code path."""

import dataclasses

import pytest

from tst_megatron import kernels
from tst_megatron.kernels import KernelAvailability
from tst_megatron.model import TSTGPTModel
from tst_megatron.settings import Environment, KernelsConfig, RunConfig, SettingsError
from tst_megatron.training import model_builder
from tst_megatron.training.arguments import ConfigError
from tst_megatron.training.run_config import settings_from_flags

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
    "--seq-length 32 --micro-batch-size 2 --train-iters 10 --lr 1e-3 --mock-data "
    "--vocab-size 512 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --qk-layernorm"
).split()


def _config(settings: RunConfig, kernels: KernelsConfig | None = None):
    kernels = kernels or settings.kernels
    return model_builder.transformer_config(
        settings.model, settings.parallel, settings.precision, kernels, settings.recompute
    )


def _build(settings: RunConfig, kernels: KernelsConfig | None = None):
    kernels = kernels or settings.kernels
    config = _config(settings, kernels)
    with model_builder.single_process_parallel_state():
        return model_builder.build_model(
            settings.model, kernels, config, pre_process=True, post_process=True
        )


def _with_te(settings: RunConfig) -> KernelsConfig:
    """``settings``' kernels with the Transformer Engine spec (this host's fusions: off)."""
    return dataclasses.replace(settings.kernels, transformer_impl="transformer_engine")


def test_local_spec_builds_the_tst_model():
    model = _build(settings_from_flags([*TINY, "--transformer-impl", "local"]))
    assert type(model) is TSTGPTModel


def test_transformer_engine_spec_builds_the_same_tst_model(monkeypatch):
    """TE is not installed here: stand its spec in with the CPU one and check the wiring."""
    calls = []
    cpu_spec = model_builder.layer_spec
    local = settings_from_flags([*TINY, "--transformer-impl", "local"])

    def te_spec(**kwargs):
        calls.append(kwargs)
        return cpu_spec(local.model, local.kernels, _config(local))

    monkeypatch.setattr(kernels, "transformer_engine_importable", lambda: True)  # the builder's
    monkeypatch.setattr(model_builder, "get_gpt_layer_with_transformer_engine_spec", te_spec)
    model = _build(local, _with_te(local))
    assert type(model) is TSTGPTModel  # same class: same embed_bags / multi-hot CE hooks
    assert calls == [{"num_experts": None, "moe_grouped_gemm": False, "qk_layernorm": True}]


def test_transformer_engine_absent_is_a_clear_error():
    """Settings asking for Transformer Engine, built where it is missing."""
    local = settings_from_flags([*TINY, "--transformer-impl", "local"])
    with pytest.raises(SettingsError) as err:
        _build(local, _with_te(local))
    assert "needs Transformer Engine, which is not installed" in str(err.value)
    assert "--transformer-impl local" in str(err.value)


# ------------------------------------------------------------------ local spec on GPUs ------


# One H100 without Transformer Engine or apex: what validation is asked for.
HOPPER = Environment(kernels=KernelAvailability(cuda=True), device_name="h100", capability=(9, 0))


@pytest.fixture
def hopper(monkeypatch):
    """Pretend one H100 is visible to the model builder (nothing reaches a driver)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")


def _local_spec(*extra: str, world_size: int = 2):
    settings = settings_from_flags(
        [*TINY, "--transformer-impl", "local", *extra], world_size, HOPPER
    )
    config = _config(settings)
    with model_builder.single_process_parallel_state():  # layer offsets of pipeline stage 0
        return model_builder.layer_spec(settings.model, settings.kernels, config)


def test_local_spec_on_cuda_supports_sequence_parallel_moe(hopper):
    """TP + MoE needs SP: every norm of the local spec must accept it (mcore's torch norm
    asserts on it); the experts are mcore's."""
    from tst_megatron.layers.norm import QKNorm, TorchNorm
    from tst_megatron.mcore_compat import spec_module

    block = _local_spec(
        *"--tensor-model-parallel-size 2 --sequence-parallel --num-experts 4 "
        "--moe-layer-freq 2".split()
    )
    moe, dense = block.layer_specs  # layer i is MoE where i % freq == 0
    for layer in (dense, moe):
        assert layer.submodules.input_layernorm is TorchNorm
        assert layer.submodules.pre_mlp_layernorm is TorchNorm
        assert layer.submodules.self_attention.submodules.q_layernorm is QKNorm
    assert block.layer_norm is TorchNorm
    assert "MoELayer" in spec_module(moe.submodules.mlp).__name__
    assert spec_module(dense.submodules.mlp).__name__ == "MLP"


def test_apex_layer_norm_is_kept_where_mcore_would_use_it():
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    from tst_megatron.layers.spec import local_norm

    assert local_norm("LayerNorm", apex=True) is FusedLayerNorm
    assert local_norm("RMSNorm", apex=True).__name__ == "TorchNorm"


def test_context_parallel_with_the_local_spec_on_cuda_is_refused(hopper):
    with pytest.raises(ConfigError) as err:
        _local_spec("--context-parallel-size", "2")
    assert "--context-parallel-size 2" in str(err.value)
    assert "--transformer-impl transformer_engine" in str(err.value)


def test_zero_centred_norms_with_the_local_spec_are_refused():
    with pytest.raises(ConfigError) as err:
        _local_spec("--apply-layernorm-1p", world_size=1)
    assert "--apply-layernorm-1p" in str(err.value)
    assert "--transformer-impl transformer_engine" in str(err.value)
