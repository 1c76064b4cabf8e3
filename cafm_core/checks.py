"""Input validation shared by the library: fail early, name the value and what was expected."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class CAFMInputError(ValueError):
    """A value given to cafm_core is not what the function expects."""


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | Iterable[int] | None = None,
    shape: tuple[int | None, ...] | None = None,
    floating: bool | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Check a tensor argument and return it.

    ``shape`` entries that are ``None`` are not checked. ``floating=True`` requires a
    floating dtype, ``False`` an integer dtype. ``finite`` rejects NaN and inf.
    """
    if not isinstance(value, torch.Tensor):
        raise CAFMInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            raise CAFMInputError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {tuple(value.shape)}"
            )
    if shape is not None:
        if value.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(value.shape, shape)
        ):
            expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise CAFMInputError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if floating is True and not value.is_floating_point():
        raise CAFMInputError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise CAFMInputError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if finite and value.is_floating_point() and not _all_finite(value):
        bad = int((~torch.isfinite(value)).sum())
        raise CAFMInputError(f"{name} contains {bad} NaN/inf values; expected finite values")
    return value


_FINITE_CHUNK = 1 << 22  # elements checked at a time: torch.isfinite makes temporaries the size of its input


def _all_finite(value: torch.Tensor) -> bool:
    """``torch.isfinite(value).all()`` a chunk at a time, so that checking a large tensor (a
    50,000-image real reference: 600 MB-2.5 GB) does not double its memory for a moment."""
    flat = value.reshape(-1)  # a view of a contiguous tensor
    return all(bool(torch.isfinite(flat[start : start + _FINITE_CHUNK]).all())
               for start in range(0, flat.numel(), _FINITE_CHUNK))


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    options = sorted(choices)
    if value not in options:
        raise CAFMInputError(f"unknown {name} {value!r}; expected one of {options}")
    return value


def check_positive(name: str, value: float, *, integer: bool = False) -> float:
    """Check that ``value`` is a positive number (an int if ``integer``)."""
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise CAFMInputError(f"{name} must be a positive integer, got {value!r}")
    if not value > 0:
        raise CAFMInputError(f"{name} must be > 0, got {value!r}")
    return value
