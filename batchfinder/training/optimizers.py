"""Turning the ``optimizer`` argument into the optimizer a trial steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .host import host_side_loading

__all__ = ["OptimizerSpec", "OptimizerLike", "resolve_optimizer", "lacks_state", "state_tensors"]

OptimizerLike = type[torch.optim.Optimizer] | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | torch.optim.Optimizer | None


@dataclass(frozen=True)
class OptimizerSpec:
    """How to get the optimizer for a trial: a fresh one per trial, or the user's own instance (``bound``)."""

    factory: Callable[[], torch.optim.Optimizer]
    bound: torch.optim.Optimizer | None
    label: str

    def create(self) -> torch.optim.Optimizer:
        """The optimizer for one trial (the bound instance, or a new one over the trainable parameters)."""
        optimizer = self.factory()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer factory {self.label} returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
            )
        return optimizer


def state_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The tensors an optimizer's state holds (Adam's moments, a momentum buffer, ...); none for None."""
    if optimizer is None:
        return []
    return [t for entry in optimizer.state.values() for t in entry.values() if isinstance(t, torch.Tensor)]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def resolve_optimizer(optimizer: OptimizerLike | Any, model: nn.Module) -> OptimizerSpec:
    """Accept an optimizer class, a callable ``params -> optimizer``, an optimizer bound to ``model``, or None (Adam)."""
    if not _trainable(model):
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    if optimizer is None:
        return OptimizerSpec(lambda: torch.optim.Adam(_trainable(model)), None, "Adam")
    if isinstance(optimizer, torch.optim.Optimizer):
        model_params = {id(p) for p in model.parameters()}
        foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in model_params]
        if foreign:
            raise ValueError(
                f"the optimizer instance holds {len(foreign)} parameter(s) that are not the model's: create it "
                "over model.parameters() or pass the optimizer class (e.g. optimizer=torch.optim.Adam)"
            )
        return OptimizerSpec(lambda: optimizer, optimizer, type(optimizer).__name__)
    if isinstance(optimizer, type):
        if not issubclass(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer class {optimizer.__name__} is not a subclass of torch.optim.Optimizer")
        return OptimizerSpec(lambda: optimizer(_trainable(model)), None, optimizer.__name__)
    if callable(optimizer):
        name = getattr(optimizer, "__name__", type(optimizer).__name__)
        return OptimizerSpec(lambda: optimizer(_trainable(model)), None, name)
    raise TypeError(
        "optimizer must be an optimizer class (torch.optim.Adam), a callable params -> optimizer, or an optimizer "
        f"instance over the model's parameters, not {type(optimizer).__name__}"
    )


def lacks_state(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer`` holds no per-parameter state although a step of its kind creates some (Adam's
    moments, SGD's momentum buffers): its steps so far were all skipped, e.g. by a gradient scaler that found inf
    gradients, so the memory of its state has not been measured yet."""
    if optimizer.state:
        return False
    try:
        key = (type(optimizer), tuple(sorted((name, repr(value)) for name, value in optimizer.defaults.items())))
    except Exception:  # noqa: BLE001 - unusual hyperparameters: assume nothing is missing
        return False
    if key not in _KEEPS_STATE:
        _KEEPS_STATE[key] = _twin_keeps_state(optimizer)
    return _KEEPS_STATE[key]


_KEEPS_STATE: dict[tuple[type, tuple[tuple[str, str], ...]], bool] = {}
"""Whether a step creates state, by optimizer type and hyperparameters (a fact of the optimizer's code)."""


def _twin_keeps_state(optimizer: torch.optim.Optimizer) -> bool:
    """Step a twin of ``optimizer`` over a one-element parameter, on the host, and see whether it keeps state."""
    with host_side_loading():
        param = torch.zeros(1, requires_grad=True)
        param.grad = torch.ones(1)
        try:
            twin = type(optimizer)([param], **optimizer.defaults)
            twin.step()
        except Exception:  # noqa: BLE001 - an optimizer that cannot be twinned (a closure, odd arguments)
            return False
        return bool(twin.state.get(param))
