"""TSTConfig / PhaseSpec validation and the phase schedule."""

import pytest

from tst_megatron.config import STANDARD_PHASE, PhaseSpec, TSTConfig, TSTConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bag_size": 0}, "bag size must be an integer >= 1, got 0"),
        ({"bag_size": -3}, "bag size must be an integer >= 1, got -3"),
        ({"bag_size": 2.5}, "bag size must be an integer >= 1, got 2.5"),
        ({"mode": "both"}, "TST mode must be one of full, input-only, output-only; got 'both'"),
        ({"bag_size": 4}, "bag_size=4 turns TST on: also give the phase-1 length"),
        ({"bag_size": 4, "phase1_fraction": 1.0}, "open interval (0, 1), got 1.0"),
        ({"bag_size": 4, "phase1_fraction": 0.0}, "open interval (0, 1), got 0.0"),
        ({"bag_size": 4, "phase1_iters": -1}, "phase1_iters must be >= 0, got -1"),
        (
            {"bag_size": 4, "phase1_fraction": 0.3, "phase1_iters": 10},
            "not both (got phase1_fraction=0.3, phase1_iters=10)",
        ),
    ],
)
def test_rejects_bad_config(kwargs, message):
    with pytest.raises(TSTConfigError) as err:
        TSTConfig(**kwargs)
    assert message in str(err.value)


def test_phase_schedule_fraction():
    cfg = TSTConfig(bag_size=6, phase1_fraction=0.3)
    assert cfg.phase1_iterations(100) == 30
    assert [cfg.phase_at(i, 100) for i in (0, 29, 30, 99)] == [1, 1, 2, 2]
    assert cfg.phase_spec(1) == PhaseSpec(6, "full")
    assert cfg.phase_spec(2) == STANDARD_PHASE


def test_phase_schedule_iters_and_errors():
    cfg = TSTConfig(bag_size=4, mode="output-only", phase1_iters=7)
    assert cfg.phase1_iterations(20) == 7
    with pytest.raises(TSTConfigError, match="phase1_iters=7 exceeds train_iters=5"):
        cfg.phase1_iterations(5)
    with pytest.raises(TSTConfigError, match="phase must be 1 or 2, got 3"):
        cfg.phase_spec(3)


def test_bag_size_one_is_standard_everywhere():
    cfg = TSTConfig(bag_size=1)
    assert not cfg.enabled
    assert cfg.phase1_iterations(100) == 0
    assert cfg.phase_spec(1) == STANDARD_PHASE
    for mode in ("full", "input-only", "output-only"):
        assert PhaseSpec(1, mode).is_standard


@pytest.mark.parametrize(
    ("mode", "window", "inputs", "targets"),
    [("full", 4 * 9, 4, 4), ("input-only", 4 * 9, 4, 1), ("output-only", 8 + 4, 1, 4)],
)
def test_phase_spec_shapes(mode, window, inputs, targets):
    spec = PhaseSpec(4, mode)
    assert spec.window_length(8) == window
    assert spec.data_tokens_per_sample(8) == window - 1
    assert spec.input_bag_size == inputs
    assert spec.target_width == targets
    assert STANDARD_PHASE.window_length(8) == 9
