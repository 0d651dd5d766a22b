"""Numeric argument checks shared by every front end, in pure Python: each raises a ValueError/TypeError naming the
argument and what would be valid."""

from __future__ import annotations

from typing import Any

__all__ = [
    "MIN_STEPS_PER_TRIAL",
    "check_positive_int",
    "check_safety",
    "check_time_budget",
    "check_steps_per_trial",
]

MIN_STEPS_PER_TRIAL = 2
"""Optimizers such as Adam allocate their state at the first step, and the second step peaks higher."""


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is a whole number of at least 1 (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1")


def check_safety(value: Any) -> None:
    """Raise unless ``value`` is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"safety={value!r} must be a number in (0, 1], e.g. 0.8 to keep 20% headroom")


def check_time_budget(value: Any) -> None:
    """Raise unless ``value`` is None or a positive number of seconds."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"time_budget={value!r} must be a positive number of seconds (or None)")


def check_steps_per_trial(value: Any) -> None:
    """Raise unless ``value`` is a whole number of at least :data:`MIN_STEPS_PER_TRIAL`."""
    check_positive_int("steps_per_trial", value)
    if value < MIN_STEPS_PER_TRIAL:
        raise ValueError(
            f"steps_per_trial={value} must be at least {MIN_STEPS_PER_TRIAL}: optimizers such as Adam "
            "allocate their state at the first step, so one step under-measures memory"
        )
