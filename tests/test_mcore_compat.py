"""Each Megatron-Core difference of `tst_megatron.mcore_compat`, on the installed release.

The suite runs on 0.19.x (primary environment) and 0.16.1 (second environment, see
scripts/run_tests.sh): each test checks the behaviour of the installed Megatron-Core against
what `mcore_compat` says about it, with an independent reference where there is one.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from tests.support.multirank import run_multirank, run_single, switch_layout
from tst_megatron import mcore_compat
from tst_megatron.mcore_compat import (
    MCORE_RELEASE,
    MCORE_VERSION,
    RANK0_CHECKPOINT_FILES,
    SUPPORTED_RELEASES,
    async_save_kwargs,
    batch_on_this_cp_rank,
    build_mlp,
    check_checkpoint_readable,
    check_supported,
    rank0_checkpoint_writers,
    release_of,
    spec_module,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_release_is_supported():
    from megatron.core import package_info

    assert package_info.__version__ == MCORE_VERSION
    assert MCORE_RELEASE in SUPPORTED_RELEASES
    check_supported()


def test_release_of_reads_versions_and_names_a_bad_one():
    assert release_of("0.19.2") == (0, 19)
    assert release_of("0.16.1rc0") == (0, 16)
    assert release_of("1.0") == (1, 0)
    with pytest.raises(ValueError, match=r"^'nightly' is not a Megatron-Core version"):
        release_of("nightly")


def test_an_unsupported_release_is_refused_naming_it():
    with pytest.raises(RuntimeError) as err:
        check_supported((0, 18), what="install_cpu_shim()")
    message = str(err.value)
    assert message.startswith("install_cpu_shim() supports megatron-core 0.16.x and 0.19.x")
    assert f"found {MCORE_VERSION}" in message


def test_no_version_checks_outside_mcore_compat():
    """The one-module rule: no other product file asks which Megatron-Core is installed."""
    markers = ("package_info", "MCORE_RELEASE", "release_of(", 'version("megatron')
    files = [p for p in (ROOT / "tst_megatron").rglob("*.py") if p.name != "mcore_compat.py"]
    files += [*(ROOT / "tools").glob("*.py"), ROOT / "pretrain_tst.py"]
    offenders = [
        f"{path.relative_to(ROOT)}: {marker}"
        for path in files
        for marker in markers
        if marker in path.read_text(encoding="utf-8")
    ]
    assert not offenders, offenders
    mcore_version_reads = [
        path
        for path in files
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr == "__version__"
        and "megatron" in ast.unparse(node.value)
    ]
    assert not mcore_version_reads


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _save_and_load(directory: str, asynchronous: bool) -> dict:
    """Rank side: save a tiny sharded state dict with Megatron-Core, note which rank-0
    writers ran and which files appeared, and load it back."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    calls: list[str] = []
    writers = rank0_checkpoint_writers()
    originals = [getattr(owner, name) for owner, name in writers]

    def recording(name, original):
        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return call

    for (owner, name), original in zip(writers, originals, strict=True):
        setattr(owner, name, recording(name, original))
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)

    def state(tensor):
        return {"w": ShardedTensor.from_rank_offsets("w", tensor), "step": 7}

    try:
        if asynchronous:
            request = dist_checkpointing.save(
                state(weight), directory, async_sharded_save=True, **async_save_kwargs()
            )
            is_mcore_request = isinstance(request, AsyncRequest)
            request.execute_sync()
        else:
            is_mcore_request = None
            dist_checkpointing.save(state(weight), directory)
    finally:
        for (owner, name), original in zip(writers, originals, strict=True):
            setattr(owner, name, original)
    loaded = dist_checkpointing.load(state(torch.zeros(2, 3)), directory)
    return {
        "calls": calls,
        "files": sorted(f for f in os.listdir(directory) if not f.endswith(".distcp")),
        "mcore_request": is_mcore_request,
        "restored": torch.equal(loaded["w"], weight) and loaded["step"] == 7,
    }


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_rank0_files_and_writers_are_megatron_cores(tmp_path, asynchronous):
    out = run_single(_save_and_load, args=(str(tmp_path), asynchronous))
    assert out["restored"]
    assert out["files"] == sorted(RANK0_CHECKPOINT_FILES)
    assert ("common.pt" in RANK0_CHECKPOINT_FILES) == (MCORE_RELEASE < (0, 19))
    # every writer named ran once, during the save
    assert sorted(out["calls"]) == sorted(name for _, name in rank0_checkpoint_writers())
    if asynchronous:  # Megatron-Core's own request (our AsyncCallsQueue runs it), not nvrx's
        assert out["mcore_request"]
        assert async_save_kwargs() == ({"async_strategy": "mcore"} if MCORE_RELEASE >= (0, 17)
                                       else {})  # fmt: skip


def test_a_newer_checkpoint_is_refused_with_both_versions(monkeypatch):
    """0.16.1 refuses a 0.19 checkpoint (its common state is in the shards); 0.19 reads both.

    Both sides are checked on either installed release by setting what the release decides.
    """
    monkeypatch.setattr(mcore_compat, "_COMMON_STATE_IN_SHARDS", False)
    monkeypatch.setattr(mcore_compat, "MCORE_VERSION", "0.16.1")
    check_checkpoint_readable("0.16.1", "/ck/iter_0000003")
    check_checkpoint_readable(None, "/ck/iter_0000003")  # records before versions: 0.16.1
    with pytest.raises(ValueError) as err:
        check_checkpoint_readable("0.19.2", "/ck/iter_0000003")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "checkpoint /ck/iter_0000003 was written by megatron-core 0.19.2, which this "
        "megatron-core 0.16.1 cannot read"
    )
    assert "resume it with megatron-core >= 0.19" in message
    monkeypatch.setattr(mcore_compat, "_COMMON_STATE_IN_SHARDS", True)
    for saved in ("0.16.1", None, "0.19.2"):
        check_checkpoint_readable(saved, "/ck/iter_0000003")


# --------------------------------------------------------------------------------------------
# Context parallelism
# --------------------------------------------------------------------------------------------


def _zigzag(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Reference: chunks ``rank`` and ``2 * size - 1 - rank`` of ``2 * size`` along ``dim``."""
    chunks = tensor.chunk(2 * size, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim=dim)


def _cp_slices() -> dict:
    """Rank side: this rank's batch under CP=2 and under TP=2 (a one-rank CP group)."""
    from megatron.core import parallel_state as ps

    seq = 8
    batch = {
        "tokens": torch.arange(2 * seq).reshape(2, seq),
        "labels": torch.arange(2 * seq * 3).reshape(2, seq, 3),
        "attention_mask": torch.ones(2, 1, seq, seq).tril().bool(),
    }
    out = {}
    for name, layout in (("cp2", {"cp": 2}), ("tp2", {"tp": 2})):
        switch_layout(**layout)
        local = batch_on_this_cp_rank(dict(batch), ps.get_context_parallel_group())
        out[name] = {key: value.clone() for key, value in local.items()}
    return out | {"batch": batch}


def test_context_parallel_slicing_follows_the_given_group():
    """CP=2 gives each rank its zigzag chunks; TP=2 (CP group of one) leaves the batch whole,
    where 0.18+'s ``cp_group=None`` (the WORLD group) would slice it."""
    ranks = run_multirank(_cp_slices, 2, cp=2)
    for rank, out in enumerate(ranks):
        batch = out["batch"]
        for key, value in batch.items():
            dim = 2 if key == "attention_mask" else 1
            assert torch.equal(out["cp2"][key], _zigzag(value, dim, rank, 2)), (rank, key)
            assert torch.equal(out["tp2"][key], value), (rank, key)


# --------------------------------------------------------------------------------------------
# Layer specs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts", [None, 4], ids=["dense", "moe"])
def test_spec_module_and_build_mlp(experts):
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from tst_megatron.layers.spec import local_layer_spec

    spec = local_layer_spec(
        num_experts=experts, moe_grouped_gemm=False, qk_layernorm=False,
        normalization="RMSNorm", apex=False,
    )  # fmt: skip
    expected = MLP if experts is None else MoELayer
    assert spec_module(spec.submodules.mlp) is expected
    assert spec_module(spec) is spec.module
    out = run_single(_build_mlp, args=(experts,))
    assert out == expected.__name__


def _build_mlp(experts: int | None) -> str:
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tst_megatron.layers.spec import local_layer_spec
    from tst_megatron.mcore_fixes import apply_mcore_fixes

    apply_mcore_fixes()
    moe = {} if experts is None else {
        "num_moe_experts": experts, "moe_router_topk": 2, "moe_ffn_hidden_size": 16,
        "moe_token_dispatcher_type": "allgather",
    }  # fmt: skip
    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        use_cpu_initialization=True, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, **moe,
    )  # fmt: skip
    spec = local_layer_spec(
        num_experts=experts, moe_grouped_gemm=False, qk_layernorm=False,
        normalization="RMSNorm", apex=False,
    )  # fmt: skip
    mlp = build_mlp(spec.submodules.mlp, config)
    out, _ = mlp(torch.randn(4, 2, 16))
    assert out.shape == (4, 2, 16)
    return type(mlp).__name__
