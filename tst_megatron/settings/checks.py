"""Small checks the sections share: each raises `SettingsError` naming the flag and value."""

from __future__ import annotations

from collections.abc import Iterable


class SettingsError(ValueError):
    """A section's fields are out of range or inconsistent (the message names the flags)."""


def check_positive(flag: str, value: int | float | None) -> None:
    """``value`` is None (not given) or >= 1."""
    if value is not None and value < 1:
        raise SettingsError(f"{flag} must be >= 1, got {value}")


def check_non_negative(flag: str, value: int | float | None) -> None:
    """``value`` is None (not given) or >= 0."""
    if value is not None and value < 0:
        raise SettingsError(f"{flag} must be >= 0, got {value}")


def check_choice(flag: str, value: object, allowed: Iterable[object]) -> None:
    """``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        listed = ", ".join(str(choice) for choice in allowed)
        raise SettingsError(f"{flag} must be one of {listed}; got {value!r}")
