"""The search modes (batchfinder/engine/modes.py): mode="guided" on the simulated GPU finds what binsearch finds in a
few trials, predicts from a recorded trial where fake tensors cannot run the model, and steers by measured peaks
without a prediction; its limit per device; one registry of the modes."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.engine.modes import _guided_limit
from batchfinder.engine.trial import TrialSession
from batchfinder.search.strategies import StopReason
from tests.helpers import TinyTransformer, make_case

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
def _encoder_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    return TinyTransformer(layers=1, classes=5), TensorDataset(torch.randint(0, 100, (900, 16), generator=g), torch.randint(0, 5, (900,), generator=g))


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


def test_guided_without_an_estimate_uses_measured_peaks_and_says_why(monkeypatch):
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(6000, 64), torch.randint(0, 4, (6000,)))
    model = ReadsValues()
    # No recorded trial (as on a real GPU) and a model fake tensors cannot run: no prediction at all.
    monkeypatch.setattr(TrialSession, "record_allocations", lambda self, sizes=(2, 3): None)
    with pytest.warns(UserWarning, match="could not trace this model") as caught:
        # Allocated bytes only: smooth measured peaks that a line through them can steer by.
        guided = bf.find_batch_size(model, dataset, optimizer=torch.optim.SGD, device=bf.SimulatedGPU("4MiB", allocator="ideal"), mode="guided")
    assert len([w for w in caught if "could not trace" in str(w.message)]) == 1  # once per call
    # The report says why there is no prediction: the first line of the estimator's error.
    line = next(line for line in str(guided).splitlines() if "prediction:" in line)
    assert line.startswith("  prediction: unavailable (the estimator could not trace the model: ") and "Error" in line
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
