"""mode="guided": the predicted largest size first, then verification; exact like binsearch in a few trials."""

from __future__ import annotations

import ast
import logging
import pathlib
import random
import subprocess
import sys

import pytest
import torch
from conftest import make_case
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.engine.modes import _guided_limit
from batchfinder.engine.trial import TrialSession
from batchfinder.search.guided import GuidedSearch, largest_from_above, largest_within
from batchfinder.search.strategies import BisectingSearch, SearchBounds, StopReason

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def test_limits_per_device():
    from batchfinder.memory.gpus import CUDA_CONTEXT_BYTES

    class FakeCuda:
        capacity_bytes = 80 * 2**30
        memory_limit = None
        accounting_is_exact = False

        def memory_budget(self) -> int | None:
            return None if self.memory_limit is None else self.memory_limit  # a limit is a measured budget

    class Limited(FakeCuda):
        memory_limit = 8 * 2**30
        capacity_bytes = 8 * 2**30

    assert _guided_limit(bf.SimulatedGPU("64MiB")) == (64 * 2**20, True)
    assert _guided_limit(FakeCuda()) == (80 * 2**30 - CUDA_CONTEXT_BYTES, False)
    assert _guided_limit(Limited()) == (8 * 2**30, False)


# -- the engine, on the simulated GPU ---------------------------------------------------------------------------------
class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def _encoder_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    return TinyEncoder(), TensorDataset(torch.randint(0, 100, (900, 16), generator=g), torch.randint(0, 5, (900,), generator=g))


CASES = [  # (model, capacity, optimizer, also run binsearch to compare)
    ("mlp", "3MiB", torch.optim.Adam, True),
    ("cnn", "6MiB", torch.optim.Adam, False),
    ("dict", "4MiB", torch.optim.SGD, True),
    ("frozen", "3MiB", torch.optim.Adam, True),
    ("cnn", "24MiB", torch.optim.SGD, False),
    ("encoder", "12MiB", torch.optim.AdamW, False),
    ("mlp", "40MiB", torch.optim.Adam, False),
]


def test_guided_finds_the_binsearch_max_in_few_trials():
    trials_per_search = []
    for name, capacity, optimizer, compare in CASES:
        model, dataset = _encoder_case() if name == "encoder" else (lambda c: (c.model, c.dataset))(make_case(name))
        result = bf.find_batch_size(model, dataset, optimizer=optimizer, device=bf.SimulatedGPU(capacity), mode="guided")
        assert result.num_ooms <= 1, (name, capacity, result.table())
        trials_per_search.append(result.num_trials)
        assert result.num_steps == sum(t.steps for t in result.trials) >= 2 * (result.num_trials - result.num_ooms)
        if result.stop_reason == StopReason.BRACKET_CLOSED:  # the largest fit and the next size up, both tried
            assert result.trial_for(result.max_batch_size).fits
            assert not result.trial_for(result.max_batch_size + 1).fits
        elif result.stop_reason == StopReason.PREDICTION_CONFIRMED:  # the trial reached the predicted peaks exactly
            trial = result.trial_for(result.max_batch_size)
            assert result.num_trials == 1 and result.num_ooms == 0 and trial.fits
            assert result.predicted_peaks[result.max_batch_size] == trial.peak_reserved_bytes
            assert result.smallest_failure == result.max_batch_size + 1
            above = bf.try_batch_size(model, dataset, result.max_batch_size + 1, optimizer=optimizer,
                                      device=bf.SimulatedGPU(capacity))
            assert not above.fits  # what the confirmed prediction said of the size it did not try
        else:
            assert result.stop_reason == StopReason.DATASET_LENGTH and result.max_batch_size == len(dataset)
        assert result.predicted_max_batch_size == result.max_batch_size
        assert result.prediction_status == "exact" and result.predicted_peaks
        if compare:
            reference = bf.find_batch_size(model, dataset, optimizer=optimizer, device=bf.SimulatedGPU(capacity), mode="binsearch")
            # On the caching allocator "fits" is not monotone in the batch size (segments pack differently), so two
            # searches can close different brackets; each is exact (B fits, B+1 does not) and they lie close.
            assert abs(result.max_batch_size - reference.max_batch_size) <= 0.02 * reference.max_batch_size
            assert result.num_trials < reference.num_trials
            ideal = bf.SimulatedGPU(capacity, allocator="ideal")  # allocated bytes alone are monotone: the same size
            exact = bf.find_batch_size(model, dataset, optimizer=optimizer, device=ideal, mode="guided")
            assert exact.max_batch_size == bf.find_batch_size(
                model, dataset, optimizer=optimizer, device=bf.SimulatedGPU(capacity, allocator="ideal"), mode="binsearch"
            ).max_batch_size
    assert sum(trials_per_search) / len(trials_per_search) <= 4
    assert max(trials_per_search) <= 2


class ReadsValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().max()) > 1e6:  # reads a value: fake tensors cannot run this
            x = x / 1e6
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_model_fake_tensors_cannot_run_is_predicted_from_a_recorded_trial():
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(6000, 64), torch.randint(0, 4, (6000,)))
    device = bf.SimulatedGPU("4MiB")
    guided = bf.find_batch_size(ReadsValues(), dataset, optimizer=torch.optim.SGD, device=device, mode="guided")
    reference = bf.find_batch_size(ReadsValues(), dataset, optimizer=torch.optim.SGD, device=device, mode="binsearch")
    assert guided.max_batch_size == reference.max_batch_size and guided.num_trials == 1 and guided.num_ooms == 0
    assert guided.prediction_method.startswith("one recorded trial") and guided.prediction_status == "exact"


def test_a_guided_search_checks_the_model_with_its_recorded_trial_not_an_extra_step():
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(6000, 64), torch.randint(0, 4, (6000,)))
    sizes: dict[str, list[int]] = {"guided": [], "binsearch": []}

    def counting(mode: str):
        def step(model: nn.Module, batch: list) -> torch.Tensor:
            sizes[mode].append(len(batch[0]))
            return nn.functional.cross_entropy(model(batch[0]), batch[1])
        return step

    model = ReadsValues()
    for mode in sizes:
        result = bf.find_batch_size(model, dataset, optimizer=torch.optim.SGD, step_fn=counting(mode),
                                    device=bf.SimulatedGPU("4MiB"), mode=mode, confirm_steps=0)
        if mode == "guided":
            guided = result
    # binsearch: a plain check at 2, then its trials; guided: the recorded trial (2, then 3) is the check.
    assert sizes["binsearch"][:3] == [2, result.trials[0].batch_size, result.trials[0].batch_size]
    assert sizes["guided"] == [2, 3, guided.max_batch_size, guided.max_batch_size] and guided.num_trials == 1


def test_guided_without_an_estimate_uses_measured_peaks(caplog, monkeypatch):
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(6000, 64), torch.randint(0, 4, (6000,)))
    model = ReadsValues()
    # No recorded trial (as on a real GPU) and a model fake tensors cannot run: no prediction at all.
    monkeypatch.setattr(TrialSession, "record_allocations", lambda self, sizes=(2, 3): None)
    with caplog.at_level(logging.WARNING, logger="batchfinder"):
        # Allocated bytes only: smooth measured peaks that a line through them can steer by.
        guided = bf.find_batch_size(model, dataset, optimizer=torch.optim.SGD, device=bf.SimulatedGPU("4MiB", allocator="ideal"), mode="guided")
    assert "estimator cannot trace" in caplog.text
    reference = bf.find_batch_size(model, dataset, optimizer=torch.optim.SGD, device=bf.SimulatedGPU("4MiB", allocator="ideal"), mode="binsearch")
    assert guided.max_batch_size == reference.max_batch_size
    assert guided.num_trials < reference.num_trials
    assert guided.prediction_status == "unavailable"


def test_guided_is_registered_without_import_side_effects():
    # One registry, complete as soon as it is imported (nothing registers a mode as a side effect elsewhere).
    code = "import batchfinder.engine.modes as m; print(sorted(m.MODES))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['binsearch', 'guided', 'power']"
    with pytest.raises(ValueError, match="guided"):
        bf.find_batch_size(nn.Linear(2, 2), TensorDataset(torch.randn(4, 2)), device=bf.SimulatedGPU("1MiB"), mode="guidd")
