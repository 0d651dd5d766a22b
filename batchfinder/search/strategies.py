"""Search strategies: which batch size to try next, knowing only which sizes fit.

This module is pure Python and knows nothing of torch: a strategy proposes a batch size, is told whether it
fitted (and, when known, the peak memory it reached), and proposes the next one until it can say why it stopped.

* ``"binsearch"`` doubles from the initial size until the first failure, then bisects between the largest size
  that fitted and the smallest that failed until they are adjacent (resolution 1).
* ``"power"`` doubles until the first failure and stops at the last doubling that fitted.

Both walk *down* by halving when the initial size does not fit, and both stop at the cap (the dataset length or
``max_batch_size``) when it fits. Every size a strategy reports as the largest fit is one that was tried.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = [
    "StopReason",
    "SearchBounds",
    "SearchStrategy",
    "ReplayedTrial",
    "BisectingSearch",
    "scaled_batch_size",
    "recommend_batch_size",
]


class StopReason(str, enum.Enum):
    """Why a search ended."""

    BRACKET_CLOSED = "bracket closed"
    """The largest size that fits and the smallest that does not are adjacent."""
    POWER_STEP = "power: last doubling that fit"
    """``mode="power"``: the next doubling (or halving) step did not fit."""
    DATASET_LENGTH = "dataset length"
    """The batch size reached the number of samples in the dataset and still fitted."""
    MAX_BATCH_SIZE = "max_batch_size"
    """The batch size reached ``max_batch_size`` and still fitted."""
    MAX_TRIALS = "max_trials"
    """The trial budget ran out before the bracket closed."""
    TIME_BUDGET = "time budget"
    """The time budget ran out before the bracket closed."""
    NOTHING_FITS = "nothing fits"
    """Batch size 1 did not fit."""
    PREDICTION_CONFIRMED = "prediction confirmed"
    """``mode="guided"`` on a device whose memory the prediction models exactly (the simulated GPU): the trial at the
    predicted largest size reached the predicted allocated and reserved peaks to the byte, and the next size is
    predicted to run out of memory (it is not tried)."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class SearchBounds:
    """The sizes a search may try: it starts at ``initial`` and never exceeds ``cap``."""

    initial: int
    cap: int
    cap_reason: StopReason

    def __post_init__(self) -> None:
        if self.cap < 1 or self.initial < 1:
            raise ValueError(f"search bounds must be at least 1, got initial={self.initial}, cap={self.cap}")
        if self.cap_reason not in (StopReason.DATASET_LENGTH, StopReason.MAX_BATCH_SIZE):
            raise ValueError(f"cap_reason must be DATASET_LENGTH or MAX_BATCH_SIZE, got {self.cap_reason}")


ReplayedTrial = tuple[bool, int, int, str]
"""``(fits, peak allocated, peak reserved, the phase of the peak)`` of a trial as a recording replays it."""


class SearchStrategy(ABC):
    """A strategy proposes batch sizes one at a time and learns from each outcome."""

    def __init__(self, bounds: SearchBounds) -> None:
        self.bounds = bounds
        self.largest_fit: int = 0
        """Largest size tried that fitted (0 while none has)."""
        self.smallest_failure: int | None = None
        """Smallest size tried that did not fit (None while none has failed)."""
        self.stop_reason: StopReason | None = None
        self.predicted_max: int | None = None
        """The largest batch size the strategy predicted to fit, for strategies that predict (None otherwise)."""
        self.last_peak_allocated: int | None = None
        """The allocated peak of the trial recorded last, when told."""

    @property
    def predicted_peaks(self) -> dict[int, int]:
        """Predicted peak bytes by batch size, for strategies that predict (empty otherwise)."""
        return {}

    @property
    def prediction_status(self) -> str | None:
        """How the prediction held up, for strategies that predict (None otherwise)."""
        return None

    @property
    def prediction_method(self) -> str | None:
        """How the prediction was computed, for strategies that predict (None otherwise)."""
        return None

    @property
    def done(self) -> bool:
        """True once the strategy has a stop reason."""
        return self.stop_reason is not None

    @abstractmethod
    def propose(self) -> int | None:
        """Return the next batch size to try, or None once the search is over (see :attr:`stop_reason`)."""

    def record(
        self, batch_size: int, fits: bool, peak_bytes: int | None = None, *, peak_allocated: int | None = None
    ) -> None:
        """Tell the strategy how a trial at ``batch_size`` went (``peak_bytes``: the peak memory the device decides
        on, when measured; ``peak_allocated``: the peak of allocated bytes, when it differs)."""
        self.last_peak_allocated = peak_allocated
        if fits:
            self.largest_fit = max(self.largest_fit, batch_size)
        elif self.smallest_failure is None or batch_size < self.smallest_failure:
            self.smallest_failure = batch_size
        self._after_record(batch_size, fits, peak_bytes)

    def _after_record(self, batch_size: int, fits: bool, peak_bytes: int | None) -> None:
        """Hook for strategies that learn more than fit/no-fit."""

    def replay_trial(self, batch_size: int) -> ReplayedTrial | None:
        """A trial at ``batch_size`` as the strategy's confirmed prediction replays it, where it can stand for
        running the steps (the confirmation after the search); None for strategies that do not predict."""
        return None

    def stop(self, reason: StopReason) -> None:
        """End the search from outside (trial or time budget)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def _bracket_closed(self) -> bool:
        return self.smallest_failure is not None and self.smallest_failure - self.largest_fit <= 1


_BISECTS = {"binsearch": True, "power": False}
"""The two variants of :class:`BisectingSearch`, by mode name: whether it bisects after the first failure."""


class BisectingSearch(SearchStrategy):
    """Doubling (and halving) followed, in ``binsearch`` mode, by bisection down to a resolution of 1."""

    def __init__(self, bounds: SearchBounds, mode: str = "binsearch") -> None:
        if mode not in _BISECTS:
            raise ValueError(f"mode must be one of {sorted(_BISECTS)} for BisectingSearch, got {mode!r}")
        super().__init__(bounds)
        self.mode = mode
        self.bisects = _BISECTS[mode]
        """False for ``"power"``: the search stops at the last doubling that fitted."""
        self._last: int | None = None

    def propose(self) -> int | None:
        if self.done:
            return None
        cap = self.bounds.cap
        if self._last is None:
            size = min(self.bounds.initial, cap)
        elif self.smallest_failure is None:
            # Still growing: every trial so far fitted.
            if self.largest_fit >= cap:
                self.stop_reason = self.bounds.cap_reason
                return None
            size = min(self.largest_fit * 2, cap)
        elif self.largest_fit == 0:
            # Walking down: nothing has fitted yet.
            if self.smallest_failure <= 1:
                self.stop_reason = StopReason.NOTHING_FITS
                return None
            size = self.smallest_failure // 2
        elif not self.bisects:
            self.stop_reason = StopReason.POWER_STEP
            return None
        elif self._bracket_closed():
            self.stop_reason = StopReason.BRACKET_CLOSED
            return None
        else:
            size = (self.largest_fit + self.smallest_failure) // 2
        self._last = size
        return size


def scaled_batch_size(max_batch_size: int, safety: float) -> int:
    """``floor(safety * max_batch_size)``, robust to float error (0.8 * 10 is 8, not 7)."""
    return math.floor(safety * max_batch_size + 1e-9)


def recommend_batch_size(max_batch_size: int, safety: float = 0.8, multiple_of: int = 1) -> int:
    """The recommended batch size: ``floor(safety * max_batch_size)`` rounded down to a multiple of
    ``multiple_of``, at least 1."""
    return max(scaled_batch_size(max_batch_size, safety) // multiple_of * multiple_of, 1)
