"""The planner's activation memory and step time follow the trainer's recompute settings.

One GPU, PP=1, one micro-batch in flight, so a stage keeps ``sum(per-layer bytes)`` without
recomputation and the full-recompute forms are simple in the layer input ``I = 2 L b h``:
uniform 1 = ``4 I + max``, uniform 2 = ``2 I + 2 max``, block 1 = ``I + max(3 mean, max)``
(the three other layers are freed before the first is recomputed).
"""

from __future__ import annotations

import pytest

from tests.test_plan import TINY_MOE, plan, plan_json, write_config
from tst_megatron.planning.layout import PlanRequest

TOKENS, HIDDEN = 32 * 2, 64
FULL = {
    "full_uniform_1": ("uniform", 1),
    "full_uniform_2": ("uniform", 2),
    "full_block_1": ("block", 1),
}


def stage(report: dict) -> dict:
    (only,) = report["memory_stages"]
    return only


def one_gpu(config: str, **request) -> dict:
    return plan.plan(
        PlanRequest(config, gpus_per_node=1, micro_batch_size=2, global_batch_size=2, **request)
    )


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan_recompute")
    out = {"off": one_gpu(write_config(tmp, TINY_MOE))}
    out["flag_recompute"] = one_gpu(write_config(tmp, TINY_MOE), recompute=True)
    for modules in ("core_attn", "moe", "mlp", "shared_experts"):
        out[modules] = one_gpu(write_config(tmp, TINY_MOE), recompute_modules=(modules,))
    for name, (method, layers) in FULL.items():  # the config's own recompute keys
        keys = {"recompute-granularity": "full", "recompute-method": method,
                "recompute-num-layers": layers}  # fmt: skip
        (tmp / name).mkdir()
        out[name] = one_gpu(write_config(tmp / name, TINY_MOE, **keys))
    return out


def test_full_recompute_methods(reports):
    layer_input = 2 * TOKENS * HIDDEN
    plain = stage(reports["off"])["activations_bytes"]  # sum over the 4 layers
    uniform1 = stage(reports["full_uniform_1"])["activations_recompute_bytes"]
    largest = uniform1 - 4 * layer_input
    assert stage(reports["full_uniform_2"])["activations_recompute_bytes"] == pytest.approx(
        2 * layer_input + 2 * largest, abs=2
    )
    assert stage(reports["full_block_1"])["activations_recompute_bytes"] == pytest.approx(
        layer_input + max(3 * plain / 4, largest), abs=2
    )
    assert reports["flag_recompute"]["memory_stages"] == reports["full_uniform_1"]["memory_stages"]
    off_total = reports["off"]["memory_per_gpu_bytes"]
    for name in FULL:
        got = stage(reports[name])
        kept = got["total_phase2_bytes"] - (stage(reports["off"])["total_phase2_bytes"] - plain)
        assert kept == got["activations_recompute_bytes"], name  # the total uses its setting
        assert reports[name]["memory_per_gpu_bytes"] < off_total, name


def test_recompute_setting_is_reported_and_costs_time(reports):
    assert reports["off"]["layout"]["recompute"] == "off"
    assert reports["full_block_1"]["layout"]["recompute"] == "full (block, 1 layer)"
    assert reports["full_uniform_2"]["layout"]["recompute"] == "full (uniform, 2 layers)"
    assert reports["moe"]["layout"]["recompute"] == "selective (moe)"
    step = reports["off"]["step_time_s"]
    assert reports["full_uniform_1"]["step_time_s"] == pytest.approx(step * 4 / 3)
    assert reports["full_block_1"]["step_time_s"] == pytest.approx(step * (1 + 1 / 4 / 3))


@pytest.mark.parametrize(
    ("modules", "saved_per_token"),
    [
        ("core_attn", 0),  # flash attention keeps no scores to drop
        ("moe", 2 * (2 * 2 * 64 + 6 * (2 * 32 + 48))),  # 2 MoE layers: routed + shared
        ("mlp", 2 * 6 * 96),  # the 2 dense layers' SwiGLU
        ("shared_experts", 2 * 6 * 48),
    ],
)
def test_selective_recompute_drops_what_it_rebuilds(reports, modules, saved_per_token):
    plain = stage(reports["off"])["activations_bytes"]
    assert stage(reports[modules])["activations_bytes"] == pytest.approx(
        plain - TOKENS * saved_per_token, abs=2
    )


def test_planner_cli_takes_recompute_modules(tmp_path, capsys):
    config = write_config(tmp_path, TINY_MOE)
    code, report = plan_json(capsys, config, "--gpus-per-node", "1", "--recompute-modules", "moe")
    assert code == 0 and report["layout"]["recompute"] == "selective (moe)"
