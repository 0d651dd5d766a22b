"""Argument checks shared by every front end: each raises a ValueError/TypeError naming the argument."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["MIN_STEPS_PER_TRIAL", "check_positive_int", "check_model", "check_steps_per_trial"]

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


def check_steps_per_trial(value: Any) -> None:
    """Raise unless ``value`` is a whole number of at least :data:`MIN_STEPS_PER_TRIAL`."""
    check_positive_int("steps_per_trial", value)
    if value < MIN_STEPS_PER_TRIAL:
        raise ValueError(
            f"steps_per_trial={value} must be at least {MIN_STEPS_PER_TRIAL}: optimizers such as Adam "
            "allocate their state at the first step, so one step under-measures memory"
        )


def check_model(model: Any) -> None:
    """Raise unless ``model`` is an ``nn.Module`` whose parameters are all initialised."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    from torch.nn.parameter import UninitializedParameter

    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        raise ValueError("the model has uninitialised (lazy) parameters: run one forward pass before the search")
