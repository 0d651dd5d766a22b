"""The ground truth: the exact largest batch size that fits, established independently of every finder.

:class:`FitOracle` answers "does batch size B fit?" with :func:`batchfinder.try_batch_size`, each in a fresh
session (the model is snapshotted and restored around every call), and remembers its answers.
:func:`find_ground_truth` makes a first guess by secant steps on peak(B) (linear above the point where the
optimizer step stops being the peak), with peaks from ``batchfinder.estimate_memory`` (fake tensors, no computation)
when the library has it and from trials on a device without the limit otherwise. Only real trials decide: it walks
from the guess to a size B that fits while B+1 does not (galloping, then bisecting), and finally checks the sizes
around B densely (B-window+1 .. B+window): those up to B must fit and those above must not. On the simulated GPU all of
this is exact and deterministic; on a real GPU it is a fine search whose dense check shows the boundary's noise.

The oracle's data is a dataset or a ``DataLoader`` (batch size 1) whose ``collate_fn`` builds the batches:
``benchmarks.survival`` passes the samples sorted largest first, so that every trial of size B runs on the worst-case
batch of B.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, Dataset

import batchfinder as bf
from batchfinder.devices.base import DeviceBackend

from .devices import BenchDevice
from .finders import ModelSource
from .workloads import make_optimizer, training_step

__all__ = ["FitOracle", "GroundTruth", "find_ground_truth"]

logger = logging.getLogger("benchmarks")


class FitOracle:
    """``fits(B)`` through :func:`batchfinder.try_batch_size` on the benchmark's device and capacity (cached)."""

    def __init__(
        self, workload: ModelSource, device: BenchDevice, dataset: Dataset | DataLoader, seed: int = 0
    ) -> None:
        self.device = device
        self.dataset = dataset
        """What ``try_batch_size`` gets: a dataset, or a loader whose ``collate_fn`` builds the batches."""
        self.model = workload.build_model(seed)
        samples = dataset.dataset if isinstance(dataset, DataLoader) else dataset
        self.length = len(samples)  # type: ignore[arg-type]
        self.sample = samples[0]
        """The first sample, as the dataset returns it (what the memory estimator is given for a first guess)."""
        self.results: dict[int, bool] = {}
        self.peaks: dict[int, int] = {}
        self.trials_run = 0
        self.seconds = 0.0
        """Wall time of every trial run (fit checks and peak measurements)."""
        self.estimate_seconds = 0.0
        """Wall time spent in ``estimate_memory`` for the first guess."""

    def _trial(self, batch_size: int, device: DeviceBackend) -> bf.Trial:
        """One timed, counted ``try_batch_size`` trial of the benchmark's training step on ``device``."""
        start = time.perf_counter()
        try:
            return bf.try_batch_size(
                self.model, self.dataset, batch_size, optimizer=make_optimizer, step_fn=training_step, device=device
            )
        finally:
            self.seconds += time.perf_counter() - start
            self.trials_run += 1
            self.device.clean(collect=False)  # try_batch_size collects garbage itself

    def fits(self, batch_size: int) -> bool:
        """True when ``batch_size`` trains (two optimizer steps) without running out of memory."""
        if batch_size not in self.results:
            trial = self._trial(batch_size, self.device.backend())
            self.results[batch_size] = trial.fits
            if trial.fits:
                self.peaks[batch_size] = trial.peak_bytes
        return self.results[batch_size]

    def peak_without_limit(self, batch_size: int) -> int | None:
        """Peak memory of a trial at ``batch_size`` on a device without the capacity limit (None if it OOMs there)."""
        trial = self._trial(batch_size, self.device.measuring_backend())
        return trial.peak_bytes if trial.fits else None


@dataclass
class GroundTruth:
    """The largest batch size that fits, and the evidence."""

    max_batch_size: int
    """Largest B such that B fits and B+1 does not (0 when even 1 does not fit)."""
    guess: int | None
    """Where the search started (None when no guess could be made and it started at 16)."""
    guess_method: str
    """``"estimate_memory"`` (fake-tensor peaks), ``"measured peaks"`` (trials without the limit) or
    ``"given start"``."""
    window: dict[int, bool] = field(default_factory=dict)
    """Every size within the dense window and whether it fitted."""
    consistent: bool = True
    """True when every size up to B in the window fitted and every size above did not."""
    trials: int = 0
    seconds: float = 0.0


def _secant(peak: Callable[[int], int | None], capacity: int, cap: int) -> int | None:
    """The largest B with ``peak(B) <= capacity`` by secant steps on ``peak``; None when it cannot tell."""
    low, high = min(32, cap), min(64, cap)
    if high <= low:
        return None
    p_low, p_high = peak(low), peak(high)
    for _ in range(8):  # below the knee peak(B) is flat (the optimizer step peaks): move up until it grows
        if p_low is None or p_high is None:
            return None
        if p_high > p_low or high >= cap:
            break
        low, p_low = high, p_high
        high = min(high * 4, cap)
        p_high = peak(high)
    if p_low is None or p_high is None or p_high <= p_low:
        return None
    guess = high
    for _ in range(4):
        slope = (p_high - p_low) / (high - low)
        guess = max(1, min(cap, int(high + (capacity - p_high) / slope)))
        if abs(guess - high) <= 1:
            break
        measured = peak(guess)
        if measured is None or measured == p_high:
            break
        low, p_low, high, p_high = high, p_high, guess, measured
    return guess


def _estimated_peak(oracle: FitOracle) -> Callable[[int], int | None] | None:
    """``B -> peak`` from ``batchfinder.estimate_memory`` (fake tensors: no computation), when the library has it."""
    estimate = getattr(bf, "estimate_memory", None)
    if estimate is None:
        return None
    sample: Any = getattr(oracle, "sample", None)
    if sample is None:
        sample = oracle.dataset[0]

    def peak(batch_size: int) -> int | None:
        start = time.perf_counter()
        try:
            result = estimate(oracle.model, sample, batch_size, optimizer=make_optimizer, step_fn=training_step)
            return int(result.peak)
        except Exception as exc:  # the estimator is only a shortcut: fall back to measuring
            logger.info("estimate_memory failed (%s); measuring peaks instead", exc)
            return None
        finally:
            oracle.estimate_seconds += time.perf_counter() - start

    return peak


def _first_guess(oracle: FitOracle, capacity: int) -> tuple[int | None, str]:
    """Where to start looking: from estimated peaks (fake tensors), else from peaks measured without the limit."""
    cap = oracle.length - 1
    estimated = _estimated_peak(oracle)
    if estimated is not None:
        guess = _secant(estimated, capacity, cap)
        if guess is not None:
            return guess, "estimate_memory"
    return _secant(oracle.peak_without_limit, capacity, cap), "measured peaks"


def find_ground_truth(oracle: FitOracle, capacity: int, window: int = 2, start: int | None = None) -> GroundTruth:
    """The exact largest batch size B that fits, found from a guess and checked densely around it.

    The dense check covers B-window+1 .. B+window: ``window=1`` checks B and B+1, ``window=2`` B-1 .. B+2.
    With ``start`` the walk starts there (galloping up or down from it, then bisecting) instead of at a guess from
    estimated or measured peaks: for models the estimator does not trace faithfully, where a far guess would cost
    many slow trials at large sizes.
    """
    if window < 1:
        raise ValueError(f"window={window} must be at least 1 (B and B+1 are always checked)")
    if start is not None:
        if start < 1:
            raise ValueError(f"start={start} must be at least 1")
        guess, method = start, "given start"
    else:
        guess, method = _first_guess(oracle, capacity)
    start = max(1, min(guess or 16, oracle.length - 1))
    if oracle.fits(start):
        low, step = start, 1
        high = None
        while high is None:
            candidate = low + step
            if candidate >= oracle.length:  # cannot happen with the benchmark's dataset lengths
                high = oracle.length
            elif oracle.fits(candidate):
                low, step = candidate, step * 2
            else:
                high = candidate
    else:
        high, step = start, 1
        low = 0
        while True:
            candidate = high - step
            if candidate < 1:
                break
            if oracle.fits(candidate):
                low = candidate
                break
            high, step = candidate, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        if oracle.fits(middle):
            low = middle
        else:
            high = middle
    dense = {b: oracle.fits(b) for b in range(max(1, low - window + 1), min(low + window, oracle.length - 1) + 1)}
    consistent = all(fits == (b <= low) for b, fits in dense.items())
    return GroundTruth(
        low, guess, method, dense, consistent, oracle.trials_run, oracle.seconds + oracle.estimate_seconds
    )
