"""Tests of tools/plan.py, the cluster-layout planner (`tst_megatron.planning`).

The planner runs in this process (importing ``megatron.core`` costs seconds per interpreter);
one rejection also runs as a script to check its exit status.

Golden files: ``tests/golden/plan/<case>.json`` hold the ``--json`` report of every shipped
config (`GOLDEN_CASES`). A change to the planning model that is meant to change the numbers
regenerates them on purpose, and the diff goes into the same commit::

    UPDATE_GOLDEN=1 python -m pytest -q tests/test_plan.py -k golden
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.model_settings import config_of, model_of
from tests.tool_import import import_tool
from tst_megatron.settings import Environment
from tst_megatron.training.model_builder import single_process_parallel_state
from tst_megatron.training.run_config import settings_from_flags

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
CONFIGS = ROOT / "examples" / "configs"
GOLDEN = Path(__file__).resolve().parent / "golden" / "plan"


plan = import_tool("plan")

TINY_DENSE = {
    "num-layers": 4,
    "hidden-size": 64,
    "ffn-hidden-size": 96,
    "num-attention-heads": 4,
    "num-query-groups": 2,
    "seq-length": 32,
    "micro-batch-size": 2,
    "global-batch-size": 16,
    "train-iters": 10,
    "lr": 1.0e-3,
    "vocab-size": 200,
    "mock-data": True,
    "swiglu": True,
    "normalization": "RMSNorm",
    "disable-bias-linear": True,
    "untie-embeddings-and-output-weights": True,
    "position-embedding-type": "rope",
    "qk-layernorm": True,
    "bf16": True,
    "use-distributed-optimizer": True,
    "tst-bag-size": 3,
    "tst-phase1-fraction": 0.3,
}
# Tied embeddings, learned positions, LayerNorm and biases: the other parameter kinds.
TINY_TIED = {
    **{k: v for k, v in TINY_DENSE.items() if k not in ("disable-bias-linear", "qk-layernorm")},
    "untie-embeddings-and-output-weights": False,
    "position-embedding-type": "learned_absolute",
    "normalization": "LayerNorm",
    "swiglu": False,
}
TINY_MOE = {
    **TINY_DENSE,
    "num-experts": 4,
    "moe-router-topk": 2,
    "moe-ffn-hidden-size": 32,
    "moe-shared-expert-intermediate-size": 48,
    "moe-layer-freq": 2,
    "moe-token-dispatcher-type": "allgather",  # the CPU model builds without the CPU shim
}


def write_config(tmp_path: Path, settings: dict, **overrides) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**settings, **overrides}))
    return str(path)


def run_plan(capsys, *argv: str) -> tuple[int, str]:
    code = plan.main(list(argv))
    return code, capsys.readouterr().out


def plan_json(capsys, config: str, *argv: str) -> tuple[int, dict]:
    code, out = run_plan(capsys, "--config", config, *argv, "--json")
    return code, json.loads(out)


def real_model_counts(config: str) -> tuple[int, int, int]:
    """(total, routed-expert params, num experts) of the model `build_model` makes on CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings = settings_from_flags(["--yaml-config", config], 1)
        model_config = config_of(settings)
        model_config.perform_initialization = False
        with single_process_parallel_state():
            model = model_of(settings, model_config)
    assert all(p.device.type == "cpu" for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return total, routed, settings.model.moe.num_experts if settings.model.moe else 0


# ------------------------------------------------------------------ parameter counts --------


@pytest.mark.parametrize(
    "settings", [TINY_DENSE, TINY_TIED, TINY_MOE], ids=["dense", "tied", "moe"]
)
def test_counts_equal_the_real_cpu_model(tmp_path, capsys, settings):
    config = write_config(tmp_path, settings)
    total, routed, experts = real_model_counts(config)
    code, report = plan_json(capsys, config, "--nodes", "1", "--gpus-per-node", "1")
    assert code == 0, report["errors"]
    assert report["total_params"] == total
    inactive = routed * (experts - 2) // experts if experts else 0
    assert report["active_params"] == total - inactive
    assert report["routed_expert_params"] == routed
    assert (report["analytic_total_params"], report["analytic_active_params"]) == (
        report["total_params"],
        report["active_params"],
    )


def test_counts_equal_the_real_270m_model(capsys):
    config = str(CONFIGS / "tst-270m.yaml")
    total, _, _ = real_model_counts(config)
    code, report = plan_json(capsys, config, "--gpus-per-node", "8")
    assert code == 0, report["errors"]
    assert report["total_params"] == report["active_params"] == total == 253_954_368


def test_moe_config_with_alltoall_dispatcher(capsys):
    """The 10B-A1B config: ~10B total, ~1B active, one GPU's experts = 1/EP of them."""
    code, report = plan_json(capsys, str(CONFIGS / "tst-10b-a1b.yaml"), "--nodes", "2", "--ep", "8")
    assert code == 0, report["errors"]
    assert 9.5e9 < report["total_params"] < 10.5e9
    assert 0.95e9 < report["active_params"] < 1.1e9
    stage = report["memory_stages"][0]
    dense = report["total_params"] - report["routed_expert_params"]
    assert stage["params"] == dense + report["routed_expert_params"] // 8


# ------------------------------------------------------------------ report ------------------


def test_json_report(tmp_path, capsys):
    config = write_config(tmp_path, TINY_DENSE)
    code, report = plan_json(
        capsys, config, "--nodes", "2", "--gpus-per-node", "4", "--tp", "2", "--pp", "2",
        "--gpu", "h100", "--micro-batch-size", "1", "--global-batch-size", "8",
    )  # fmt: skip
    assert code == 0 and report["ok"] and report["errors"] == []
    for key in ("total_params", "active_params", "flops_per_step_phase1", "flops_per_step_phase2",
                "data_tokens_per_step_phase1", "data_tokens_per_step_phase2",
                "memory_per_gpu_bytes", "step_time_s", "model_tokens_per_s"):  # fmt: skip
        assert isinstance(report[key], int | float), key
    assert report["layout"]["dp"] == 2 and report["layout"]["num_microbatches"] == 4
    assert report["flops_per_step_phase1"] == report["flops_per_step_phase2"]
    assert len(report["memory_stages"]) == 2
    assert report["memory_per_gpu_bytes"] == max(
        max(m["total_phase1_bytes"], m["total_phase2_bytes"]) for m in report["memory_stages"]
    )
    assert report["fits"] and report["memory_budget_bytes"] == round(80 * 2**30 * 0.93)


def test_data_tokens_per_step(tmp_path, capsys):
    """Phase 1 reads s*(L+1)-1 new tokens per sample (full), L+s-1 (output-only); phase 2 L."""
    batch, seq, bag = 16, 32, 3
    config = write_config(tmp_path, TINY_DENSE)
    _, report = plan_json(capsys, config, "--gpus-per-node", "8")
    assert report["data_tokens_per_step_phase1"] == batch * (bag * (seq + 1) - 1)
    assert report["data_tokens_per_step_phase2"] == batch * seq
    assert report["model_tokens_per_step"] == batch * seq
    config = write_config(tmp_path, TINY_DENSE, **{"tst-mode": "output-only"})
    _, report = plan_json(capsys, config, "--gpus-per-node", "8")
    assert report["data_tokens_per_step_phase1"] == batch * (seq + bag - 1)
    assert report["memory_stages"][0]["phase1_bag_input_bytes"] == 0  # no bag inputs


def test_3b_numbers(capsys):
    """The 3B config on 4 B200 nodes: 20k steps, s=6, r=0.3."""
    code, report = plan_json(capsys, str(CONFIGS / "tst-3b.yaml"), "--nodes", "4")
    assert code == 0, report["errors"]
    assert report["total_params"] == 3_075_098_624
    assert report["data_tokens_per_step_phase1"] == 512 * (6 * 4097 - 1)
    assert report["tst"] == {"bag_size": 6, "mode": "full", "fold": "sequence",
                             "train_iters": 20000, "phase1_iters": 6000,
                             "phase2_iters": 14000}  # fmt: skip
    stage = report["memory_stages"][0]
    assert stage["weights_bytes"] == 2 * report["total_params"]
    assert stage["grads_bytes"] == 4 * report["total_params"]
    assert stage["optimizer_bytes"] == round(12 * report["total_params"] / 32)


def test_recompute_and_pipeline_memory(tmp_path, capsys):
    config = write_config(tmp_path, TINY_DENSE, **{"num-layers": 8})
    base = ("--gpus-per-node", "4", "--pp", "4", "--micro-batch-size", "1")
    _, plain = plan_json(capsys, config, *base)
    _, recompute = plan_json(capsys, config, *base, "--recompute")
    first, last = plain["memory_stages"][0], plain["memory_stages"][-1]
    # 1F1B: the first stage holds PP micro-batches in flight, the last one.
    assert first["activations_bytes"] == pytest.approx(4 * last["activations_bytes"], rel=1e-9)
    assert last["logits_bytes"] > 0 == first["logits_bytes"]
    assert recompute["memory_per_gpu_bytes"] < plain["memory_per_gpu_bytes"]
    assert recompute["step_time_s"] == pytest.approx(plain["step_time_s"] * 4 / 3)


def test_grouped_gemm_plans_on_cpu(tmp_path, capsys):
    """Grouped GEMM in a config resolves for the planned GPU node on a CPU host without a
    grouped-GEMM kernel: the same plan (the meta model runs the experts one by one here)."""
    config = write_config(tmp_path, TINY_MOE)
    _, plain = plan_json(capsys, config, "--gpus-per-node", "2", "--ep", "2")
    config = write_config(tmp_path, TINY_MOE, **{"moe-grouped-gemm": True})
    code, grouped = plan_json(capsys, config, "--gpus-per-node", "2", "--ep", "2")
    assert code == 0, grouped["errors"]
    assert grouped == plain


def test_gpu_only_settings_plan_on_cpu(tmp_path, capsys):
    """TE and FP8 in a config do not stop the CPU planner (settings are resolved for the
    planned GPU's `Environment`, not this host); FP8 doubles the peak."""
    config = write_config(tmp_path, TINY_MOE)
    _, bf16 = plan_json(capsys, config, "--gpus-per-node", "2", "--ep", "2")
    gpu_only = {"transformer-impl": "transformer_engine", "moe-grouped-gemm": True,
                "fp8-format": "hybrid"}  # fmt: skip
    config = write_config(tmp_path, TINY_MOE, **gpu_only)
    code, fp8 = plan_json(capsys, config, "--gpus-per-node", "2", "--ep", "2")
    assert code == 0, fp8["errors"]
    assert fp8["total_params"] == bf16["total_params"]
    assert fp8["peak_tflops_per_gpu"] == 2 * bf16["peak_tflops_per_gpu"]
    assert fp8["step_time_s"] == pytest.approx(bf16["step_time_s"] / 2)


def test_human_readable_report(tmp_path, capsys):
    code, out = run_plan(capsys, "--config", write_config(tmp_path, TINY_MOE), "--ep", "2")
    assert code == 0
    for text in ("parameters", "FLOPs/step", "data tokens/step", "memory per GPU", "layout OK"):
        assert text in out


# ------------------------------------------------------------------ rejections --------------

REJECTIONS = [
    pytest.param(
        {"num-attention-heads": 6, "num-query-groups": 6, "hidden-size": 48},
        ["--gpus-per-node", "4", "--tp", "4"],
        "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4",
        id="heads-tp",
    ),
    pytest.param(
        {},
        ["--gpus-per-node", "4", "--tp", "4"],
        "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4",
        id="groups-tp",
    ),
    pytest.param(
        {"num-layers": 6},
        ["--gpus-per-node", "4", "--pp", "4"],
        "--num-layers 6 is not divisible by --pipeline-model-parallel-size 4",
        id="layers-pp",
    ),
    pytest.param(
        {"num-layers": 8},
        ["--gpus-per-node", "2", "--pp", "2", "--vpp", "3"],
        "--vpp 3 does not divide the 4 layers per pipeline stage (--num-layers 8 / --pp 2)",
        id="layers-vpp",
    ),
    pytest.param({}, ["--vpp", "2"], "--vpp 2 needs --pp > 1", id="vpp-without-pp"),
    pytest.param(
        {"num-layers": 8},
        ["--gpus-per-node", "2", "--pp", "2", "--vpp", "2", "--global-batch-size", "6"],
        "the interleaved pipeline schedule (--num-layers-per-virtual-pipeline-stage) needs a "
        "number of micro-batches divisible by --pipeline-model-parallel-size 2",
        id="interleaved-microbatches",
    ),
    pytest.param(
        {**TINY_MOE, "num-experts": 6},
        ["--gpus-per-node", "8", "--ep", "4"],
        "--num-experts 6 is not divisible by --expert-model-parallel-size 4",
        id="experts-ep",
    ),
    pytest.param(
        {},
        ["--nodes", "3", "--gpus-per-node", "2", "--tp", "4"],
        "world size 6 is not divisible by --tensor-model-parallel-size 4 x "
        "--pipeline-model-parallel-size 1 x --context-parallel-size 1 = 4",
        id="world-size",
    ),
    pytest.param(
        {},
        ["--gpus-per-node", "4", "--global-batch-size", "12"],
        "--global-batch-size 12 is not divisible by --micro-batch-size 2 x data-parallel size 4",
        id="global-batch",
    ),
    pytest.param(
        {},
        ["--gpus-per-node", "4", "--cp", "4", "--seq-length", "36"],
        "--seq-length 36 must be a multiple of 2 x --context-parallel-size 4 = 8",
        id="seq-cp",
    ),
]


@pytest.mark.parametrize(("overrides", "argv", "message"), REJECTIONS)
def test_rejections(tmp_path, capsys, overrides, argv, message):
    config = write_config(tmp_path, {**TINY_DENSE, **overrides})
    code, report = plan_json(capsys, config, *argv)
    assert code == 1 and not report["ok"]
    assert any(message in error for error in report["errors"]), report["errors"]
    assert report["total_params"] > 0  # the layout-free numbers are still reported
    code, out = run_plan(capsys, "--config", config, *argv)
    assert code == 1 and "layout REJECTED" in out and message in out


def test_memory_over_budget(capsys):
    code, report = plan_json(
        capsys, str(CONFIGS / "tst-3b.yaml"), "--gpus-per-node", "1", "--gpu", "a100",
        "--micro-batch-size", "8", "--global-batch-size", "8",
    )  # fmt: skip
    assert code == 1 and not report["fits"]
    (error,) = report["errors"]
    peak = report["memory_per_gpu_bytes"] / 2**30
    assert f"estimated peak memory {peak:.1f} GiB per GPU (pipeline stage 0, phase 1)" in error
    assert "exceeds the usable 74.4 GiB of one a100 (80 GiB x 0.93)" in error
    code, report = plan_json(
        capsys, str(CONFIGS / "tst-3b.yaml"), "--gpus-per-node", "8", "--gpu", "a100",
        "--tp", "2", "--recompute", "--micro-batch-size", "1", "--global-batch-size", "8",
    )  # fmt: skip
    assert code == 0 and report["fits"]


def test_script_exit_status(tmp_path):
    config = write_config(tmp_path, TINY_DENSE)
    rejected = subprocess.run(
        [sys.executable, str(TOOLS / "plan.py"), "--config", config, "--tp", "8", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rejected.returncode == 1, rejected.stderr
    report = json.loads(rejected.stdout)  # exactly one JSON object
    assert report["ok"] is False and "--tensor-model-parallel-size 8" in report["errors"][0]


def test_unusable_input(tmp_path, capsys):
    assert plan.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read --yaml-config" in capsys.readouterr().err
    settings = {k: v for k, v in TINY_DENSE.items() if k != "vocab-size"}
    settings.update({"tokenizer-type": "HuggingFaceTokenizer", "tokenizer-model": "/none"})
    assert plan.main(["--config", write_config(tmp_path, settings)]) == 2
    assert "gives no vocab-size" in capsys.readouterr().err


# ------------------------------------------------------------------ golden reports ----------

# The layouts of docs/planner.md's table (B200, the default; 8 GPUs per node), one per shipped
# config, plus a pipelined, interleaved, recomputed MoE layout on H100s.
PIPELINED_MOE = ("--gpu", "h100", "--nodes", "2", "--ep", "8", "--pp", "2", "--vpp", "2",
                 "--micro-batch-size", "2", "--recompute")  # fmt: skip
GOLDEN_CASES: dict[str, tuple[str, ...]] = {
    "tst-270m": ("--nodes", "1"),
    "tst-270m-baseline": ("--nodes", "1"),
    "tst-600m": ("--nodes", "1"),
    "tst-600m-baseline": ("--nodes", "1"),
    "tst-3b": ("--nodes", "4", "--micro-batch-size", "4"),
    "tst-3b-baseline": ("--nodes", "4", "--micro-batch-size", "4"),
    "tst-10b-a1b": ("--nodes", "8", "--ep", "8", "--micro-batch-size", "4"),
    "tst-10b-a1b-baseline": ("--nodes", "8", "--ep", "8", "--micro-batch-size", "4"),
    "tst-30b-a3b": ("--nodes", "16", "--ep", "8", "--micro-batch-size", "2"),
    "tst-30b-a3b-baseline": ("--nodes", "16", "--ep", "8", "--micro-batch-size", "2"),
    "tst-10b-a1b-h100-pp2-vpp2-recompute": PIPELINED_MOE,
}


def golden_config(case: str) -> str:
    """The shipped config of a golden case (its name up to the layout suffix)."""
    name = case.removesuffix("-h100-pp2-vpp2-recompute")
    return f"examples/configs/{name}.yaml"


def test_every_shipped_config_has_a_golden_case():
    shipped = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert shipped == {Path(golden_config(case)).stem for case in GOLDEN_CASES}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_report(case, capsys, monkeypatch):
    """The ``--json`` output of every shipped config equals its committed golden file."""
    monkeypatch.chdir(ROOT)  # the report names the config as given: a relative path
    argv = ["--config", golden_config(case), *GOLDEN_CASES[case], "--json"]  # default b200
    code, out = run_plan(capsys, *argv)
    assert code == 0, out
    path = GOLDEN / f"{case}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(out)
    assert path.exists(), f"no golden file {path}: regenerate with UPDATE_GOLDEN=1"
    assert json.loads(out) == json.loads(path.read_text()), (
        f"tools/plan.py {' '.join(argv)} changed; if intended, regenerate the golden files "
        "with UPDATE_GOLDEN=1 python -m pytest -q tests/test_plan.py -k golden"
    )


# ------------------------------------------------------------------ the trainer's estimate --


@pytest.mark.parametrize("settings", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
def test_trainer_footprint_equals_the_plan(tmp_path, capsys, settings):
    """The trainer's start-up estimate (parameters counted on the model it built) is the plan's
    memory per GPU for the same one-GPU layout, field for field."""
    from dataclasses import asdict

    from tst_megatron.planning import footprint

    config = write_config(tmp_path, settings)
    code, report = plan_json(capsys, config, "--gpus-per-node", "1")
    assert code == 0, report["errors"]
    run = settings_from_flags(["--yaml-config", config], 1, Environment.gpu("b200"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        here = settings_from_flags(["--yaml-config", config], 1)  # the model this host builds
        model_config = config_of(here)
        model_config.perform_initialization = False
        with single_process_parallel_state():
            model = model_of(here, model_config)
            estimate = footprint.run_footprint(
                plan.memory_settings(run), run.schedule, [model],
                report["layout"]["num_microbatches"],
            )  # fmt: skip
    assert [asdict(m) for m in estimate.in_flight] == report["memory_stages"]
    assert estimate.phases == (1, 2)
    (line,) = footprint.estimate_lines(estimate)
    peak = report["memory_per_gpu_bytes"] / 2**20
    assert f"peak: phase 1 {peak:.2f} MB" in line
    measured = footprint.measured_line(estimate, [123 * 2**20], 2, 1)
    assert measured.endswith(f"stage 0 123.00 MB (estimate {peak:.2f} MB)")


def test_data_budget_is_reported_with_the_repeat_warning(tmp_path, capsys):
    """``--data-path``: the trainer's budget lines (16 x 10 steps: 3 phase-1 steps of
    3*(32+1)-token samples, 7 phase-2 steps of 33), and the warning only when TST repeats."""
    from tst_megatron.data.budget import TST_REPEATS_WARNING
    from tst_megatron.testing.datasets import write_documents

    prefix = write_documents(tmp_path / "docs", [[1] * 100] * 40)  # 4,000 tokens
    config = write_config(tmp_path, TINY_DENSE)
    code, report = plan_json(capsys, config, "--data-path", prefix, "--split", "100,0,0")
    assert code == 0
    [row] = report["data_budget"]["datasets"]
    assert row["tokens"] == 4000
    assert row["read_tokens"] == [3 * 16 * 98 + 1, 7 * 16 * 32 + 1]  # 4,705 + 3,585 > 4,000
    assert report["data_budget"]["lines"][-1] == TST_REPEATS_WARNING
    code, text = run_plan(capsys, "--config", config, "--data-path", prefix, "--split", "100,0,0",
                          "--global-batch-size", "2")  # fmt: skip
    assert "data budget: dataset " in text and TST_REPEATS_WARNING not in text
