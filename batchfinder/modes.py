"""The search modes, registered in one place: ``"binsearch"``, ``"power"`` and ``"guided"``.

A mode is a factory ``(bounds, context) -> SearchStrategy``. :class:`SearchContext` is what a factory may use
besides the bounds: the model, the batch source, the device, the optimizer and the step (``"guided"`` traces the
step under fake tensors to predict memory). The engine looks modes up in :data:`MODES`; nothing registers a mode as
a side effect of an import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .devices import DeviceBackend
from .estimate import Estimator
from .gpus import CUDA_CONTEXT_BYTES
from .guided import GuidedSearch, ReplayedTrial
from .oom import exception_first_line
from .optimizers import OptimizerSpec
from .replay import AllocationLog
from .search import BisectingSearch, SearchBounds, SearchStrategy
from .steps import StepFn
from .validation import MIN_STEPS_PER_TRIAL

__all__ = ["MODES", "SearchContext", "StrategyFactory", "check_mode", "guided_strategy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchContext:
    """What a strategy factory may use besides the bounds (model, data, device, how a trial steps)."""

    model: nn.Module
    source: Any
    """The training batch source (:class:`~batchfinder.batching.BatchSource` or an adapter with ``sample``)."""
    device: DeviceBackend
    optimizer: OptimizerSpec | None
    step: StepFn | None
    """The loss step, ``step(model, batch) -> loss`` (None when the front end has no separate loss step)."""
    steps_per_trial: int = MIN_STEPS_PER_TRIAL
    precision: str = "32-true"
    record: Callable[[], AllocationLog | None] | None = None
    """Records a real trial's allocator calls (:meth:`~batchfinder.trial.TrialSession.record_allocations`), where
    the device allows it: ``"guided"`` then predicts from that log instead of a fake-tensor trace."""


StrategyFactory = Callable[[SearchBounds, SearchContext], SearchStrategy]


_RECORDED_METHOD = "one recorded trial (batch sizes 2 and 3), replayed at each size"

# -- the engine side of mode="guided" ---------------------------------------------------------------------------------
class _SearchPrediction:
    """The estimator for a search's context, built on first use; ``None`` (with a warning) when it cannot predict."""

    def __init__(self, context: SearchContext) -> None:
        self.context = context
        self.estimator: Estimator | None = None
        self.failed = False

    def _get(self) -> Estimator | None:
        if self.failed:
            return None
        if self.estimator is None:
            try:
                estimator = Estimator.for_search(self.context)
                log = self._recorded()
                if log is not None:
                    estimator.use_log(log, _RECORDED_METHOD)
                self.estimator = estimator
            except Exception as exc:
                return self._fail(exc)
        return self.estimator

    def _recorded(self) -> AllocationLog | None:
        """The log of a recorded real trial when the context can make one that replays (None: trace instead)."""
        if self.context.record is None:
            return None
        try:
            log = self.context.record()
        except Exception as exc:  # the fake-tensor trace reports what the model cannot do, with its own message
            logger.info("guided search: recording a trial failed (%s: %s); tracing instead", type(exc).__name__, exc)
            return None
        if log is not None and log.unsuitable is not None:
            logger.info("guided search: the recorded trial cannot be replayed (%s); tracing instead", log.unsuitable)
            return None
        return log

    def replay(self, batch_size: int) -> ReplayedTrial | None:
        """A trial at ``batch_size`` as the recorded log replays it on the device's allocator (None without one)."""
        if self.estimator is None:
            return None
        found = self.estimator.replay_at(batch_size)
        if found is None:
            return None
        return not found.overflows, found.peak, found.peak_reserved, found.peak_phase

    def confirms(self, batch_size: int, peak_allocated: int, peak_reserved: int) -> bool:
        """True when a trial at ``batch_size`` reached exactly the predicted allocated and reserved peaks."""
        if self.estimator is None:
            return False
        predicted = self.estimator.predicted_pair(batch_size)
        return predicted == (peak_allocated, peak_reserved)

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self.estimator = None  # drop the fake-tensor trainer and its traces now, not when the search result goes
        logger.warning(
            "guided search: the memory estimator cannot trace this model (%s: %s); searching with measured peaks only",
            type(exc).__name__,
            exception_first_line(exc),
        )
        return None

    def peak(self, batch_size: int) -> int | None:
        estimator = self._get()
        if estimator is None:
            return None
        try:
            return estimator.peak(batch_size)
        except Exception as exc:
            return self._fail(exc)

    def known_peaks(self) -> dict[int, int]:
        return {} if self.estimator is None else self.estimator.known_peaks

    def method(self) -> str | None:
        if self.failed:
            return "unavailable: the estimator could not trace the model"
        return None if self.estimator is None else self.estimator.method

    def solve(self, level: int, lo: int, hi: int) -> int:
        estimator = self._get()
        if estimator is None:
            raise RuntimeError("no prediction")
        try:
            return estimator.largest_fitting(level, lo, hi)
        except Exception as exc:
            self._fail(exc)
            raise


def _guided_limit(device: DeviceBackend) -> tuple[int | None, bool]:
    """(peak bytes a trial may reach, whether the prediction is exact by construction) for a device backend."""
    capacity = device.capacity_bytes
    if capacity is None:
        return None, False
    if device.accounting_is_exact:
        return capacity, True  # the same accounting as the estimator: exact
    budget = device.memory_budget()
    if budget is not None:
        return budget, False  # measured: what is reserved plus what is free (or the limit); the context is left out
    return max(capacity - CUDA_CONTEXT_BYTES, 1), False


def guided_strategy(bounds: SearchBounds, context: SearchContext) -> GuidedSearch:
    """The ``"guided"`` strategy for a search: :class:`~batchfinder.guided.GuidedSearch` with the estimator's
    prediction, the device's limit, and (off the simulated GPU) a first trial at 90% of the predicted size."""
    limit, exact = _guided_limit(context.device)
    prediction = _SearchPrediction(context)
    return GuidedSearch(
        bounds,
        limit=limit,
        capacity=context.device.capacity_bytes,
        predict=prediction.peak,
        solve=prediction.solve,
        first_fraction=1.0 if exact else 0.9,
        known=prediction.known_peaks,
        measured_model=not context.device.reserves_segments,
        method=prediction.method,
        confirms=prediction.confirms if exact else None,
        replay=prediction.replay if exact else None,
    )


MODES: dict[str, StrategyFactory] = {
    "binsearch": lambda bounds, _context: BisectingSearch(bounds, "binsearch"),
    "power": lambda bounds, _context: BisectingSearch(bounds, "power"),
    "guided": guided_strategy,
}
"""Search modes by name: ``"binsearch"`` (double, then bisect to a resolution of 1), ``"power"`` (the last doubling
that fits) and ``"guided"`` (jump to the predicted largest size, then verify and close the bracket)."""

EVALUATION_MODES = ("binsearch", "power")
"""Modes an evaluation batch size can be searched with (``"guided"`` models training memory)."""


def check_mode(mode: Any) -> None:
    """Raise a ValueError unless ``mode`` names a registered search mode."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a search mode; choose one of {sorted(MODES)}")
