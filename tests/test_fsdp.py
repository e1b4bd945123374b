"""torch FSDP2 (``--use-torch-fsdp2``) end to end on CPU, and the FSDP flags' rules.

The reference is the ordinary trainer: a 1-rank DDP run of the same tiny TST model (phase 1
for iterations 1-4, phase 2 after) computes the same global batch in the same order, so a
2-rank FSDP run must reproduce its losses through the phase boundary. Checkpoints are then
moved between FSDP and DDP runs and compared with the run they continue.
"""

from __future__ import annotations

import pytest

from tests.support.launches import MODEL, TRAIN, TST, launch
from tst_megatron.kernels import KernelAvailability
from tst_megatron.settings import Environment
from tst_megatron.training import placement
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args
from tst_megatron.training.run_config import settings_from_flags

FSDP2 = ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion"]
# untied (FSDP2 requires it), SwiGLU with biases: the fused [W; V] fc1 and its bias take the
# swiglu checkpoint path that FSDP shards differently from DDP
BASE = [
    *MODEL, *TRAIN, *TST, "--untie-embeddings-and-output-weights", "--swiglu",
    "--hidden-dropout", "0", "--attention-dropout", "0",  # no per-rank random streams
]  # fmt: skip
FP32_ATOL = 1e-5  # different reduction orders (reduce-scatter vs all-reduce), fp32
# bf16: FSDP2 reduce-scatters bf16 gradients (the parameters' dtype, as Megatron-LM's
# TorchFullyShardedDataParallel), DDP sums fp32 main_grads: measured <= 6e-5 apart
BF16_ATOL = 2e-4
ARGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --train-iters 8 --lr 1e-3 --mock-data --vocab-size 512 "
    "--untie-embeddings-and-output-weights"
).split()


def refusal(*extra: str, world_size: int = 2) -> str:
    """The ConfigError message of ``ARGS + extra`` (fails the test if it validates)."""
    args = parse_args([*ARGS, *" ".join(extra).split()])
    with pytest.raises(ConfigError) as info:
        validate_args(args, world_size=world_size)
    return str(info.value)


FSDP = "--use-torch-fsdp2 --no-gradient-accumulation-fusion"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("--use-torch-fsdp2", "add --no-gradient-accumulation-fusion"),
        (f"{FSDP} --pipeline-model-parallel-size 2", "not supported with pipeline parallelism"),
        (
            f"{FSDP} --num-experts 4 --expert-model-parallel-size 2",
            "not supported with expert parallelism",
        ),
        (f"{FSDP} --use-distributed-optimizer", "drop --use-distributed-optimizer"),
        (f"{FSDP} --bf16 --fp16", "mutually exclusive"),
        (f"{FSDP} --fp16", "not supported with --fp16"),
        (f"{FSDP} --overlap-grad-reduce", "drop the flag"),
        (f"{FSDP} --calculate-per-token-loss", "scale_gradients is a no-op"),
        (f"{FSDP} --use-megatron-fsdp", "exclusive"),
        ("--torch-fsdp2-no-reshard-after-forward", "needs --use-torch-fsdp2"),
        ("--data-parallel-sharding-strategy optim", "needs --use-megatron-fsdp"),
        ("--use-megatron-fsdp --use-distributed-optimizer", "needs CUDA GPUs"),
    ],
)
def test_fsdp_rules_refuse_with_the_flag_named(extra, expected):
    assert expected in refusal(extra)


def test_fsdp2_needs_untied_embeddings():
    args = parse_args([*ARGS[:-1], *FSDP.split()])
    with pytest.raises(ConfigError, match="requires --untie-embeddings-and-output-weights"):
        validate_args(args, world_size=2)


def test_fsdp2_refuses_a_single_cuda_connection():
    args = parse_args([*ARGS, *FSDP.split()])
    validate_args(args, world_size=2)
    hopper = Environment(kernels=KernelAvailability(cuda=True), capability=(9, 0))
    message = placement.launch_error(args, hopper, {placement.CUDA_CONNECTIONS: "1"})
    assert message.startswith("--use-torch-fsdp2: FSDP needs CUDA_DEVICE_MAX_CONNECTIONS unset")
    assert placement.launch_error(args, hopper, {}) is None


def test_fsdp_never_asks_for_a_single_cuda_connection():
    parallel = settings_from_flags(
        [*ARGS, *FSDP.split(), "--tensor-model-parallel-size", "2"], world_size=4
    ).parallel
    fsdp = parallel.use_torch_fsdp2 or parallel.use_megatron_fsdp
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    needs = placement.needs_single_connection
    assert not needs(tensor_parallel=tp, context_parallel=cp, fsdp=fsdp, arch_major=9)
    assert needs(tensor_parallel=tp, context_parallel=cp, fsdp=False, arch_major=9)


def test_fsdp2_flags_validate():
    args = parse_args([*ARGS, *FSDP.split(), "--torch-fsdp2-no-reshard-after-forward"])
    validate_args(args, world_size=2)
    assert args.use_torch_fsdp2 and not args.torch_fsdp2_reshard_after_forward
    assert args.data_parallel_size == 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every launch, shared by the assertions (the launches dominate the cost)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    every3 = ["--save-interval", "3"]
    out = {
        # 1-rank DDP reference (+ distributed optimizer, so its checkpoint tests DDP -> FSDP)
        "ddp": launch(
            tmp, "ddp", ["--use-distributed-optimizer", "--save", str(tmp / "ddp"), *every3],
            base=BASE,
        ),
        "fsdp": launch(
            tmp, "fsdp", [*FSDP2, "--save", str(tmp / "fsdp"), *every3], nproc=2, base=BASE
        ),
    }
    fsdp3, ddp3 = str(tmp / "fsdp" / "iter_0000003"), str(tmp / "ddp" / "iter_0000003")
    out["fsdp_resumed"] = launch(tmp, "fsdp_resumed", [*FSDP2, "--load", fsdp3], 2, base=BASE)
    # FSDP -> DDP + distributed optimizer: weights only (the optimizer formats differ)
    out["to_ddp_distopt"] = launch(
        tmp,
        "to_ddp_distopt",
        ["--use-distributed-optimizer", "--load", fsdp3, "--no-load-optim"],
        2,
        base=BASE,
    )
    # FSDP (2 ranks) -> DDP without the distributed optimizer (1 rank): the same optimizer
    # state format in model space, resharded
    out["to_ddp"] = launch(tmp, "to_ddp", ["--load", fsdp3], 1, base=BASE)
    out["from_ddp_distopt"] = launch(
        tmp, "from_ddp_distopt", [*FSDP2, "--load", ddp3, "--no-load-optim"], 2, base=BASE
    )
    out["ddp_bf16"] = launch(tmp, "ddp_bf16", ["--bf16"], base=BASE)
    out["fsdp_bf16"] = launch(tmp, "fsdp_bf16", [*FSDP2, "--bf16"], 2, base=BASE)
    out["fsdp_inf_grads"] = launch(
        tmp, "fsdp_inf_grads", FSDP2, 2, fault="overflow:2", base=BASE
    )
    for name, result in out.items():
        assert result.returncode == 0, f"{name} failed:\n{result.log[-3000:]}"
    return out


def assert_close(got: dict, ref: dict, atol: float, iterations) -> None:
    assert sorted(got) == list(iterations)
    for iteration in iterations:
        assert got[iteration] == pytest.approx(ref[iteration], abs=atol), iteration


@pytest.mark.slow
def test_fsdp2_reproduces_the_single_rank_run_through_the_phase_boundary(runs):
    assert_close(runs["fsdp"].losses, runs["ddp"].losses, FP32_ATOL, range(1, 9))
    log = runs["fsdp"].log
    assert "TST phase boundary at iteration 4" in log
    assert "phase: 1 (s=4, full)" in log and "phase: 2" in log


@pytest.mark.slow
def test_fsdp2_bf16_reproduces_the_single_rank_bf16_run(runs):
    assert_close(runs["fsdp_bf16"].losses, runs["ddp_bf16"].losses, BF16_ATOL, range(1, 9))


@pytest.mark.slow
def test_fsdp2_resume_is_exact(runs):
    resumed = runs["fsdp_resumed"]
    assert "loaded checkpoint" in resumed.log
    full = runs["fsdp"].losses
    assert resumed.losses == {i: full[i] for i in range(4, 9)}  # bit for bit


@pytest.mark.slow
def test_fsdp2_checkpoint_moves_to_ddp_with_its_optimizer_state(runs):
    # the DDP run (1 rank, torch optimizer) continues the FSDP run as if uninterrupted
    assert_close(runs["to_ddp"].losses, runs["fsdp"].losses, FP32_ATOL, range(4, 9))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("moved", "source"), [("to_ddp_distopt", "fsdp"), ("from_ddp_distopt", "ddp")]
)
def test_weights_move_between_fsdp2_and_the_distributed_optimizer(runs, moved, source):
    got, ref = runs[moved].losses, runs[source].losses
    # iteration 4's loss is computed with the loaded weights, before any update
    assert got[4] == pytest.approx(ref[4], abs=FP32_ATOL)
    # the optimizer restarted (--no-load-optim): later iterations take other steps
    assert abs(got[8] - ref[8]) > 10 * FP32_ATOL


@pytest.mark.slow
def test_fsdp2_checks_its_sharded_gradients_for_inf(runs):
    """Iteration 2's loss is finite and every gradient Inf: only the local gradient shards
    can tell, and all ranks must skip the update together."""
    records = {r["iteration"]: r for r in runs["fsdp_inf_grads"].records}
    assert sorted(records) == list(range(1, 9))
    assert records[1]["nan_iterations"] == 0
    assert records[2]["nan_iterations"] == records[2]["skipped_iterations"] == 1
    assert records[2]["grad_norm"] is None and "lm_loss" not in records[2]
    assert records[2]["lr"] == records[1]["lr"]  # the schedule did not advance either
    assert all(records[i]["nan_iterations"] == 0 for i in range(3, 9))


def test_planner_shards_every_model_state_over_data_parallel_with_fsdp():
    from tests.tool_import import import_tool
    from tst_megatron.planning.layout import PlanRequest

    plan = import_tool("plan").plan

    config = "examples/configs/tst-10b-a1b.yaml"  # untied embeddings, bf16, EP 1 here
    ddp = plan(PlanRequest(config, gpu="h100"))["memory_stages"][0]
    fsdp = plan(PlanRequest(config, gpu="h100", fsdp=True))["memory_stages"][0]
    params, dp = ddp["params"], 8
    assert fsdp["params"] == params
    assert ddp["weights_bytes"] == 2 * params and ddp["grads_bytes"] == 4 * params
    assert fsdp["weights_bytes"] == pytest.approx(2 * params / dp, abs=1)
    assert fsdp["grads_bytes"] == pytest.approx(2 * params / dp, abs=1)  # bf16 gradients
    assert fsdp["optimizer_bytes"] == pytest.approx(12 * params / dp, abs=1)
    # the largest unit is a (MoE) layer, all 28 alike: the total less the word embedding,
    # the LM head and the final norm, over the layers; gathered twice (running and
    # prefetched) in bf16 plus its unsharded bf16 gradient
    vocab, hidden, layers = 128_256, 1024, 28
    layer = (params - 2 * vocab * hidden - hidden) / layers
    assert layer > vocab * hidden
    assert fsdp["fsdp_gathered_bytes"] == pytest.approx(3 * 2 * layer, abs=1)
    assert ddp["fsdp_gathered_bytes"] == 0
