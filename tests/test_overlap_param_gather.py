"""``--overlap-param-gather`` (Megatron-Core DDP + distributed optimizer) through TST phases.

With the overlap, a parameter's all-gather is only waited for in the forward pre-hook
Megatron-Core's DDP puts on the module that owns it. TST's bag embedding and fused output loss
read the word embedding and output weights outside those modules' ``forward``
(`tst_megatron.model.run_forward_pre_hooks`), so a 2-rank run must give the losses of the same
run without the overlap, through the phase-1 -> phase-2 boundary (iterations 1-4 -> 5-8).
The reference is that run: without the overlap the all-gather finishes inside the optimizer
step, before any forward.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.launches import DP2, launch
from tst_megatron import model
from tst_megatron.model import run_forward_pre_hooks

FP32_ATOL = 1e-6
OVERLAP = ["--overlap-param-gather"]
CASES = {
    "tied": [],
    "fused_untied": ["--tst-fused-output-loss", "--untie-embeddings-and-output-weights"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_overlap_param_gather_gives_the_losses_of_a_synchronous_gather(tmp_path, case):
    flags = [*DP2, "--overlap-grad-reduce", *CASES[case]]
    reference = launch(tmp_path, "sync", flags, nproc=2)
    overlapped = launch(tmp_path, "overlap", [*flags, *OVERLAP], nproc=2)
    for run in (reference, overlapped):
        assert run.returncode == 0, run.log[-3000:]
        assert sorted(run.losses) == list(range(1, 9)), run.log[-3000:]
    for it in range(1, 9):
        assert overlapped.losses[it] == pytest.approx(reference.losses[it], abs=FP32_ATOL), (
            it, overlapped.losses, reference.losses
        )


class _Recorder:
    """Forward pre-hooks that log their calls into ``calls``."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def plain(self, module, args):
        self.calls.append(f"plain{len(args)}")

    def with_kwargs(self, module, args, kwargs):
        self.calls.append("with_kwargs")


def test_run_forward_pre_hooks_runs_the_plain_hooks_only():
    layer, recorder = torch.nn.Linear(2, 2), _Recorder()
    layer.register_forward_pre_hook(recorder.plain)
    layer.register_forward_pre_hook(recorder.with_kwargs, with_kwargs=True)  # as torch FSDP2
    run_forward_pre_hooks(layer, torch.zeros(1, 2))
    assert recorder.calls == ["plain1"]


def test_run_forward_pre_hooks_refuses_a_hook_that_replaces_the_inputs():
    layer = torch.nn.Linear(2, 2)
    layer.register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    with pytest.raises(RuntimeError, match=r"Linear .* returned new inputs"):
        run_forward_pre_hooks(layer, torch.zeros(1, 2))


def test_the_fused_output_loss_runs_the_output_layers_hooks_before_reading_its_weight(
    monkeypatch,
):
    """The end-to-end runs above keep one DDP bucket, whose wait the decoder layers' hooks
    already did before the output layer; this checks the order on the output layer itself."""
    output_layer, recorder = torch.nn.Linear(4, 8, bias=False), _Recorder()
    output_layer.register_forward_pre_hook(recorder.plain)
    output_layer.tp_group = output_layer.sequence_parallel = None
    output_layer.gradient_accumulation_fusion = False

    def loss(hidden, weight, *args, **kwargs):
        recorder.calls.append("weight read")
        return hidden.sum(-1)

    monkeypatch.setattr(model, "fused_output_multi_hot_cross_entropy", loss)
    hidden = torch.zeros(3, 2, 4)
    model._fused_output_loss(output_layer, hidden, None, torch.zeros(2, 3), None, None)
    assert recorder.calls == ["plain1", "weight read"]
