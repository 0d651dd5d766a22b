"""GuidedSearch: the predicted largest size first, then verification; exact like binsearch in a few trials (the pure
strategy, on synthetic memory curves; the guided mode on the simulated GPU is in ``tests/engine/test_modes.py``)."""

from __future__ import annotations

import ast
import pathlib
import random

from batchfinder.search.guided import GuidedSearch, largest_from_above, largest_within
from batchfinder.search.strategies import BisectingSearch, SearchBounds, StopReason

ROOT = pathlib.Path(__file__).resolve().parents[2]


# -- the pure strategy on synthetic memory curves ------------------------------------------------------------------
def _curve(a: float, b: float, knee_peak: float):
    """peak(B) = max(optimizer-step peak, a + b*B), as measured."""
    return lambda size: int(max(knee_peak + 0.01 * b * size, a + b * size))


def _search(strategy, true_peak, limit: int, rng: random.Random) -> list[tuple[int, bool]]:
    """Drive a strategy against a device whose trials fit while their peak is within ``limit``."""
    trials = []
    while (size := strategy.propose()) is not None:
        need = true_peak(size)
        fits = need <= limit
        reached = need if fits else int(limit - rng.random() * 0.3 * (need - true_peak(1)))
        strategy.record(size, fits, max(reached, 0))
        trials.append((size, fits))
    return trials


def _bounds(cap: int = 10**6) -> SearchBounds:
    return SearchBounds(16, cap, StopReason.DATASET_LENGTH)


def _random_case(rng: random.Random):
    a, b = rng.uniform(1e6, 1e9), rng.uniform(1e3, 1e7)
    true_peak = _curve(a, b, a * rng.uniform(0.5, 3))
    limit = int(rng.uniform(true_peak(1), true_peak(200_000)))
    return true_peak, limit


def test_exact_prediction_takes_two_trials_and_one_oom():
    rng = random.Random(0)
    for _ in range(200):
        true_peak, limit = _random_case(rng)
        expected = largest_within(true_peak, limit, 1, 10**6)
        if expected < 1:
            continue
        strategy = GuidedSearch(_bounds(), limit=limit, predict=true_peak)
        trials = _search(strategy, true_peak, limit, rng)
        assert strategy.largest_fit == expected
        assert trials == [(expected, True), (expected + 1, False)]
        assert strategy.stop_reason == StopReason.BRACKET_CLOSED
        assert strategy.predicted_max == expected


def test_cap_and_nothing_fits_take_one_trial():
    peak = _curve(1000, 10, 500)
    at_cap = GuidedSearch(_bounds(cap=300), limit=10**9, predict=peak)
    assert _search(at_cap, peak, 10**9, random.Random(1)) == [(300, True)]
    assert at_cap.stop_reason == StopReason.DATASET_LENGTH
    nothing = GuidedSearch(_bounds(), limit=900, predict=peak)
    assert _search(nothing, peak, 900, random.Random(1)) == [(1, False)]
    assert nothing.stop_reason == StopReason.NOTHING_FITS and nothing.largest_fit == 0


def test_real_gpu_errors_are_recalibrated_not_bisected_from_scratch():
    """The prediction misses a constant and a per-sample share (context, workspaces, other kernels) and the real
    limit is below the one assumed: the search still finds the exact largest size, in far fewer trials than
    binsearch, from a first trial at 90% of the prediction."""
    rng = random.Random(2)
    guided_trials = binsearch_trials = cases = 0
    for _ in range(150):
        true_peak, limit = _random_case(rng)
        expected = largest_within(true_peak, limit, 1, 10**6)
        if expected < 2:
            continue
        slope_error, offset = rng.uniform(-0.05, 0.15), rng.uniform(0, 0.05) * true_peak(1)
        predicted = lambda size, t=true_peak, e=slope_error, c=offset: int(t(size) / (1 + e) - c)  # noqa: E731
        assumed_limit = int(limit * rng.uniform(1.0, 1.04))
        strategy = GuidedSearch(_bounds(), limit=assumed_limit, capacity=int(assumed_limit * 1.05), predict=predicted, first_fraction=0.9)
        trials = _search(strategy, true_peak, limit, rng)
        baseline = _search(BisectingSearch(_bounds()), true_peak, limit, rng)
        assert strategy.largest_fit == expected
        assert (expected, True) in trials and ((expected + 1, False) in trials or expected == 10**6)
        guided_trials += len(trials)
        binsearch_trials += len(baseline)
        cases += 1
    assert guided_trials / cases < 0.7 * binsearch_trials / cases


def test_without_a_prediction_measured_peaks_are_extrapolated():
    rng = random.Random(3)
    guided_trials = binsearch_trials = ooms = cases = 0
    for _ in range(150):
        true_peak, limit = _random_case(rng)
        expected = largest_within(true_peak, limit, 1, 10**6)
        if expected < 1:
            continue
        strategy = GuidedSearch(_bounds(), limit=limit, predict=None)
        trials = _search(strategy, true_peak, limit, rng)
        assert strategy.largest_fit == expected
        guided_trials += len(trials)
        ooms += sum(not fits for _, fits in trials)
        binsearch_trials += len(_search(BisectingSearch(_bounds()), true_peak, limit, rng))
        cases += 1
    assert guided_trials < 0.7 * binsearch_trials
    assert ooms / cases < 1.5


def test_a_failing_prediction_is_dropped():
    def broken(size: int) -> int:
        raise RuntimeError("cannot trace")

    peak = _curve(10_000, 100, 5_000)
    strategy = GuidedSearch(_bounds(), limit=500_000, predict=broken)
    _search(strategy, peak, 500_000, random.Random(4))
    assert strategy.largest_fit == largest_within(peak, 500_000, 1, 10**6)
    assert strategy.prediction_status == "unavailable"


def test_largest_within_needs_few_evaluations():
    calls: list[int] = []

    def f(size: int) -> int:
        calls.append(size)
        return max(5_000_000, 1_000_000 + 3_137 * size) // 512 * 512

    for level in (4_000_000, 7_654_321, 2_000_000_000):
        expected = max(b for b in range(1, 700_000) if f(b) <= level) if f(1) <= level else 0
        calls.clear()
        assert largest_within(f, level, 1, 10**6) == expected
        assert len(set(calls)) <= 25
    assert largest_within(f, 10, 1, 100) == 0


def test_largest_from_above_finds_the_largest_size_within_the_level_where_fitting_is_not_monotonic():
    # As resnet18's reserved peaks at 224 MiB: 14, 16, 18 and 19 fit, 15, 17 and 20 do not.
    fits = set(range(2, 15)) | {16, 18, 19}
    calls: list[int] = []

    def peak(b: int) -> float:
        calls.append(b)
        return 100.0 if b in fits else 101.0

    assert largest_from_above(peak, 100.0, 2, 34) == 19
    assert len(calls) <= 12 and 20 in calls and 19 in calls
    assert largest_within(lambda b: 100.0 if b in fits else 101.0, 100.0, 2, 34) in (14, 16, 18, 19)
    assert largest_from_above(peak, 100.0, 7, 7) == 7  # nothing to search


def test_guided_module_does_not_import_torch():
    tree = ast.parse((ROOT / "batchfinder" / "search" / "guided.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "torch"]
