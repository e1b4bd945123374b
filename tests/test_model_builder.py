"""The local and Transformer Engine specs share one TST model class and code path."""

import pytest

from tst_megatron.model import TSTGPTModel
from tst_megatron.training import arguments, model_builder
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
    "--seq-length 32 --micro-batch-size 2 --train-iters 10 --lr 1e-3 --mock-data "
    "--vocab-size 512 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --qk-layernorm"
).split()


def _build(*extra: str):
    args = parse_args([*TINY, *extra])
    validate_args(args, world_size=1)
    args.padded_vocab_size = args.padded_vocab_size or 512
    config = model_builder.transformer_config_from_args(args)
    with model_builder.single_process_parallel_state():
        return model_builder.build_model(args, config, pre_process=True, post_process=True)


def test_local_spec_builds_the_tst_model():
    model = _build("--transformer-impl", "local")
    assert type(model) is TSTGPTModel


def test_transformer_engine_spec_builds_the_same_tst_model(monkeypatch):
    """TE is not installed here: stand its spec in with the CPU one and check the wiring."""
    calls = []
    cpu_spec = model_builder.layer_spec_from_args

    def te_spec(**kwargs):
        calls.append(kwargs)
        args = parse_args([*TINY, "--transformer-impl", "local"])
        validate_args(args, world_size=1)
        return cpu_spec(args, model_builder.transformer_config_from_args(args))

    monkeypatch.setattr(arguments, "transformer_engine_installed", lambda: True)
    monkeypatch.setattr(model_builder, "get_gpt_layer_with_transformer_engine_spec", te_spec)
    model = _build("--transformer-impl", "transformer_engine")
    assert type(model) is TSTGPTModel  # same class: same embed_bags / multi-hot CE hooks
    assert calls == [{"num_experts": None, "moe_grouped_gemm": False, "qk_layernorm": True}]


def test_transformer_engine_absent_is_a_clear_error():
    with pytest.raises(ConfigError) as err:
        _build("--transformer-impl", "transformer_engine")
    assert "needs Transformer Engine, which is not installed" in str(err.value)
    assert "--transformer-impl local" in str(err.value)
