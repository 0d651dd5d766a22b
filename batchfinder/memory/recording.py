"""The recorded trial: one real training trial with every allocation logged, which the guided mode replays at any
batch size (:class:`~batchfinder.memory.replay.AllocationLog`).

:func:`record_trial` runs the steps for real on the CPU, charged to a ledger of their own
(:class:`~batchfinder.memory.replay.RecordingLedger`; no device's accounting is touched): the first step at batch
size ``sizes[0]``, the later ones at ``sizes[1]``, so that each forward/backward allocation can be fitted as
``k*B + c``. The trial runner (:meth:`~batchfinder.engine.trial.TrialSession.record_allocations`) decides when a
recording can stand for its trials and restores the user's state afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..training.batching import plain_containers
from ..training.host import host_side_loading
from ..training.optimizers import OptimizerSpec, state_tensors
from ..training.precision import StepPrecision
from ..training.steps import StepFn, run_training_step
from .accounting import ChargingMode, tensor_storages
from .kernels import DEFAULT_CAPABILITY, KernelModels
from .replay import AllocationLog, RecordingLedger

__all__ = ["RECORDED_SIZES", "record_trial"]

RECORDED_SIZES = (2, 3)
"""The batch sizes of a recorded trial's first and later steps."""


def record_trial(
    model: nn.Module,
    step: StepFn,
    optimizer: OptimizerSpec,
    hosts: dict[int, Any],
    sizes: tuple[int, int] = RECORDED_SIZES,
    *,
    steps_per_trial: int,
    precision: StepPrecision,
    workspace_bytes: int = 0,
    extra_optimizers: Sequence[torch.optim.Optimizer] = (),
    reserved: Sequence[torch.Tensor] = (),
    kernels: str = "cuda",
    compute_capability: tuple[int, int] = DEFAULT_CAPABILITY,
    cudnn_workspace: str | int | None = None,
) -> AllocationLog:
    """Run one training trial of ``steps_per_trial`` (at least 2) steps on the host batches ``hosts`` (one per
    size in ``sizes``), every allocation logged, and fit the log.

    The ledger first charges what a trial session holds, in the order a device charges it when the session opens:
    the model's parameters and buffers with the bound optimizer's state, the cuBLAS workspaces of the forward and
    backward threads (``workspace_bytes`` each), ``extra_optimizers``' state and the ``reserved`` tensors (a
    wrapper's buffers). ``kernels`` and ``compute_capability``: the kernel models of the device the log stands for
    (:mod:`batchfinder.memory.kernels`), with ``cudnn_workspace`` (:mod:`batchfinder.memory.cudnn`). The caller restores the model's and the optimizers' state afterwards. Raises what the step
    raised.
    """
    steps = [sizes[0], *[sizes[1]] * (max(steps_per_trial, 2) - 1)]
    ledger = RecordingLedger(tuple(steps), workspace_bytes=workspace_bytes)
    try:
        held = [*model.parameters(), *model.buffers(), *state_tensors(optimizer.bound)]
        ledger.charge(tensor_storages(held))
        ledger.charge_workspace("forward")
        ledger.charge_workspace("backward")
        for extra in extra_optimizers:
            ledger.charge(tensor_storages(state_tensors(extra)))
        ledger.charge(tensor_storages(list(reserved)))
        with ChargingMode(ledger), KernelModels(kernels, compute_capability, cudnn_workspace):
            ledger.mark_phase("setup", 0)
            created = optimizer.create()
            model.train()
            with ledger.scaling(sizes[0]):
                first = _charged_copy(hosts[sizes[0]], ledger)
            batch = first
            for index, size in enumerate(steps, 1):
                if index == 2:
                    with ledger.paused():  # a trial moves one batch: the later steps' own is not in the log
                        batch = _charged_copy(hosts[size], ledger)
                run_training_step(
                    model, batch, step, created, lambda phase, i=index: ledger.mark_phase(phase, i),
                    precision=precision,
                )
            ledger.mark_phase("done", len(steps))
            del batch, first, created
    finally:
        ledger.forget()
    return AllocationLog.from_events(ledger.events, sizes)


def _charged_copy(host: Any, ledger: RecordingLedger) -> Any:
    """A copy of each tensor of a host batch, charged to ``ledger`` as a transfer to the device would be."""

    def transfer(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        with host_side_loading():
            copy = value.clone()
        ledger.charge([copy.untyped_storage()])
        return copy

    return tree_map(transfer, plain_containers(host))
