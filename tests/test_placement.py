"""Device placement, process-group backend and CUDA environment, without a GPU.

Megatron-LM's rules: the device is ``LOCAL_RANK % device_count`` (one GPU per Slurm task still
works), ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with TP or CP > 1 before Blackwell, required in the
environment (the launchers set it; the entry points check it, `placement.launch_error`) and
never set in-process. Without CUDA the backend defaults to gloo, with a log line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tst_megatron.kernels import KernelAvailability
from tst_megatron.settings import Environment
from tst_megatron.training import loop, placement
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args
from tst_megatron.training.run_config import resolve

BASE = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --train-iters 10 --lr 1e-3 --mock-data --vocab-size 512"
).split()
VAR = placement.CUDA_CONNECTIONS
# One H100 without Transformer Engine or apex.
HOPPER = Environment(kernels=KernelAvailability(cuda=True), device_name="h100", capability=(9, 0))


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
    ("tp", "cp", "arch", "environ", "found"),
    [
        (2, 1, 9, {}, "is not set"),  # Hopper + TP: required, missing
        (1, 2, 8, {}, "is not set"),  # Ampere + CP
        (2, 1, 9, {VAR: "8"}, "is 8"),  # another value
        (2, 1, 9, {VAR: "1"}, None),  # as required
        (2, 1, 10, {}, None),  # Blackwell: Megatron-LM no longer needs it
        (1, 1, 9, {}, None),  # no TP/CP
        (2, 1, None, {}, None),  # no CUDA
    ],
)
def test_cuda_device_max_connections_must_come_from_the_environment(tp, cp, arch, environ,
                                                                     found):  # fmt: skip
    before = dict(environ)
    message = placement.cuda_connections_error(
        tensor_parallel=tp, context_parallel=cp, fsdp=False, arch_major=arch, environ=environ
    )
    assert environ == before  # never set in-process: CUDA reads it when it starts
    if found is None:
        assert message is None
        return
    assert message == (
        f"{VAR} {found}, but --tensor-model-parallel-size {tp} / --context-parallel-size {cp} "
        f"on this GPU (compute capability {arch}.x, before Blackwell) needs {VAR}=1 in the "
        "environment before CUDA starts, as Megatron-LM requires (communication then overlaps "
        f"with compute): export {VAR}=1 in the launch script (examples/slurm/common.sh, "
        "tools/launch.py and the Dockerfile set it)"
    )


def test_megatron_fsdp_does_not_need_one_connection():
    assert (
        placement.cuda_connections_error(
            tensor_parallel=2, context_parallel=1, fsdp=True, arch_major=9, environ={}
        )
        is None
    )


def test_the_launchers_put_it_in_the_environment():
    from tools.launch import torchrun_command

    assert torchrun_command(["train.py"], {})[1][VAR] == "1"
    assert torchrun_command(["train.py"], {VAR: "8"})[1][VAR] == "8"  # an exported value stays
    root = Path(__file__).resolve().parents[1]
    assert f"{VAR}=1" in (root / "Dockerfile").read_text()
    assert f"export {VAR}=${{{VAR}:-1}}" in (root / "examples/slurm/common.sh").read_text()


@pytest.fixture
def hopper(monkeypatch):
    """Pretend this process sees one H100 (no CUDA call reaches the driver)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize("value", [None, "8"])
def test_the_launch_check_refuses_a_missing_or_other_value(value):
    args = parse_args([*BASE, "--tensor-model-parallel-size", "2"])
    validate_args(args, world_size=2, env=HOPPER)  # the configuration is valid for an H100
    environ = {} if value is None else {VAR: value}
    assert re.match(f"{VAR} (is not set|is 8), but", placement.launch_error(args, HOPPER, environ))
    assert placement.launch_error(args, HOPPER, {VAR: "1"}) is None
    assert placement.launch_error(args, Environment.gpu("b200"), environ) is None
    assert placement.launch_error(args, Environment.cpu(), environ) is None


def test_settings_for_an_h100_do_not_depend_on_this_hosts_launch(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    argv = [*BASE, "--tensor-model-parallel-size", "2"]
    settings = resolve(parse_args(argv), 2, Environment.gpu("h100"))
    assert settings.parallel.tensor_model_parallel_size == 2


def test_initialize_distributed_leaves_the_variable_alone(hopper, monkeypatch):
    """initialize_distributed sets the device and nothing in the CUDA environment."""
    monkeypatch.setenv(VAR, "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    settings = resolve(parse_args([*BASE, "--tensor-model-parallel-size", "2"]), 2, HOPPER)
    monkeypatch.delenv(VAR)
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
        loop.initialize_distributed(
            settings.parallel, settings.batch, settings.reliability, settings.schedule.seed
        )
    assert seen == [(3, None)]


def test_gloo_without_cuda_is_the_default_and_is_said():
    args = parse_args(BASE)
    validate_args(args, world_size=1)
    assert args.distributed_backend == "gloo"
    assert any("backend gloo" in note for note in args.startup_notes)


def test_nccl_without_cuda_names_the_alternative():
    args = parse_args([*BASE, "--distributed-backend", "nccl"])
    with pytest.raises(ConfigError, match="--distributed-backend gloo"):
        validate_args(args, world_size=1)


def test_nccl_is_the_default_with_cuda():
    args = parse_args(BASE)
    validate_args(args, world_size=1, env=HOPPER)
    assert args.distributed_backend == "nccl"
