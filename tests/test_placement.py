"""Device placement, process-group backend and CUDA environment, without a GPU.

Megatron-LM's rules: the device is ``LOCAL_RANK % device_count`` (one GPU per Slurm task still
works), ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with TP or CP > 1 before Blackwell, set before the
CUDA context exists. Without CUDA the backend defaults to gloo, with a log line.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from tst_megatron.training import loop, placement
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args

BASE = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --train-iters 10 --lr 1e-3 --mock-data --vocab-size 512"
).split()
VAR = placement.CUDA_CONNECTIONS


def layout(tp: int = 1, cp: int = 1) -> argparse.Namespace:
    return argparse.Namespace(tensor_model_parallel_size=tp, context_parallel_size=cp)


@pytest.mark.parametrize(
    ("local_rank", "count", "device"), [(0, 8, 0), (5, 8, 5), (5, 1, 0), (7, 4, 3)]
)
def test_device_is_local_rank_modulo_device_count(local_rank, count, device):
    assert placement.local_device_index(local_rank, count) == device


def test_no_device_is_an_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        placement.local_device_index(0, 0)


def test_set_cuda_device_with_one_gpu_per_task(monkeypatch):
    """Slurm --gpus-per-task 1: LOCAL_RANK 5 sees one device and must use device 0."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert placement.set_cuda_device({"LOCAL_RANK": "5"}) == 0
    assert chosen == [0]


@pytest.mark.parametrize(
    ("tp", "cp", "arch", "environ", "expected", "noted"),
    [
        (2, 1, 9, {}, "1", True),  # Hopper + TP: set
        (1, 2, 8, {}, "1", True),  # Ampere + CP: set
        (2, 1, 10, {}, None, False),  # Blackwell: Megatron-LM no longer needs it
        (1, 1, 9, {}, None, False),  # no TP/CP
        (2, 1, None, {}, None, False),  # no CUDA
        (2, 1, 9, {VAR: "1"}, "1", False),  # already right: untouched
    ],
)
def test_cuda_device_max_connections_is_set_when_needed(tp, cp, arch, environ, expected, noted):
    note = placement.set_cuda_connections(layout(tp, cp), arch, environ)
    assert environ.get(VAR) == expected
    assert (note is not None) == noted
    if note:
        assert f"{VAR}=1" in note


def test_a_conflicting_value_is_refused_before_hopper_only():
    environ = {VAR: "8"}
    message = placement.cuda_connections_error(layout(tp=2), 9, environ)
    assert f"{VAR}=8" in message and "--tensor-model-parallel-size 2" in message
    assert f"export {VAR}=1" in message
    assert placement.cuda_connections_error(layout(tp=2), 10, environ) is None
    assert placement.set_cuda_connections(layout(tp=2), 9, environ) is None  # not overwritten
    assert environ[VAR] == "8"


@pytest.fixture
def hopper(monkeypatch):
    """Pretend this process sees one H100 (no CUDA call reaches the driver)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")


def test_validation_refuses_the_conflicting_value(hopper, monkeypatch):
    monkeypatch.setenv(VAR, "8")
    args = parse_args([*BASE, "--tensor-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match=f"{VAR}=8"):
        validate_args(args, world_size=2)


def test_connections_are_set_before_the_device_and_process_group(hopper, monkeypatch):
    """initialize_distributed: the variable is in the environment when set_device runs."""
    monkeypatch.delenv(VAR, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    args = parse_args([*BASE, "--tensor-model-parallel-size", "2"])
    validate_args(args, world_size=2)
    seen = []

    class Stop(Exception):
        pass

    def set_device(index):
        seen.append((index, placement.os.environ.get(VAR)))

    def init_process_group(*a, **k):
        raise Stop

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        loop.initialize_distributed(args)
    assert seen == [(3, "1")]
    assert any(f"{VAR}=1" in note for note in args.startup_notes)


def test_gloo_without_cuda_is_the_default_and_is_said():
    args = parse_args(BASE)
    validate_args(args, world_size=1)
    assert args.distributed_backend == "gloo"
    assert any("backend gloo" in note for note in args.startup_notes)


def test_nccl_without_cuda_names_the_alternative():
    args = parse_args([*BASE, "--distributed-backend", "nccl"])
    with pytest.raises(ConfigError, match="--distributed-backend gloo"):
        validate_args(args, world_size=1)


def test_nccl_is_the_default_with_cuda(hopper):
    args = parse_args(BASE)
    validate_args(args, world_size=1)
    assert args.distributed_backend == "nccl"
