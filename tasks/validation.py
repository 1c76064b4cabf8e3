"""Checks of plain settings at a stage's edge: fail before compute, naming the value."""

from __future__ import annotations

from typing import Any

from cafm_core.checks import CAFMInputError


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else a ``CAFMInputError``
    (a ValueError) naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CAFMInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
