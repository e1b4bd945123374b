"""TST configuration: the bag size, the variant, and the two-phase schedule.

`TSTConfig` is what a user sets (``--tst-*`` flags). `PhaseSpec` is what one phase feeds the
model: phase 1 uses the user's bag size and mode, phase 2 (and a baseline run) is
`STANDARD_PHASE`, plain next-token prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

TSTMode = Literal["full", "input-only", "output-only"]
TST_MODES: tuple[str, ...] = get_args(TSTMode)


class TSTConfigError(ValueError):
    """A TST setting is out of range or inconsistent with the model/parallel layout."""


def _check_bag_size(bag_size: int) -> None:
    if isinstance(bag_size, bool) or not isinstance(bag_size, int) or bag_size < 1:
        raise TSTConfigError(f"bag size must be an integer >= 1, got {bag_size!r}")


def _check_mode(mode: str) -> None:
    if mode not in TST_MODES:
        raise TSTConfigError(f"TST mode must be one of {', '.join(TST_MODES)}; got {mode!r}")


@dataclass(frozen=True)
class PhaseSpec:
    """How one training phase lays out a sample.

    ``bag_size`` s and ``mode`` decide the sample shapes for a context of L latent positions:

    | mode          | model input         | targets            | data tokens per sample |
    |---------------|---------------------|--------------------|------------------------|
    | full          | ``[b, s*L]`` (bags) | ``[b, L, s]`` MCE  | ``s*(L+1)``            |
    | input-only    | ``[b, s*L]`` (bags) | ``[b, L, 1]`` CE   | ``s*(L+1)``            |
    | output-only   | ``[b, L]``          | ``[b, L, s]`` MCE  | ``L+s``                |
    | s = 1 (any)   | ``[b, L]``          | ``[b, L]`` CE      | ``L+1``                |
    """

    bag_size: int = 1
    mode: TSTMode = "full"

    def __post_init__(self) -> None:
        _check_bag_size(self.bag_size)
        _check_mode(self.mode)

    @property
    def is_standard(self) -> bool:
        """True for plain next-token training (s = 1 reduces every mode to it)."""
        return self.bag_size == 1

    @property
    def input_bag_size(self) -> int:
        """Tokens averaged into one latent position (1 = ordinary token inputs)."""
        return self.bag_size if self.mode in ("full", "input-only") else 1

    @property
    def target_width(self) -> int:
        """Targets per latent position (1 = ordinary next-token CE)."""
        return self.bag_size if self.mode in ("full", "output-only") else 1

    def window_length(self, seq_length: int) -> int:
        """Data tokens one sample of ``seq_length`` latent positions reads."""
        s = self.bag_size
        if self.mode == "output-only":
            return seq_length + s
        return s * (seq_length + 1)

    def data_tokens_per_sample(self, seq_length: int) -> int:
        """Data tokens a sample advances the stream by.

        Consecutive windows share one token (the last target of a window is the first input
        of the next), exactly as Megatron's `GPTDataset` lays out ``L+1``-token samples.
        """
        return self.window_length(seq_length) - 1


STANDARD_PHASE = PhaseSpec(bag_size=1, mode="full")


@dataclass(frozen=True)
class TSTConfig:
    """The user's TST settings.

    Exactly one of ``phase1_fraction`` (r in (0, 1)) or ``phase1_iters`` sets where phase 1
    ends; with ``bag_size == 1`` TST is off and every step is standard training.
    """

    bag_size: int = 1
    mode: TSTMode = "full"
    phase1_fraction: float | None = None
    phase1_iters: int | None = None

    def __post_init__(self) -> None:
        _check_bag_size(self.bag_size)
        _check_mode(self.mode)
        if self.phase1_fraction is not None and self.phase1_iters is not None:
            raise TSTConfigError(
                "give either the phase-1 fraction or the phase-1 iterations, not both "
                f"(got phase1_fraction={self.phase1_fraction}, phase1_iters={self.phase1_iters})"
            )
        if self.phase1_fraction is not None and not 0.0 < self.phase1_fraction < 1.0:
            raise TSTConfigError(
                f"phase1_fraction must be in the open interval (0, 1), got {self.phase1_fraction}"
            )
        if self.phase1_iters is not None and self.phase1_iters < 0:
            raise TSTConfigError(f"phase1_iters must be >= 0, got {self.phase1_iters}")
        if self.enabled and self.phase1_fraction is None and self.phase1_iters is None:
            raise TSTConfigError(
                f"bag_size={self.bag_size} turns TST on: also give the phase-1 length "
                "(phase1_fraction r in (0, 1), e.g. 0.3, or phase1_iters)"
            )

    @property
    def enabled(self) -> bool:
        """TST changes training only when bags hold more than one token."""
        return self.bag_size > 1

    def phase1_iterations(self, train_iters: int) -> int:
        """Number of phase-1 optimizer steps in a run of ``train_iters`` steps."""
        if not self.enabled:
            return 0
        if self.phase1_iters is not None:
            if self.phase1_iters > train_iters:
                raise TSTConfigError(
                    f"phase1_iters={self.phase1_iters} exceeds train_iters={train_iters}"
                )
            return self.phase1_iters
        return math.floor(self.phase1_fraction * train_iters)

    def phase_at(self, iteration: int, train_iters: int) -> int:
        """Phase (1 or 2) of the step that starts after ``iteration`` completed steps."""
        return 1 if iteration < self.phase1_iterations(train_iters) else 2

    def phase_spec(self, phase: int) -> PhaseSpec:
        """Sample layout of ``phase`` (1 = superposition, 2 = recovery/standard)."""
        if phase not in (1, 2):
            raise TSTConfigError(f"phase must be 1 or 2, got {phase}")
        if phase == 2 or not self.enabled:
            return STANDARD_PHASE
        return PhaseSpec(bag_size=self.bag_size, mode=self.mode)
