"""Sample layout per mode, checked against the definitions in TST_SPEC.md."""

import pytest
import torch

from tst_megatron.config import STANDARD_PHASE, PhaseSpec, TSTConfigError
from tst_megatron.targets import build_batch

S, L = 3, 4


def _windows(spec: PhaseSpec, batch: int = 2) -> torch.Tensor:
    n = spec.window_length(L)
    return torch.arange(batch * n).view(batch, n) + 100


def test_full_mode_next_bag():
    spec = PhaseSpec(S, "full")
    w = _windows(spec)
    out = build_batch(w, spec, L)
    assert out.tokens.shape == (2, S * L)
    assert torch.equal(out.tokens, w[:, : S * L])
    for i in range(L):
        assert torch.equal(out.labels[:, i], w[:, (i + 1) * S : (i + 2) * S])
    assert torch.equal(out.position_ids[0], torch.arange(L))
    assert out.loss_mask.shape == (2, L, S)


def test_input_only_first_token_of_next_bag():
    spec = PhaseSpec(S, "input-only")
    w = _windows(spec)
    out = build_batch(w, spec, L)
    assert out.labels.shape == (2, L, 1)
    for i in range(L):
        assert torch.equal(out.labels[:, i, 0], w[:, (i + 1) * S])


def test_output_only_next_s_tokens():
    spec = PhaseSpec(S, "output-only")
    w = _windows(spec)
    out = build_batch(w, spec, L)
    assert torch.equal(out.tokens, w[:, :L])
    for t in range(L):
        assert torch.equal(out.labels[:, t], w[:, t + 1 : t + 1 + S])


def test_standard_and_mask():
    w = _windows(STANDARD_PHASE)
    mask = torch.ones_like(w, dtype=torch.float)
    mask[0, 2] = 0
    out = build_batch(w, STANDARD_PHASE, L, target_mask=mask)
    assert torch.equal(out.tokens, w[:, :L]) and torch.equal(out.labels, w[:, 1:])
    assert out.loss_mask[0, 1] == 0 and out.loss_mask.sum() == 2 * L - 1


def test_target_mask_follows_token():
    spec = PhaseSpec(S, "full")
    w = _windows(spec, batch=1)
    mask = torch.ones_like(w, dtype=torch.float)
    mask[0, S + 1] = 0  # second token of the first target bag
    out = build_batch(w, spec, L, target_mask=mask)
    assert out.loss_mask[0, 0].tolist() == [1, 0, 1]


def test_too_short_window_is_rejected():
    spec = PhaseSpec(S, "full")
    with pytest.raises(TSTConfigError) as err:
        build_batch(torch.zeros(2, S * L, dtype=torch.long), spec, L)
    assert "needs 15 tokens; got windows of shape (2, 12)" in str(err.value)


def test_batch_fold_sample_layout():
    """The batch fold: each sample has L/s latent positions; same layout rule as sequence."""
    spec = PhaseSpec(2, "full", fold="batch")
    w = _windows(spec, batch=4)  # L = 4 -> 2 latent positions, windows of 2 * 3 tokens
    out = build_batch(w, spec, L)
    assert out.tokens.shape == (4, 4) and out.labels.shape == (4, 2, 2)
    assert torch.equal(out.labels[:, 1], w[:, 4:6])
    assert torch.equal(out.position_ids[0], torch.arange(2))
