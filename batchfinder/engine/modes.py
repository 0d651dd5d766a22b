"""The search modes, registered in one place: ``"binsearch"``, ``"power"`` and ``"guided"``.

A mode is a :class:`SearchMode`: it builds the strategy that proposes sizes (:mod:`batchfinder.search`) for a
search's bounds and :class:`SearchContext`, and says through typed attributes what else it needs from the engine:
:attr:`SearchMode.records_on_entry` (a recorded trial as the session's model check) and
:attr:`SearchMode.searches_evaluation` (whether it can size evaluation batches). The engine looks modes up in
:data:`MODES` with :func:`mode_named` and never compares a mode's name.

The guided mode's engine side is all here (:class:`GuidedMode`): the estimator built on first use from the recorded
trial (:mod:`batchfinder.memory.recording`) or a fake-tensor trace, the device's limit, and the pure strategy
(:class:`~batchfinder.search.guided.GuidedSearch`) that jumps to the predicted size; its confirmation is the
recording replayed (:meth:`~batchfinder.search.strategies.SearchStrategy.replay_trial`).
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..devices.base import DeviceBackend
from ..errors import exception_first_line
from ..memory.estimate import Estimator
from ..memory.gpus import CUDA_CONTEXT_BYTES
from ..memory.replay import AllocationLog
from ..search.checks import MIN_STEPS_PER_TRIAL
from ..search.guided import GuidedSearch
from ..search.strategies import (
    BisectingSearch,
    ReplayedTrial,
    SearchBounds,
    SearchStrategy,
)
from ..training.batching import TrainingBatches
from ..training.optimizers import OptimizerSpec
from ..training.steps import StepFn

__all__ = ["MODES", "SearchMode", "SearchContext", "BisectingMode", "GuidedMode", "check_mode", "mode_named"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchContext:
    """What a mode may use besides the bounds (model, data, device, how a trial steps)."""

    model: nn.Module
    source: TrainingBatches
    """The training batches (for an evaluation search: the evaluation batches)."""
    device: DeviceBackend
    optimizer: OptimizerSpec | None
    step: StepFn | None
    """The loss step, ``step(model, batch) -> loss`` (None when the front end has no separate loss step)."""
    steps_per_trial: int = MIN_STEPS_PER_TRIAL
    precision: str = "32-true"
    record: Callable[[], AllocationLog | None] | None = None
    """Records a real trial's allocator calls (:meth:`~batchfinder.engine.trial.TrialSession.record_allocations`),
    where the device allows it: :class:`GuidedMode` then predicts from that log instead of a fake-tensor trace."""
    smallest_over_ranks: Callable[[list[int | None]], list[int | None]] | None = None
    """On several ranks: each value, the smallest over the ranks (a collective every rank calls alike), so that
    what a mode derives from its own device (the guided mode's memory budget) is the same on every rank."""


class SearchMode(ABC):
    """A search mode: the strategy it runs, and what it needs from the engine."""

    name: str
    records_on_entry: bool = False
    """True when the session's model check should be a recorded trial (:meth:`TrialSession.record_allocations`),
    which the mode then predicts from: one real step less than a separate check."""
    searches_evaluation: bool = True
    """True when the mode can size evaluation batches (a mode that models training memory cannot)."""

    @abstractmethod
    def strategy(self, bounds: SearchBounds, context: SearchContext) -> SearchStrategy:
        """The strategy that proposes the sizes of one search."""


class BisectingMode(SearchMode):
    """``"binsearch"`` (double, then bisect to a resolution of 1) or ``"power"`` (the last doubling that fits)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def strategy(self, bounds: SearchBounds, context: SearchContext) -> SearchStrategy:
        return BisectingSearch(bounds, self.name)


_RECORDED_METHOD = "one recorded trial (batch sizes 2 and 3), replayed at each size"


class _SearchPrediction:
    """The estimator for a search's context, built on first use; ``None`` (with a warning) when it cannot predict."""

    def __init__(self, context: SearchContext) -> None:
        self.context = context
        self.estimator: Estimator | None = None
        self.failed = False
        self.reason: str | None = None
        """Why the estimator cannot predict (the first line of its error), once it failed."""

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
        self.reason = f"{type(exc).__name__}: {exception_first_line(exc)}"
        # Once per search (a failed estimator is not asked again): the user must see why the search is slower.
        warnings.warn(
            f"mode='guided': the memory estimator could not trace this model ({self.reason}); searching with "
            "measured peaks only",
            UserWarning,
            stacklevel=2,
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
            return f"the estimator could not trace the model: {self.reason}"
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


class GuidedMode(SearchMode):
    """``"guided"``: jump to the size the memory prediction gives, then verify it with real trials (on the
    simulated GPU usually one, whose peaks confirm the prediction to the byte; the confirmation is then replayed)."""

    name = "guided"
    records_on_entry = True
    searches_evaluation = False

    def strategy(self, bounds: SearchBounds, context: SearchContext) -> GuidedSearch:
        """:class:`~batchfinder.search.guided.GuidedSearch` with the estimator's prediction, the device's limit,
        and (off the simulated GPU) a first trial at 90% of the predicted size."""
        limit, exact = _guided_limit(context.device)
        capacity = context.device.capacity_bytes
        if context.smallest_over_ranks is not None:
            # Every rank must propose the same sizes: the budgets (reserved + free, a few MiB apart between real
            # GPUs) are agreed on before the first proposal, the smallest for all.
            # A prediction is exact only where every rank's is and their budgets are equal.
            highest = None if limit is None else -limit
            limit, capacity, all_exact, least = context.smallest_over_ranks([limit, capacity, int(exact), highest])
            exact = bool(all_exact) and (least is None or limit == -least)
        prediction = _SearchPrediction(context)
        return GuidedSearch(
            bounds,
            limit=limit,
            capacity=capacity,
            predict=prediction.peak,
            solve=prediction.solve,
            first_fraction=1.0 if exact else 0.9,
            known=prediction.known_peaks,
            measured_model=not context.device.reserves_segments,
            method=prediction.method,
            confirms=prediction.confirms if exact else None,
            replay=prediction.replay if exact else None,
        )


MODES: dict[str, SearchMode] = {
    "binsearch": BisectingMode("binsearch"),
    "power": BisectingMode("power"),
    "guided": GuidedMode(),
}
"""Search modes by name: ``"binsearch"`` (double, then bisect to a resolution of 1), ``"power"`` (the last doubling
that fits) and ``"guided"`` (jump to the predicted largest size, then verify and close the bracket)."""


def check_mode(mode: Any) -> None:
    """Raise a ValueError unless ``mode`` names a registered search mode."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a search mode; choose one of {sorted(MODES)}")


def mode_named(name: str) -> SearchMode:
    """The registered mode called ``name`` (ValueError naming the choices otherwise)."""
    check_mode(name)
    return MODES[name]
