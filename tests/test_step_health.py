"""`faults.check_step`: the step's loss and NaN/Inf gradients from one reduction; what is bad."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tst_megatron.training.faults import StepHealth, check_step


@pytest.fixture
def one_rank():
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if own:
        dist.destroy_process_group()


def chunk(*grads: torch.Tensor) -> SimpleNamespace:
    buffers = [SimpleNamespace(grad_data=g) for g in grads]
    return SimpleNamespace(buffers=buffers[:1], expert_parallel_buffers=buffers[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("poison", [None, float("inf"), float("-inf"), float("nan")])
def test_one_reduction_finds_any_non_finite_gradient(one_rank, monkeypatch, dtype, poison):
    calls = []
    original = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(1) or original(t))
    dense, expert = torch.randn(1000).to(dtype), torch.randn(10).to(dtype)
    if poison is not None:
        expert[3] = poison  # in an expert-parallel buffer
    outputs = [{"lm loss": torch.tensor([6.0, 2.0])}, {"lm loss": torch.tensor([3.0, 1.0])}]
    health = check_step(outputs, [chunk(dense, expert)])
    assert health.loss == 3.0
    assert health.grads_finite is (poison is None)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("loss", "grads_finite", "loss_scaling", "bad"),
    [
        (2.0, True, False, False),
        (2.0, False, False, True),  # bf16/fp32: a NaN/Inf gradient is a bad step
        (2.0, False, True, False),  # fp16: an overflow, the optimizer skips it and rescales
        (float("nan"), True, True, True),  # a NaN loss is bad in every precision
        (float("inf"), False, False, True),
    ],
)
def test_what_counts_as_a_bad_step(loss, grads_finite, loss_scaling, bad):
    assert StepHealth(loss, grads_finite).is_bad(loss_scaling) is bad
