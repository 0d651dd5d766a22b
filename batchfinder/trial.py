"""Trials: real training steps at one batch size, measured, with recovery from running out of memory.

A trial builds a real batch of the requested size, moves it to the device, and runs ``steps_per_trial`` (at least
2, because Adam-style optimizers allocate their state lazily at the first step) full steps: forward, loss,
backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``. It records the peak memory and the time per step.

An out-of-memory error ends the trial as "does not fit". Recovery happens *after* the ``except`` block, once the
traceback (which keeps the failed step's tensors alive) is gone: the user's state is restored, garbage collected,
the device synchronised, its cache emptied and its peak statistics reset, and the memory level is compared with
the level before the trial (a difference is recorded as ``leaked_bytes``). Any other exception propagates with its
own type and traceback after the user's state is restored.

:class:`TrialSession` owns the user's state for the length of a search: it snapshots it on entry, keeps the model
resident on the device, checks once that the model accepts the batch, and restores everything on exit, also when
the search fails or is interrupted.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batching import BatchSource, describe_batch
from .devices import DeviceBackend
from .errors import NoBatchSizeFitsError
from .oom import exception_text, is_fatal_device_error, is_oom_error
from .optimizers import OptimizerSpec
from .state import TrainingState
from .steps import StepFn
from .units import format_bytes

__all__ = ["Trial", "TrialSession", "MIN_STEPS_PER_TRIAL"]

logger = logging.getLogger("batchfinder")

MIN_STEPS_PER_TRIAL = 2

_REQUEST = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB|bytes)")
_UNIT = {"B": 1, "bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


@dataclass(frozen=True)
class Trial:
    """The outcome of training steps at one batch size."""

    batch_size: int
    fits: bool
    """True when every step ran without running out of memory."""
    peak_bytes: int
    """Peak device memory during the trial (for a failed trial, the peak reached before the failure)."""
    seconds: float | None
    """Wall time per step (mean over the steps after the first, which allocates optimizer state); None if it failed."""
    steps: int
    """Steps completed."""
    baseline_bytes: int = 0
    """Device memory held before the trial (model, buffers, existing optimizer state)."""
    leaked_bytes: int = 0
    """Memory still held after recovery beyond the baseline (0 when recovery was complete)."""
    error: str | None = None
    """The out-of-memory message when the trial did not fit."""

    @property
    def samples_per_second(self) -> float | None:
        """Training throughput of the trial, when it fitted."""
        if not self.fits or not self.seconds:
            return None
        return self.batch_size / self.seconds

    @property
    def requested_bytes(self) -> int | None:
        """Size of the allocation that failed, read from the out-of-memory message when it says."""
        match = _REQUEST.search(self.error or "")
        return None if match is None else int(float(match.group(1)) * _UNIT[match.group(2)])


class TrialSession:
    """Runs trials on one model, dataset and device, and leaves the user's state as it found it.

    Use as a context manager; :meth:`run` runs one trial.
    """

    def __init__(
        self,
        model: nn.Module,
        source: BatchSource,
        step: StepFn,
        optimizer: OptimizerSpec,
        device: DeviceBackend,
        *,
        steps_per_trial: int = MIN_STEPS_PER_TRIAL,
    ) -> None:
        self.model = model
        self.source = source
        self.step = step
        self.optimizer = optimizer
        self.device = device
        self.steps_per_trial = steps_per_trial
        self._state: TrainingState | None = None
        self._resident: Any = None

    # -- lifetime ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "TrialSession":
        self.device.check_model(self.model)
        bound = [self.optimizer.bound] if self.optimizer.bound is not None else []
        self._state = TrainingState.capture(self.model, bound)
        try:
            self._state.clear_gradients()
            self._enter_resident()
            self._probe()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self._resident is not None:
                resident, self._resident = self._resident, None
                resident.__exit__(None, None, None)
        finally:
            if self._state is not None:
                self._state.restore(final=True)
            gc.collect()

    def _enter_resident(self) -> None:
        resident = self.device.resident(self.model, self.optimizer.bound)
        try:
            resident.__enter__()
        except torch.OutOfMemoryError as exc:
            message = exception_text(exc)
            raise NoBatchSizeFitsError(
                f"the model alone does not fit on {self.device.name}: its parameters and buffers"
                f"{' and optimizer state' if self.optimizer.bound is not None else ''} exceed the capacity "
                f"({message})",
                capacity_bytes=self.device.capacity_bytes,
            ) from None
        self._resident = resident

    def _probe(self) -> None:
        """Run one forward/backward at a tiny batch outside memory accounting to check the model takes the batch."""
        size = min(2, self.source.length)
        host_batch = self.source.batch(size)
        state = self._require_state()
        try:
            batch = self.device.to_device(host_batch)
            self.model.train()
            loss = self.step(self.model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(
                    f"the step returned {type(loss).__name__}"
                    f"{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}, not a scalar loss tensor; "
                    "step_fn and loss_fn must return a single-element tensor"
                )
            if not loss.requires_grad:
                raise ValueError(
                    "the loss does not require grad: no trainable parameter contributes to it (is the model frozen, "
                    "or does step_fn run under torch.no_grad()?)"
                )
            loss.backward()
            self.optimizer.create()
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as exc:
            if is_oom_error(exc):
                return  # even a tiny batch does not fit: the search reports it with figures
            error_type = TypeError if isinstance(exc, TypeError) else ValueError
            raise error_type(
                f"the model could not train on a batch built from the dataset, {describe_batch(host_batch)}: "
                f"{exception_text(exc).splitlines()[0] if exception_text(exc) else type(exc).__name__}. "
                "Check that the dataset's samples match the model's input, or pass loss_fn / step_fn(model, batch)."
            ) from exc
        finally:
            state.restore(final=False)

    def _require_state(self) -> TrainingState:
        if self._state is None:
            raise RuntimeError("TrialSession must be used as a context manager")
        return self._state

    # -- trials --------------------------------------------------------------------------------------------------
    def run(self, batch_size: int) -> Trial:
        """Run one trial at ``batch_size`` and return how it went; restores the user's state afterwards."""
        state = self._require_state()
        host_batch = self.source.batch(batch_size)
        self.device.synchronize()
        baseline = self.device.memory_allocated()
        self.device.reset_peak_memory_stats()
        durations: list[float] = []
        error: str | None = None
        try:
            self._steps(host_batch, durations)
        except Exception as exc:  # recovery happens below, outside this block
            if not is_oom_error(exc) or is_fatal_device_error(exc):
                raise
            error = exception_text(exc).strip().splitlines()[0]
        state.restore(final=False)
        gc.collect()
        self.device.synchronize()
        peak = self.device.max_memory_allocated()
        self.device.empty_cache()
        self.device.reset_peak_memory_stats()
        leaked = self.device.memory_allocated() - baseline
        if leaked:
            logger.warning("batch size %d left %s allocated after recovery", batch_size, format_bytes(leaked))
        timed = durations[1:] or durations
        return Trial(
            batch_size=batch_size,
            fits=error is None,
            peak_bytes=peak,
            seconds=(sum(timed) / len(timed)) if error is None and timed else None,
            steps=len(durations),
            baseline_bytes=baseline,
            leaked_bytes=leaked,
            error=error,
        )

    def _steps(self, host_batch: Any, durations: list[float]) -> None:
        with self.device.measuring():
            optimizer = self.optimizer.create()
            batch = self.device.to_device(host_batch)
            self.model.train()
            for _ in range(self.steps_per_trial):
                start = time.perf_counter()
                loss = self.step(self.model, batch)
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.model.zero_grad(set_to_none=True)
                self.device.synchronize()
                durations.append(time.perf_counter() - start)
