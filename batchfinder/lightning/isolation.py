"""What must stay untouched while a Lightning run's batch size is searched.

Two pieces, both built on the snapshot mechanism of :mod:`batchfinder.training.state`:

* :func:`trial_state`: the Lightning state a trial can change besides the model and its optimizers' state (the
  learning-rate schedulers, the gradient scaler, the optimizers' own attributes, torchmetrics states, the modules'
  Python attributes such as lists of step outputs). The trial session captures it with the model and restores it
  after every trial and at the end, so that every trial starts from the same state (a gradient scaler whose
  ``unscale_`` ran in a trial that ran out of memory does not refuse the next one).
* :func:`isolated`: the trials' surroundings. No callback is called and nothing is logged (``self.log`` is silenced,
  loggers are replaced by a dummy), ``manual_backward`` goes through the precision plugin without the strategy's DDP
  preparation, and whatever the dataloader hooks change while the search builds its loaders (RNG states, module
  attributes) is put back on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..training.state import (
    AttributeSnapshot,
    RngState,
    Snapshot,
    SnapshotFactory,
    StateDictSnapshot,
)
from .framework import DummyLogger, pl
from .steps import LightningSteps

__all__ = ["trial_state", "isolated"]

_METRIC_FIELDS = ("_update_count", "_computed", "_forward_cache", "_is_synced", "_cache", "_should_unsync")
_MODULE_INTERNALS = ("_parameters", "_buffers", "_modules")
_OPTIMIZER_STATE = ("state", "param_groups", "defaults")
_MISSING = object()


def _is_metric(module: nn.Module) -> bool:
    return isinstance(getattr(module, "_defaults", None), dict) and hasattr(module, "_update_count")


def _module_attributes(module: nn.Module) -> list[Snapshot]:
    return [AttributeSnapshot(m, exclude=_MODULE_INTERNALS) for m in module.modules()]


def trial_state(trainer: pl.Trainer, module: pl.LightningModule) -> list[SnapshotFactory]:
    """Factories capturing the Lightning state a trial may change outside the model and optimizers' state."""
    # The modules' attributes first: a metric's state tensors are then restored as copies on top of them.
    factories: list[SnapshotFactory] = [lambda: _Group(_module_attributes(module))]
    for config in trainer.lr_scheduler_configs:
        factories.append(lambda scheduler=config.scheduler: StateDictSnapshot(scheduler))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        factories.append(lambda: AttributeSnapshot(scaler, deep=True))
    for optimizer in trainer.optimizers:
        factories.append(lambda optimizer=optimizer: AttributeSnapshot(optimizer, exclude=_OPTIMIZER_STATE))
    for metric in (m for m in module.modules() if _is_metric(m)):
        fields = {*metric._defaults, *_METRIC_FIELDS}
        factories.append(lambda metric=metric, fields=fields: AttributeSnapshot(metric, only=fields, deep=True))
    return factories


class _Group:
    """Several snapshots restored together."""

    def __init__(self, snapshots: list[Snapshot]) -> None:
        self.snapshots = snapshots

    def restore(self) -> None:
        for snapshot in self.snapshots:
            snapshot.restore()


@contextlib.contextmanager
def _attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set an instance attribute for the length of the block; the previous one (or none) comes back."""
    previous = owner.__dict__.get(name, _MISSING)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if previous is _MISSING:
            owner.__dict__.pop(name, None)
        else:
            owner.__dict__[name] = previous


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def isolated(trainer: pl.Trainer, module: pl.LightningModule, steps: LightningSteps) -> Iterator[None]:
    """Run the block (building the search's loaders, then the search) with no callback, logging or DDP backward
    preparation, and put back what the dataloader hooks changed (RNG states, module attributes) on exit."""
    before = _Group([RngState.capture(), *_module_attributes(module)])
    callbacks = trainer.callbacks
    loggers = trainer.loggers
    try:
        trainer.callbacks = []
        if loggers:
            trainer.loggers = [DummyLogger()]
        with contextlib.ExitStack() as stack:
            stack.enter_context(_attribute(module, "log", _silent))
            stack.enter_context(_attribute(module, "log_dict", _silent))
            stack.enter_context(
                _attribute(module, "manual_backward", lambda loss, *a, **k: steps.backward(loss, None, *a, **k))
            )
            yield
    finally:
        trainer.callbacks = callbacks
        trainer.loggers = loggers
        before.restore()
