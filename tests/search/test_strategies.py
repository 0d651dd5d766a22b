"""The pure search strategies, driven by an oracle: sizes up to a threshold fit."""

import pytest

from batchfinder.search.strategies import BisectingSearch, SearchBounds, StopReason


def drive(strategy, threshold):
    tried = []
    while (size := strategy.propose()) is not None:
        tried.append(size)
        strategy.record(size, size <= threshold)
        assert len(tried) < 200
    return tried


@pytest.mark.parametrize("threshold", [1, 2, 3, 7, 15, 16, 17, 100, 1000, 14076, 65535, 65536])
@pytest.mark.parametrize("initial", [1, 2, 16, 128])
def test_binsearch_finds_the_exact_threshold(threshold, initial):
    strategy = BisectingSearch(SearchBounds(initial, 10**6, StopReason.DATASET_LENGTH))
    tried = drive(strategy, threshold)
    assert strategy.largest_fit == threshold
    assert strategy.smallest_failure == threshold + 1
    assert threshold in tried and threshold + 1 in tried  # the answer and its neighbour were both tested
    assert strategy.stop_reason == StopReason.BRACKET_CLOSED
    assert len(tried) == len(set(tried)), "no size is tried twice"


def test_binsearch_trial_count_is_logarithmic():
    strategy = BisectingSearch(SearchBounds(16, 10**6, StopReason.DATASET_LENGTH))
    tried = drive(strategy, 14076)
    assert len(tried) == 24  # 10 doublings 16..8192, 16384 fails, 13 bisection steps


@pytest.mark.parametrize(("threshold", "expected"), [(100, 64), (16, 16), (17, 16), (5, 4), (1, 1)])
def test_power_stops_at_the_last_doubling_or_halving_that_fit(threshold, expected):
    strategy = BisectingSearch(SearchBounds(16, 10**6, StopReason.DATASET_LENGTH), mode="power")
    drive(strategy, threshold)
    assert strategy.largest_fit == expected
    assert strategy.stop_reason == StopReason.POWER_STEP


def test_walks_down_when_the_initial_size_does_not_fit():
    strategy = BisectingSearch(SearchBounds(128, 10**6, StopReason.DATASET_LENGTH))
    tried = drive(strategy, 37)
    assert tried[:3] == [128, 64, 32]
    assert strategy.largest_fit == 37


def test_nothing_fits():
    strategy = BisectingSearch(SearchBounds(16, 1000, StopReason.DATASET_LENGTH))
    tried = drive(strategy, 0)
    assert tried == [16, 8, 4, 2, 1]
    assert strategy.largest_fit == 0
    assert strategy.stop_reason == StopReason.NOTHING_FITS


@pytest.mark.parametrize("reason", [StopReason.DATASET_LENGTH, StopReason.MAX_BATCH_SIZE])
def test_the_cap_is_tried_and_named(reason):
    strategy = BisectingSearch(SearchBounds(16, 100, reason))
    tried = drive(strategy, 10**9)
    assert tried == [16, 32, 64, 100]
    assert strategy.largest_fit == 100
    assert strategy.stop_reason == reason


def test_bisects_below_a_cap_that_does_not_fit():
    strategy = BisectingSearch(SearchBounds(16, 100, StopReason.DATASET_LENGTH))
    drive(strategy, 90)
    assert strategy.largest_fit == 90
    assert strategy.stop_reason == StopReason.BRACKET_CLOSED


def test_initial_above_the_cap_is_clamped():
    strategy = BisectingSearch(SearchBounds(64, 10, StopReason.DATASET_LENGTH))
    assert drive(strategy, 10**9) == [10]


def test_external_stop():
    strategy = BisectingSearch(SearchBounds(16, 10**6, StopReason.DATASET_LENGTH))
    strategy.propose()
    strategy.record(16, True)
    strategy.stop(StopReason.MAX_TRIALS)
    assert strategy.propose() is None
    assert strategy.stop_reason == StopReason.MAX_TRIALS
    assert strategy.largest_fit == 16


def test_bounds_and_mode_are_validated():
    with pytest.raises(ValueError):
        SearchBounds(0, 10, StopReason.DATASET_LENGTH)
    with pytest.raises(ValueError):
        SearchBounds(1, 10, StopReason.TIME_BUDGET)
    with pytest.raises(ValueError):
        BisectingSearch(SearchBounds(1, 10, StopReason.DATASET_LENGTH), mode="random")


def test_search_module_knows_nothing_of_torch():
    import ast
    import pathlib

    import batchfinder.search.strategies as search

    tree = ast.parse(pathlib.Path(search.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported
