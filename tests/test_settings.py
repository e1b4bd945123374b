"""The typed run settings (`tst_megatron.settings`): golden snapshots of every shipped config,
resolution for a described machine, and each section's checks.

Golden files: ``tests/golden/settings/<case>.json`` hold the resolved `RunConfig` of every
shipped YAML at the layout of its planner golden case (``GOLDEN_CASES`` of tests/test_plan.py,
read from its source), resolved for the planner's GPU (`Environment.gpu`), and of
``examples/demo.yaml`` (one CPU rank). A change meant to change the settings regenerates them,
and the diff goes into the same commit::

    UPDATE_GOLDEN=1 python -m pytest -q tests/test_settings.py -k golden
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import warnings
from pathlib import Path

import pytest
import yaml

from tst_megatron.kernels import KernelAvailability
from tst_megatron.settings import Environment, ReliabilityConfig, RunConfig, SettingsError
from tst_megatron.training.arguments import parse_args
from tst_megatron.training.run_config import resolve

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "settings"
PLAN_TESTS = Path(__file__).resolve().parent / "test_plan.py"


def planner_golden_cases() -> dict[str, tuple[str, ...]]:
    """``GOLDEN_CASES`` of tests/test_plan.py, evaluated from its source (no import: that
    module imports the planner and the model builder)."""
    wanted = {"PIPELINED_MOE", "GOLDEN_CASES"}
    namespace: dict = {}
    for node in ast.parse(PLAN_TESTS.read_text()).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in wanted for t in targets):
                exec(compile(ast.Module([node], []), str(PLAN_TESTS), "exec"), namespace)
    return namespace["GOLDEN_CASES"]


def trainer_command(case: str, plan_flags: tuple[str, ...]) -> tuple[list[str], int, str]:
    """The ``pretrain_tst.py`` flags, world size and GPU of a planner golden case."""
    parser = argparse.ArgumentParser()
    for flag in ("--nodes", "--gpus-per-node", "--tp", "--pp", "--vpp", "--cp", "--ep", "--etp",
                 "--micro-batch-size", "--global-batch-size", "--seq-length"):  # fmt: skip
        parser.add_argument(flag, type=int)
    parser.add_argument("--gpu", default="b200")
    parser.add_argument("--recompute", action="store_true")
    plan = parser.parse_args(plan_flags)
    config = f"examples/configs/{case.removesuffix('-h100-pp2-vpp2-recompute')}.yaml"
    argv = ["--yaml-config", str(ROOT / config)]
    for flag, value in (
        ("--tensor-model-parallel-size", plan.tp),
        ("--pipeline-model-parallel-size", plan.pp),
        ("--context-parallel-size", plan.cp),
        ("--expert-model-parallel-size", plan.ep),
        ("--expert-tensor-parallel-size", plan.etp),
        ("--micro-batch-size", plan.micro_batch_size),
        ("--global-batch-size", plan.global_batch_size),
        ("--seq-length", plan.seq_length),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if plan.vpp and plan.vpp > 1:
        layers = yaml.safe_load((ROOT / config).read_text())["num-layers"]
        argv += ["--num-layers-per-virtual-pipeline-stage", str(layers // plan.pp // plan.vpp)]
    if plan.recompute:
        argv += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]  # fmt: skip
    return argv, (plan.nodes or 1) * (plan.gpus_per_node or 8), plan.gpu


# scripts/demo.sh's command line (paths relative to the repository, as the demo runs).
DEMO = ["--yaml-config", "examples/demo.yaml",
        "--train-data-path", "data/processed/sample_train_text_document",
        "--valid-data-path", "data/processed/sample_valid_text_document",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "data/sample",
        "--data-cache-path", "runs/demo/cache", "--save", "runs/demo/checkpoints",
        "--metrics-jsonl", "runs/demo/metrics.jsonl"]  # fmt: skip


def golden_cases() -> dict[str, tuple[list[str], int, Environment]]:
    cases = {}
    for case, flags in planner_golden_cases().items():
        argv, world, gpu = trainer_command(case, flags)
        cases[case] = (argv, world, Environment.gpu(gpu))
    cases["demo"] = (DEMO, 1, Environment.cpu())
    return cases


def resolved(argv: list[str], world_size: int, env: Environment) -> RunConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve(parse_args(argv), world_size, env)


def test_every_shipped_config_has_a_golden_case():
    shipped = {path.stem for path in (ROOT / "examples" / "configs").glob("*.yaml")}
    covered = {Path(argv[1]).stem for argv, _, _ in golden_cases().values()}
    assert covered == shipped | {"demo"}


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch):
    """Relative paths (the demo's data and tokenizer) as the shipped commands give them."""
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("case", sorted(golden_cases()))
def test_golden_settings(case):
    """The resolved settings of every shipped config equal the committed golden file."""
    argv, world_size, env = golden_cases()[case]
    settings = resolved(argv, world_size, env).to_dict()
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    path = GOLDEN / f"{case}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: regenerate with UPDATE_GOLDEN=1"
    assert json.loads(text) == json.loads(path.read_text()), (
        f"the resolved settings of case {case} changed; if intended, regenerate with "
        "UPDATE_GOLDEN=1 python -m pytest -q tests/test_settings.py -k golden"
    )


# ------------------------------------------------------------------ the environment ---------

MOE_30B = ["--yaml-config", str(ROOT / "examples/configs/tst-30b-a3b.yaml"),
           "--expert-model-parallel-size", "8", "--micro-batch-size", "2"]  # fmt: skip


def test_a_gpu_layout_resolves_on_a_cpu_host():
    """Same flags, two machines: Transformer Engine, fusions, MoE kernels, nccl and the
    data-sheet peak on an H100 node; the local spec with everything off on a CPU host."""
    gpu = resolved(MOE_30B, 128, Environment.gpu("h100"))
    cpu = resolved(MOE_30B, 128, Environment.cpu())
    assert gpu.kernels.transformer_impl == "transformer_engine"
    assert gpu.kernels.moe_grouped_gemm and gpu.kernels.moe_permute_fusion
    assert not gpu.kernels.use_cpu_initialization
    assert set(gpu.kernels.fusions.enabled()) == {
        "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
        "persist_layer_norm", "apply_rope_fusion", "gradient_accumulation_fusion",
    }  # fmt: skip
    assert (gpu.parallel.distributed_backend, gpu.logging.peak_tflops) == ("nccl", 989.0)
    assert gpu.environment.capability == (9, 0)
    assert cpu.kernels.transformer_impl == "local" and cpu.kernels.use_cpu_initialization
    assert not (cpu.kernels.moe_grouped_gemm or cpu.kernels.moe_permute_fusion)
    assert cpu.kernels.fusions.enabled() == []
    assert (cpu.parallel.distributed_backend, cpu.logging.peak_tflops) == ("gloo", None)
    assert dataclasses.replace(gpu, environment=cpu.environment, kernels=cpu.kernels,
                               parallel=cpu.parallel, logging=cpu.logging) == cpu  # fmt: skip


def test_flags_given_win_over_the_environment():
    flags = [*MOE_30B, "--distributed-backend", "gloo", "--peak-tflops", "500",
             "--no-moe-permute-fusion", "--no-bias-swiglu-fusion"]  # fmt: skip
    gpu = resolved(flags, 128, Environment.gpu("b200"))
    assert gpu.kernels.transformer_impl == "transformer_engine"
    assert gpu.kernels.moe_grouped_gemm and not gpu.kernels.moe_permute_fusion
    assert not gpu.kernels.fusions.bias_activation_fusion
    assert (gpu.parallel.distributed_backend, gpu.logging.peak_tflops) == ("gloo", 500.0)


def test_what_the_environment_cannot_run_is_refused():
    """Settings resolved for a GPU node, run on a host without Transformer Engine."""
    gpu = resolved(MOE_30B, 128, Environment.gpu("h100"))
    no_te = Environment(kernels=KernelAvailability(cuda=True), fused_permute=True)
    with pytest.raises(SettingsError) as err:
        dataclasses.replace(gpu, environment=no_te)
    assert "--transformer-impl transformer_engine needs Transformer Engine" in str(err.value)
    local = dataclasses.replace(gpu.kernels, transformer_impl="local")
    with pytest.raises(SettingsError) as err:
        dataclasses.replace(gpu, environment=no_te, kernels=local)
    assert "--moe-permute-fusion needs Transformer Engine >= 2.1's" in str(err.value)
    assert no_te.default_transformer_impl == "local" and no_te.default_backend == "nccl"
    with pytest.raises(ValueError, match="unknown GPU model 'v100'; known: a100, b200"):
        Environment.gpu("v100")


# ------------------------------------------------------------------ sections ---------------


def test_sections_are_frozen():
    settings = resolved(DEMO, 1, Environment.cpu())
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model.num_layers = 8  # type: ignore[misc]


def test_cross_section_batch_check():
    settings = resolved(DEMO, 1, Environment.cpu())
    parallel = dataclasses.replace(settings.parallel, world_size=3, data_parallel_size=3)
    with pytest.raises(SettingsError, match=r"--global-batch-size 16 is not divisible by "
                       r"--micro-batch-size 8 x data-parallel size 3 = 24"):  # fmt: skip
        dataclasses.replace(settings, parallel=parallel)


@pytest.mark.parametrize(
    ("section", "changes", "message"),
    [
        ("model", {"num_query_groups": 3}, "--num-attention-heads 4 is not divisible by "
         "--num-query-groups 3"),
        ("model", {"max_position_embeddings": 32}, "--max-position-embeddings 32 is smaller"),
        ("parallel", {"data_parallel_size": 2}, "world size 1 is not --tensor-model-parallel"),
        ("precision", {"accumulate_allreduce_grads_in_fp32": False, "params_dtype": "bf16"},
         "--bf16 accumulates and all-reduces gradients in fp32"),
        ("schedule", {"min_lr": 1.0}, "--min-lr 1.0 is larger than --lr 0.003"),
        ("schedule", {"lr_warmup_iters": 200}, "--lr-warmup-iters 200 must be >= 0 and smaller"),
        ("batch", {"micro_batch_size": 0}, "--micro-batch-size must be >= 1, got 0"),
        ("data", {"mock_data": True}, "give exactly one data source"),
        ("checkpoint", {"save": None, "async_save": True}, "--async-save needs --save"),
        ("logging", {"log_timers_to_tensorboard": True}, "--log-timers-to-tensorboard needs"),
        ("reliability", {"manual_gc_interval": 2}, "--manual-gc-interval/--no-manual-gc-eval"),
        ("optimizer", {"start_weight_decay": 0.5}, "--start-weight-decay/--end-weight-decay"),
        ("recompute", {"recompute_method": "block"}, "--recompute-granularity full needs"),
    ],
)
def test_section_checks(section, changes, message):
    settings = resolved(DEMO, 1, Environment.cpu())
    with pytest.raises(SettingsError) as err:
        dataclasses.replace(getattr(settings, section), **changes)
    assert message in str(err.value)


def test_reliability_exit_signal():
    assert ReliabilityConfig(exit_signal="SIGUSR1").exit_signum.name == "SIGUSR1"
