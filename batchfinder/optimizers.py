"""Turning the ``optimizer`` argument into the optimizer a trial steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["OptimizerSpec", "OptimizerLike", "resolve_optimizer"]

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
