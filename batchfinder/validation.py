"""Argument checks shared by every front end: each raises a ValueError/TypeError naming the argument.

Pure Python where it can be (torch is imported only by the checks of a model), so that the pure modules
(:mod:`batchfinder.accumulation`) can use the same checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MIN_STEPS_PER_TRIAL",
    "check_positive_int",
    "check_safety",
    "check_time_budget",
    "check_model",
    "check_materialised",
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


def check_model(model: Any) -> None:
    """Raise unless ``model`` is an ``nn.Module`` whose parameters are all initialised."""
    from torch import nn
    from torch.nn.parameter import UninitializedParameter

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")

    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        raise ValueError("the model has uninitialised (lazy) parameters: run one forward pass before the search")


def check_materialised(model: "nn.Module") -> None:
    """Raise unless every parameter and buffer holds real data: a search runs real steps, and a model built on the
    ``meta`` device (e.g. under ``torch.device("meta")`` or with ``init_empty_weights``) has shapes but no values."""
    meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if meta:
        shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"the model is on the meta device ({shown} hold no data), so it cannot run real training steps: "
            "materialise it first, e.g. model.to_empty(device='cpu') (or 'cuda') followed by your weight "
            "initialisation or load_state_dict, or predict without running it with batchfinder.estimate_memory / "
            "batchfinder.predict_max_batch_size, which accept meta models"
        )
