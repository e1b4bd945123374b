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


def test_batch_fold_shapes():
    """batch: L/s latent positions per sample, s times the samples, same data per step."""
    seq, batch = PhaseSpec(4, "full"), PhaseSpec(4, "full", fold="batch")
    assert (batch.latent_length(32), batch.fold_factor, batch.micro_batch_rows(2)) == (8, 4, 8)
    assert batch.window_length(32) == 4 * (8 + 1)
    assert batch.data_tokens_per_sample(32) == 4 * (4 * 9 - 1)
    # data tokens per step agree with the sequence fold up to the s-1 shared target tokens
    assert seq.data_tokens_per_sample(32) == 4 * 33 - 1
    with pytest.raises(TSTConfigError, match="mode 'output-only' reads one token per position"):
        PhaseSpec(4, "output-only", fold="batch")  # no input bags to fold
    assert PhaseSpec(1, "output-only", fold="batch").fold_factor == 1
    assert STANDARD_PHASE.fold_factor == 1 and STANDARD_PHASE.latent_length(33) == 33
    with pytest.raises(TSTConfigError, match="--seq-length 30 into samples of L/s latent"):
        batch.latent_length(30)


def test_bag_weighting_config():
    cfg = TSTConfig(bag_size=3, phase1_iters=2, bag_weighting="power-law", fold="batch")
    assert cfg.phase_spec(1) == PhaseSpec(3, "full", "batch", (1.0, 0.5, 1 / 3))
    assert cfg.phase_spec(2) == STANDARD_PHASE
    assert cfg.resume_settings() == {
        "fold": "batch", "bag_weighting": "power-law", "bag_weights": None
    }
    explicit = TSTConfig(bag_size=2, phase1_iters=2, bag_weights=(3.0, 1.0))
    assert explicit.phase_spec(1).target_weights == (3.0, 1.0)
    assert TSTConfig(bag_size=4, phase1_iters=1).phase_spec(1).target_weights is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fold": "tokens"}, "TST fold must be one of sequence, batch; got 'tokens'"),
        ({"bag_weighting": "log"}, "bag weighting must be one of uniform, power-law"),
        ({"bag_weights": (1.0, 2.0)}, "--tst-bag-weights gives 2 weights; --tst-bag-size 4 needs"),
        ({"bag_weights": (1.0, -1.0, 0.0, 0.0)}, "must be finite, >= 0 and not all 0"),
        ({"bag_weights": (0.0,) * 4}, "must be finite, >= 0 and not all 0"),
        (
            {"bag_weights": (1.0,) * 4, "bag_weighting": "power-law"},
            "give either --tst-bag-weights or --tst-bag-weighting (got --tst-bag-weighting "
            "power-law), not both",
        ),
        ({"bag_weighting": "first-token", "mode": "input-only"}, "input-only has one target"),
        ({"fold": "batch", "mode": "output-only"}, "use fold 'sequence'"),
    ],
)
def test_rejects_bad_weighting_and_fold(kwargs, message):
    with pytest.raises(TSTConfigError) as err:
        TSTConfig(bag_size=4, phase1_iters=1, **kwargs)
    assert message in str(err.value)
