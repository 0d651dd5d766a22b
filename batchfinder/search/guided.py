"""``mode="guided"``: jump to the predicted largest batch size, then verify and close the bracket with real trials.

This module is pure Python and knows nothing of torch: the engine side, :class:`batchfinder.engine.modes.GuidedMode`,
gives it the numbers (from the estimator of :mod:`batchfinder.memory.estimate`, which predicts from the recorded
trial of :mod:`batchfinder.memory.recording` replayed by :mod:`batchfinder.memory.replay`, or from a fake-tensor
trace). :class:`GuidedSearch` is told

* ``limit``: the peak memory a trial may reach (on the simulated GPU its capacity; on a CUDA GPU its memory minus
  an allowance for the CUDA context);
* ``predict(B)``: the predicted peak of a trial at batch size B (the fake-tensor estimator), or nothing;
* after every trial, whether it fitted and the peak it reached (for a failed trial, the peak before the failure).

How it searches:

1. The first trial is the predicted largest size: the largest B whose predicted peak is within the limit
   (``first_fraction`` of it where the prediction is not exact by construction, i.e. on a real GPU, so that the
   first trial fits and gives a measurement to calibrate with).
2. Every fitting trial is a measured point of the true curve. The model of the curve is the prediction plus a
   residual fitted through the measured points (constant with one point, a line through the two largest with two
   points near the top, where the peak grows with B: above the knee of ``peak(B) = max(optimizer-step peak,
   a + b*B)``). Without a prediction it is the line through the two largest measured points that grow.
3. Each next trial is the largest size the model puts within the limit, inside the bracket (largest fit, smallest
   failure). When the model says the largest fit is the answer, the next size up is tried to close the bracket.
4. A surprise (a trial the model expected to fit ran out of memory, or the reverse) makes the limit itself
   uncertain: the limit is then searched between the highest peak any trial reached (it was reached without
   running out of memory) and what the model says the smallest failure needed, first at the lower end (a size that
   should fit), then halving. When the model says even the failed size fits, or after two surprises in a row, the
   next size is the midpoint of the bracket, so the search never does much worse than a bisection of what is left.

On the simulated GPU the prediction is exact, so a search takes two trials (the predicted largest size, which
fits, and one more, which runs out of memory) and at most one out-of-memory trial; with ``confirms`` (the engine
gives it there) one: when the first trial reaches the predicted peaks to the byte, the size above, predicted to run
out of memory, is not tried (stop reason ``"prediction confirmed"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from .strategies import ReplayedTrial, SearchBounds, SearchStrategy, StopReason

__all__ = ["GuidedSearch", "largest_within", "largest_from_above", "PeakFn", "SolveFn"]

logger = logging.getLogger(__name__)

PeakFn = Callable[[int], "int | None"]
"""``predict(batch_size) -> peak bytes`` (None when no prediction can be made)."""
SolveFn = Callable[[int, int, int], int]
"""``solve(level, lo, hi)``: the largest B in ``[lo, hi]`` whose predicted peak is at most ``level`` (``lo - 1`` if
none); lets the engine side use a faster solver than :func:`largest_within` on ``predict``."""

_MAX_GROWTH = 64


class _NoPrediction(Exception):
    """The prediction became unavailable while a model built on it was evaluated."""


def largest_within(f: Callable[[int], float], level: float, lo: int, hi: int, *, start: int | None = None) -> int:
    """The largest ``b`` in ``[lo, hi]`` with ``f(b) <= level``, for a non-decreasing ``f``; ``lo - 1`` when none.

    Interpolates (secant through the nearest evaluations, extrapolating from the two largest points below the
    level while no point above it is known), starting at ``start`` when given, and bisects whenever two evaluations
    in a row land on the same side, so it needs few evaluations of a near-linear ``f`` and never more than about
    twice those of a bisection.
    """
    if hi < lo:
        return lo - 1
    cache: dict[int, float] = {}

    def value(b: int) -> float:
        if b not in cache:
            cache[b] = f(b)
        return cache[b]

    if value(lo) > level:
        return lo - 1
    good, bad = lo, None
    sides: list[bool] = []  # after a point above the level is known: True where an evaluation moved ``good``
    first = start
    while True:
        top = hi if bad is None else bad - 1
        if good >= top:
            return good
        if first is not None:
            candidate = first
            first = None
        elif bad is not None:
            f_good, f_bad = value(good), value(bad)
            if len(sides) >= 2 and sides[-1] == sides[-2]:
                candidate = (good + bad) // 2  # interpolation keeps landing on one side: bisect once
            else:
                candidate = _from_above(cache, level, good)
                if candidate is None and f_bad > f_good:
                    candidate = good + int((level - f_good) * (bad - good) / (f_bad - f_good))
                elif candidate is None:
                    candidate = (good + bad) // 2
        else:
            below = [b for b in cache if b < good and cache[b] < value(good)]
            if below:
                b1 = max(below)
                slope = (value(good) - value(b1)) / (good - b1)
                candidate = good + int((level - value(good)) / slope)
            else:
                candidate = good * 2
            candidate = min(candidate, good * _MAX_GROWTH)
        candidate = min(max(candidate, good + 1), top)
        fits = value(candidate) <= level
        if fits:
            good = candidate
        else:
            bad = candidate
        if bad is not None:
            sides.append(fits)


def largest_from_above(f: Callable[[int], float], level: float, good: int, top: int) -> int:
    """The largest ``b`` in ``[good, top]`` with ``f(b) <= level``, where ``f(good) <= level`` and no size above
    ``top`` is within the level, searched from the top down: ``top``, then steps down that double, then a bisection
    of the last step. For an ``f`` that is not monotonic (reserved bytes: a size can need one more allocator segment
    than the next, where its blocks pack worse) this finds the largest size within the level rather than the first
    crossing from below."""
    bad = top + 1
    step = 1
    while bad - good > 1:
        candidate = max(bad - step, good + 1)
        if f(candidate) <= level:
            good = candidate
            break
        bad = candidate
        step *= 2
    while bad - good > 1:
        middle = (good + bad) // 2
        if f(middle) <= level:
            good = middle
        else:
            bad = middle
    return good


def _from_above(cache: dict[int, float], level: float, good: int) -> int | None:
    """Where the line through the two nearest evaluations above ``level`` (both past the crossing) meets it.

    Peaks are convex in the batch size (flat below the knee, then linear), so a chord from a point below the knee
    crawls; the line through two points above the level is exact on the linear part.
    """
    above = sorted(b for b, v in cache.items() if v > level and b > good)
    if len(above) < 2:
        return None
    b1, b2 = above[0], above[1]
    slope = (cache[b2] - cache[b1]) / (b2 - b1)
    if slope <= 0:
        return None
    return b1 - math.ceil((cache[b1] - level) / slope)


class GuidedSearch(SearchStrategy):
    """The ``"guided"`` strategy (see the module documentation).

    Args:
        bounds: sizes the search may try (``bounds.initial`` is used only without a prediction).
        limit: peak bytes a trial may reach (None when unknown: the search then doubles and bisects, using measured
            peaks to extrapolate).
        capacity: the device's total memory, an upper bound the limit never passes (default: ``limit``).
        predict: the predicted peak at a batch size, or None.
        solve: a fast ``solve(level, lo, hi)`` on the prediction (default: :func:`largest_within` on ``predict``).
        first_fraction: the first trial targets ``first_fraction * limit`` (1.0 where the prediction is exact).
        known: every predicted peak computed so far, also by ``solve`` (for :attr:`predicted_peaks`).
        measured_model: without a prediction, steer by a line through measured peaks (True), or double and bisect as
            binsearch does (False: for peaks that move in steps, such as a caching allocator's reserved segments,
            where such a line says nothing).
        method: says how ``predict`` computes its peaks (for :attr:`prediction_method`).
        confirms: ``confirms(B, peak_allocated, peak_reserved)``: whether a trial's peaks are exactly the predicted
            ones. Where the prediction is exact by construction (``first_fraction == 1``) and the first trial confirms
            it, the next size, predicted to run out of memory, is not tried (stop reason ``"prediction confirmed"``).
        replay: ``replay(B)``: a trial at B as the prediction replays it, for :meth:`replay_trial`.
    """

    def __init__(
        self,
        bounds: SearchBounds,
        *,
        limit: int | None,
        capacity: int | None = None,
        predict: PeakFn | None = None,
        solve: SolveFn | None = None,
        first_fraction: float = 1.0,
        known: Callable[[], dict[int, int]] | None = None,
        measured_model: bool = True,
        method: Callable[[], str | None] | None = None,
        confirms: Callable[[int, int, int], bool] | None = None,
        replay: Callable[[int], "ReplayedTrial | None"] | None = None,
    ) -> None:
        super().__init__(bounds)
        self._confirms = confirms
        self._replay = replay
        self._method = method
        self.measured_model = measured_model
        if not 0 < first_fraction <= 1:
            raise ValueError(f"first_fraction={first_fraction} must be in (0, 1]")
        self.limit = limit
        self.capacity = capacity if capacity is not None else limit
        self.first_fraction = first_fraction
        self._predict_fn = predict
        self._solve_fn = solve
        self._known = known
        self._predicted: dict[int, int] = {}
        self._measured: dict[int, int] = {}
        self._floor = 0
        self._trusted = True
        self._expect: bool | None = None
        self._surprise_oom = False
        self._surprises = 0
        self._ceiling = float(self.capacity if self.capacity is not None else math.inf)
        self._expected_need: Callable[[int], float] | None = None
        self._proposals = 0
        self._bisect_after = 6 + 2 * max(bounds.cap, 1).bit_length()
        """Proposals after which a bracket is bisected whatever the model says: when peaks move in steps (a caching
        allocator's segments) a line through measured points can keep proposing one more than the largest fit."""
        self.predicted_max: int | None = None
        """The largest size the prediction alone put within the limit (None without a prediction)."""

    # -- the prediction --------------------------------------------------------------------------------------
    @property
    def has_prediction(self) -> bool:
        """True while a prediction is available."""
        return self._predict_fn is not None and self.limit is not None

    def _predict(self, batch_size: int) -> int | None:
        found = self._predicted.get(batch_size)
        if found is not None:
            return found
        if self._predict_fn is None:
            return None
        try:
            value = self._predict_fn(batch_size)
        except Exception as exc:  # the prediction is an optimisation: search on without it
            logger.warning("guided search: no prediction at batch size %d (%s); using measured peaks only", batch_size, exc)
            value = None
        if value is None:
            self._predict_fn = None
            return None
        self._predicted[batch_size] = int(value)
        return int(value)

    def _predicted_or_raise(self, batch_size: int) -> float:
        value = self._predict(batch_size)
        if value is None:
            raise _NoPrediction
        return float(value)

    def _model(self) -> Callable[[int], float] | None:
        """The calibrated curve: prediction plus fitted residual, or a line through measured points.

        A model built on the prediction raises ``_NoPrediction`` if the prediction fails while it is used.
        """
        points = sorted(self._measured.items())
        if self.has_prediction:
            if not points:
                return self._predicted_or_raise
            b2, m2 = points[-1]
            r2 = m2 - self._predicted_or_raise(b2)
            slope = 0.0
            near = [(b, m) for b, m in points[:-1] if 2 * b >= b2]
            if near:
                b1, m1 = near[0]
                slope = (r2 - (m1 - self._predicted_or_raise(b1))) / (b2 - b1)
            return lambda b: self._predicted_or_raise(b) + r2 + slope * (b - b2)
        if len(points) < 2 or not self.measured_model:
            return None
        b2, m2 = points[-1]
        lower = [(b, m) for b, m in points[:-1] if m < m2]
        if not lower:
            return None
        b1, m1 = lower[-1]
        slope = (m2 - m1) / (b2 - b1)
        return lambda b: m2 + slope * (b - b2)

    # -- SearchStrategy ----------------------------------------------------------------------------------------
    def propose(self) -> int | None:
        if self.done:
            return None
        cap = self.bounds.cap
        lo = self.largest_fit
        hi = self.smallest_failure if self.smallest_failure is not None else cap + 1
        if lo >= cap:
            self.stop_reason = self.bounds.cap_reason
            return None
        if hi <= 1:
            self.stop_reason = StopReason.NOTHING_FITS
            return None
        if hi - lo <= 1:
            self.stop_reason = StopReason.BRACKET_CLOSED
            return None
        size, expect = self._choose(lo, hi)
        size = max(lo + 1, min(size, hi - 1))
        self._expect = expect
        self._proposals += 1
        return size

    def _choose(self, lo: int, hi: int) -> tuple[int, bool | None]:
        first = self._proposals == 0
        if first and self.has_prediction and self.limit is not None:
            level = int(self.limit * self.first_fraction)
            target = self._solve(level, 1, self.bounds.cap)
            if target is not None:
                self.predicted_max = self._solve(self.limit, 1, self.bounds.cap) if self.first_fraction < 1 else target
                if target < 1:
                    return 1, False  # the prediction says nothing fits: show it with batch size 1
                return target, True
        if lo == 0 and self.smallest_failure is not None:
            return max(hi // 2, 1), None  # nothing fitted yet: walk down as bisection would
        if self._surprises >= 2 or self._proposals >= self._bisect_after:
            return self._fallback(lo, hi), None  # the model keeps missing (or had its chances): double, then bisect
        try:
            model = self._model()
            if model is None or self.limit is None:
                return self._fallback(lo, hi), None
            if self._surprise_oom and self.smallest_failure is not None and model(hi) <= self._floor:
                return (lo + hi) // 2, None  # the model says the failed size fits: wrong near the top, bisect
            level = self._level(model, hi)
            target = largest_within(model, level, lo + 1, hi - 1)
            if not self.has_prediction and self.smallest_failure is None:
                target = min(target, 2 * lo)  # a line through measured points may be below the knee: grow x2 at most
            self._expected_need = model
        except _NoPrediction:  # the prediction failed just now: go on with measured peaks only
            return self._choose(lo, hi)
        if target <= lo:
            return lo + 1, False  # the model says lo is the largest: try one more to close the bracket
        return target, True

    def _solve(self, level: int, lo: int, hi: int) -> int | None:
        if self._solve_fn is not None:
            try:
                return int(self._solve_fn(level, lo, hi))
            except Exception as exc:
                logger.warning("guided search: the prediction failed (%s); using measured peaks only", exc)
                self._predict_fn = None
                self._solve_fn = None
                return None
        if self._predict(lo) is None:
            return None
        return largest_within(lambda b: self._predict(b) or math.inf, level, lo, hi)

    def _level(self, model: Callable[[int], float], hi: int) -> float:
        """The peak the next trial may reach: the limit while it is trusted, otherwise a point in its bracket."""
        if self.limit is None:
            raise RuntimeError("GuidedSearch._level needs a memory limit")
        if self._trusted:
            return self.limit
        upper = float(self._ceiling)
        if self.smallest_failure is not None:
            upper = min(upper, model(hi) - 1)
        lower = float(self._floor)
        if upper <= lower or self._surprise_oom:
            return lower  # just after a surprise failure: the highest peak reached is a level known to fit
        return (lower + upper) / 2

    def _fallback(self, lo: int, hi: int) -> int:
        """Without a model: double from the initial size, then bisect (as binsearch does)."""
        if lo == 0:
            return min(self.bounds.initial, hi - 1) if self.smallest_failure is None else max(hi // 2, 1)
        if self.smallest_failure is None:
            return min(lo * 2, self.bounds.cap)
        return (lo + hi) // 2

    def _after_record(self, batch_size: int, fits: bool, peak_bytes: int | None) -> None:
        if self._confirmed(batch_size, fits, peak_bytes):
            self.smallest_failure = batch_size + 1
            self.stop_reason = StopReason.PREDICTION_CONFIRMED
            logger.info(
                "guided search: batch size %d reached the predicted peaks to the byte; %d is predicted to run out of "
                "memory", batch_size, batch_size + 1,
            )
            return
        peak = int(peak_bytes) if peak_bytes is not None else None
        if fits and peak is not None:
            self._measured[batch_size] = peak
        if peak is not None:
            self._floor = max(self._floor, peak)  # reached without running out of memory
        surprise = self._expect is not None and self._expect != fits
        self._surprise_oom = surprise and not fits
        if surprise:
            self._surprises += 1
            self._trusted = False
            if fits:
                # Less than the model said, or more than the limit it was given: the limit is at least this peak.
                self._ceiling = float(self.capacity if self.capacity is not None else math.inf)
                if peak is not None and self.limit is not None and peak > self.limit:
                    self.limit = peak
            else:
                need = self._expected_need(batch_size) if self._expected_need is not None else math.inf
                self._ceiling = min(self._ceiling, need - 1)
            logger.info(
                "guided search: batch size %d %s, which the model did not expect; recalibrating",
                batch_size,
                "fitted" if fits else "ran out of memory",
            )
        else:
            self._surprises = 0
        self._expect = None
        self._expected_need = None

    def _confirmed(self, batch_size: int, fits: bool, peak_bytes: int | None) -> bool:
        """True when the first trial, at the predicted largest size of an exact prediction, reached the predicted
        peaks exactly and the next size is predicted not to fit."""
        if (
            self._confirms is None
            or self._proposals != 1
            or not fits
            or self._expect is not True
            or self.first_fraction != 1.0
            or self.limit is None
            or peak_bytes is None
            or self.last_peak_allocated is None
            or batch_size != self.predicted_max
            or batch_size >= self.bounds.cap
        ):
            return False
        try:
            if not self._confirms(batch_size, int(self.last_peak_allocated), int(peak_bytes)):
                return False
            above = self._predict(batch_size + 1)
        except Exception:  # the prediction is an optimisation: close the bracket with a trial instead
            return False
        return above is not None and above > self.limit

    def replay_trial(self, batch_size: int) -> ReplayedTrial | None:
        """A trial at ``batch_size`` as the prediction replays it, once the search stopped with its prediction
        confirmed (None otherwise, or where the prediction cannot replay that size)."""
        if self.stop_reason != StopReason.PREDICTION_CONFIRMED or self._replay is None:
            return None
        try:
            return self._replay(batch_size)
        except Exception as exc:  # the confirmation then runs the steps
            logger.info("guided search: the replay at batch size %d failed (%s)", batch_size, exc)
            return None

    # -- reporting ---------------------------------------------------------------------------------------------
    @property
    def predicted_peaks(self) -> dict[int, int]:
        """Every predicted peak the search computed (also by ``solve``), by batch size."""
        peaks = dict(self._predicted)
        if self._known is not None:
            try:
                peaks.update(self._known())
            except Exception:  # reporting only
                pass
        return {size: int(peak) for size, peak in sorted(peaks.items())}

    @property
    def prediction_status(self) -> str:
        """``"exact"`` (every trial went as predicted), ``"recalibrated"`` (a surprise corrected the model) or
        ``"unavailable"`` (the estimator could not trace the model)."""
        if not self.predicted_peaks:
            return "unavailable"
        return "exact" if self._trusted else "recalibrated"

    @property
    def prediction_method(self) -> str | None:
        """How the predicted peaks were computed (e.g. ``"one trace, replayed at each size"``), when told."""
        return self._method() if self._method is not None else None
