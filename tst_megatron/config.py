"""TST configuration: the bag size, the variant, the fold, the bag-loss weighting and the
two-phase schedule.

`TSTConfig` is what a user sets (``--tst-*`` flags). `PhaseSpec` is what one phase feeds the
model: phase 1 uses the user's bag size, mode, fold and weighting; phase 2 (and a baseline
run) is `STANDARD_PHASE`, plain next-token prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

TSTMode = Literal["full", "input-only", "output-only"]
TST_MODES: tuple[str, ...] = get_args(TSTMode)
TSTFold = Literal["sequence", "batch"]
TST_FOLDS: tuple[str, ...] = get_args(TSTFold)
BagWeighting = Literal["uniform", "power-law", "exponential", "first-token"]
BAG_WEIGHTINGS: tuple[str, ...] = get_args(BagWeighting)


class TSTConfigError(ValueError):
    """A TST setting is out of range or inconsistent with the model/parallel layout."""


def _check_bag_size(bag_size: int) -> None:
    if isinstance(bag_size, bool) or not isinstance(bag_size, int) or bag_size < 1:
        raise TSTConfigError(f"bag size must be an integer >= 1, got {bag_size!r}")


def _check_mode(mode: str) -> None:
    if mode not in TST_MODES:
        raise TSTConfigError(f"TST mode must be one of {', '.join(TST_MODES)}; got {mode!r}")


def _check_fold(fold: str) -> None:
    if fold not in TST_FOLDS:
        raise TSTConfigError(f"TST fold must be one of {', '.join(TST_FOLDS)}; got {fold!r}")


def _check_fold_mode(fold: str, mode: str, bag_size: int) -> None:
    if fold == "batch" and mode == "output-only" and bag_size > 1:
        raise TSTConfigError(
            "the batch fold splits the s-token bags of a sample's input over s samples; mode "
            "'output-only' reads one token per position (no bags): use fold 'sequence'"
        )


def _check_bag_weighting(
    bag_size: int, mode: str, weighting: str, explicit: tuple[float, ...] | None
) -> None:
    """The bag-loss weighting checks (``--tst-bag-weighting`` / ``--tst-bag-weights``), the
    one copy: `TSTConfig` runs them (``validate_args`` reports them as it builds the TST section).

    Raises:
        TSTConfigError: an unknown weighting; a weighting or weights without TST
            (``bag_size`` 1), both at once, with mode ``input-only`` (one target per
            position), or explicit weights that are not ``bag_size`` finite non-negative
            numbers with a positive sum.
    """
    if weighting not in BAG_WEIGHTINGS:
        raise TSTConfigError(
            f"bag weighting must be one of {', '.join(BAG_WEIGHTINGS)}; got {weighting!r}"
        )
    given = [
        flag
        for flag, on in (
            (f"--tst-bag-weighting {weighting}", weighting != "uniform"),
            ("--tst-bag-weights", explicit is not None),
        )
        if on
    ]
    if not given:
        return
    if bag_size == 1:
        raise TSTConfigError(f"{given[0]} needs TST on (--tst-bag-size > 1); got --tst-bag-size 1")
    if len(given) == 2:
        raise TSTConfigError(
            f"give either --tst-bag-weights or --tst-bag-weighting (got {given[0]}), not both"
        )
    if mode == "input-only":
        raise TSTConfigError(
            f"{given[0]} weights the multi-hot targets of --tst-mode full or output-only; "
            "--tst-mode input-only has one target per position"
        )
    if explicit is None:
        return
    if len(explicit) != bag_size:
        raise TSTConfigError(
            f"--tst-bag-weights gives {len(explicit)} weights; --tst-bag-size {bag_size} needs "
            f"{bag_size} (one per token of the next bag)"
        )
    values = [float(w) for w in explicit]
    if not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
        raise TSTConfigError(f"--tst-bag-weights must be finite, >= 0 and not all 0; got {values}")


def bag_weights(
    weighting: str, bag_size: int, explicit: tuple[float, ...] | None = None
) -> tuple[float, ...] | None:
    """The weight ``g(i)`` of the i-th token of a target bag, i = 1..s (None = uniform).

    ``uniform`` 1, ``power-law`` 1/i, ``exponential`` exp(-i), ``first-token`` delta(i = 1)
    (the report's Appendix D); ``explicit`` weights (``--tst-bag-weights``) take precedence.
    The loss normalises them over the unmasked targets of each position, so only their ratios
    matter. The settings are checked by `TSTConfig`.
    """
    if explicit is not None:
        return tuple(float(w) for w in explicit)
    positions = range(1, bag_size + 1)
    if weighting == "power-law":
        return tuple(1.0 / i for i in positions)
    if weighting == "exponential":
        return tuple(math.exp(-i) for i in positions)
    if weighting == "first-token":
        return tuple(1.0 if i == 1 else 0.0 for i in positions)
    return None


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

    ``fold`` decides where the s-fold data goes. ``sequence``: each of the ``b`` samples of
    a micro-batch has ``L`` latent positions (the table above). ``batch``: each sample has
    ``L/s`` latent positions and the micro-batch holds ``s*b`` of them, so a step has the
    same latent positions (GEMM FLOPs) and data tokens, and ``s`` times cheaper attention.
    ``target_weights`` are the bag-loss weights ``g(1..s)`` of the targets (None = uniform).
    """

    bag_size: int = 1
    mode: TSTMode = "full"
    fold: TSTFold = "sequence"
    target_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_bag_size(self.bag_size)
        _check_mode(self.mode)
        _check_fold(self.fold)
        _check_fold_mode(self.fold, self.mode, self.bag_size)
        if self.target_weights is not None and len(self.target_weights) != self.target_width:
            raise TSTConfigError(
                f"{len(self.target_weights)} target weights for {self.target_width} targets "
                f"per position (bag size {self.bag_size}, mode {self.mode!r})"
            )

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

    @property
    def fold_factor(self) -> int:
        """Model samples per configured sample: s with the batch fold, else 1."""
        return self.bag_size if self.fold == "batch" else 1

    def latent_length(self, seq_length: int) -> int:
        """Latent positions of one model sample for a context of ``seq_length`` (L or L/s)."""
        if seq_length % self.fold_factor:
            raise TSTConfigError(
                f"the batch fold splits --seq-length {seq_length} into samples of L/s latent "
                f"positions: it must be a multiple of the bag size {self.bag_size}"
            )
        return seq_length // self.fold_factor

    def micro_batch_rows(self, micro_batch_size: int) -> int:
        """Model samples in a micro-batch of ``micro_batch_size`` configured samples."""
        return micro_batch_size * self.fold_factor

    def window_length(self, seq_length: int) -> int:
        """Data tokens one model sample reads (its latent length from `latent_length`)."""
        s, latent = self.bag_size, self.latent_length(seq_length)
        if self.mode == "output-only":
            return latent + s
        return s * (latent + 1)

    def data_tokens_per_sample(self, seq_length: int) -> int:
        """Data tokens one configured sample (``fold_factor`` model samples) advances by.

        Consecutive windows share one token (the last target of a window is the first input
        of the next), exactly as Megatron's `GPTDataset` lays out ``L+1``-token samples.
        """
        return self.fold_factor * (self.window_length(seq_length) - 1)


STANDARD_PHASE = PhaseSpec(bag_size=1, mode="full")

RESUME_SETTINGS: dict[str, tuple[str, object]] = {
    "fold": ("--tst-fold", "sequence"),
    "bag_weighting": ("--tst-bag-weighting", "uniform"),
    "bag_weights": ("--tst-bag-weights", None),
}
"""Phase-1 settings (beyond bag size and mode) a phase-1 resume must keep: key of
`TSTConfig.resume_settings` -> (flag, the value a checkpoint without the key implies)."""


@dataclass(frozen=True)
class TSTConfig:
    """The user's TST settings.

    Exactly one of ``phase1_fraction`` (r in (0, 1)) or ``phase1_iters`` sets where phase 1
    ends; with ``bag_size == 1`` TST is off and every step is standard training.
    ``bag_weighting`` / ``bag_weights`` weight the targets of phase 1 (see `bag_weights`),
    ``fold`` lays out its samples (see `PhaseSpec`).
    """

    bag_size: int = 1
    mode: TSTMode = "full"
    phase1_fraction: float | None = None
    phase1_iters: int | None = None
    fold: TSTFold = "sequence"
    bag_weighting: BagWeighting = "uniform"
    bag_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_bag_size(self.bag_size)
        _check_mode(self.mode)
        _check_fold(self.fold)
        _check_fold_mode(self.fold, self.mode, self.bag_size)
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
        _check_bag_weighting(self.bag_size, self.mode, self.bag_weighting, self.bag_weights)

    @property
    def enabled(self) -> bool:
        """TST changes training only when bags hold more than one token."""
        return self.bag_size > 1

    @property
    def target_weights(self) -> tuple[float, ...] | None:
        """Phase-1 weights ``g(1..s)`` of the target bag (None = uniform)."""
        return bag_weights(self.bag_weighting, self.bag_size, self.bag_weights)

    def resume_settings(self) -> dict:
        """The `RESUME_SETTINGS` of this config, JSON-ready (saved in every checkpoint)."""
        weights = None if self.bag_weights is None else list(self.bag_weights)
        return {"fold": self.fold, "bag_weighting": self.bag_weighting, "bag_weights": weights}

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
        assert self.phase1_fraction is not None  # __post_init__: one of the two is set
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
        return PhaseSpec(
            bag_size=self.bag_size,
            mode=self.mode,
            fold=self.fold,
            target_weights=self.target_weights,
        )
