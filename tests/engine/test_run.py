"""The one search entry (batchfinder/engine/run.py): ``search`` and ``run_trial`` called directly with a
``Workload`` and ``SearchOptions``, as every front end calls them, and what a whole call shows the user."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchfinder as bf
from batchfinder.engine.options import SearchOptions
from batchfinder.engine.run import run_trial, search
from batchfinder.engine.workload import Workload
from batchfinder.search.strategies import StopReason
from batchfinder.training.batching import BatchSource
from batchfinder.training.optimizers import resolve_optimizer
from batchfinder.training.steps import make_step
from tests.helpers import MLP, WideOutput, assert_unchanged, classification_data, snapshot


def _workload(model: nn.Module | None = None, n: int = 20_000) -> Workload:
    model = model if model is not None else MLP()
    data = classification_data(n, (64,), 10)
    return Workload(model, BatchSource(data), make_step(), resolve_optimizer(torch.optim.Adam, model))


def test_search_brackets_the_largest_size_and_recommends_the_safety_share():
    workload = _workload()
    result = search(workload, bf.SimulatedGPU("4MiB"), SearchOptions())
    fitted = [t.batch_size for t in result.trials if t.fits]
    failed = [t.batch_size for t in result.trials if not t.fits]
    assert result.max_batch_size == max(fitted)
    assert result.smallest_failure == min(failed) == result.max_batch_size + 1
    assert result.stop_reason is StopReason.BRACKET_CLOSED
    assert result.batch_size == int(0.8 * result.max_batch_size)
    assert result.trials[0].batch_size == 16  # the default first size, then doubling
    assert [t.batch_size for t in result.trials[:3]] == [16, 32, 64]


def test_search_leaves_the_workloads_model_as_it_was():
    workload = _workload()
    before = snapshot(workload.model)
    search(workload, bf.SimulatedGPU("4MiB"), SearchOptions(mode="power"))
    assert_unchanged(before, workload.model)


def test_options_change_what_search_does():
    workload = _workload()
    capped = search(workload, bf.SimulatedGPU("4MiB"), SearchOptions(max_batch_size=100, safety=0.5, multiple_of=8))
    assert capped.max_batch_size == 100 and capped.stop_reason is StopReason.MAX_BATCH_SIZE
    assert capped.batch_size == 48  # floor(0.5 x 100) = 50, rounded down to a multiple of 8
    few = search(workload, bf.SimulatedGPU("4MiB"), SearchOptions(max_trials=2, confirm_steps=0))
    assert len(few.trials) == 2 and few.stop_reason is StopReason.MAX_TRIALS


def test_a_plan_toward_a_target_batch_size_is_part_of_the_result():
    workload = _workload()
    result = search(workload, bf.SimulatedGPU("4MiB"), SearchOptions(target_batch_size=40_000, max_batch_size=4_000))
    assert result.micro_batch_size * result.accumulation_steps >= 40_000
    assert result.micro_batch_size <= result.batch_size


def test_search_validates_its_options_before_any_trial():
    workload = _workload()
    device = bf.SimulatedGPU("4MiB")
    with pytest.raises(ValueError, match="safety"):
        search(workload, device, SearchOptions(safety=1.5))
    assert device.max_memory_allocated() == 0


def test_run_trial_measures_one_size_and_refuses_more_samples_than_the_data_has():
    workload = _workload(n=5_000)
    trial = run_trial(workload, bf.SimulatedGPU("4MiB"), SearchOptions(), 256)
    assert trial.batch_size == 256 and trial.fits and trial.peak_bytes > 0
    too_large = run_trial(workload, bf.SimulatedGPU("4MiB"), SearchOptions(), 4_000)
    assert too_large.fits is False
    with pytest.raises(ValueError, match="larger than the dataset"):
        run_trial(workload, bf.SimulatedGPU("4MiB"), SearchOptions(), 5_001)


class WarnsInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("the user's own forward warns", UserWarning)
        return self.linear(x)


@pytest.mark.parametrize("call", ["find", "try"])
def test_a_warning_of_the_users_forward_is_shown_once_per_call(call: str) -> None:
    torch.manual_seed(0)
    data = classification_data(256, (8,), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning that reaches the user is counted
        if call == "find":
            bf.find_batch_size(WarnsInForward(), data, optimizer=torch.optim.SGD, device="sim:4MiB")
        else:
            bf.try_batch_size(WarnsInForward(), data, 64, optimizer=torch.optim.SGD, device="sim:4MiB")
    assert [str(w.message) for w in caught].count("the user's own forward warns") == 1


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_call_inside_no_grad_or_inference_mode_trains_with_gradients_and_leaves_the_mode(mode) -> None:
    torch.manual_seed(0)
    data = classification_data(512, (8,), 2)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    reference = bf.find_batch_size(model, data, optimizer=torch.optim.SGD, device="sim:4MiB")
    with mode():
        inside = bf.find_batch_size(model, data, optimizer=torch.optim.SGD, device="sim:4MiB")
        assert not torch.is_grad_enabled()
    assert inside.max_batch_size == reference.max_batch_size


def test_evaluation_search_progress_has_its_own_heading(capsys) -> None:
    from batchfinder.engine.options import SearchOptions
    from batchfinder.engine.run import search
    from batchfinder.engine.workload import Workload
    from batchfinder.training.batching import BatchSource
    from batchfinder.training.optimizers import resolve_optimizer
    from batchfinder.training.steps import make_step

    torch.manual_seed(0)
    data = classification_data(512, (8,), 2)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    step = make_step()
    workload = Workload(
        model, BatchSource(data), step, resolve_optimizer(torch.optim.SGD, model),
        eval_step=lambda m, batch: step(m, batch), eval_source=BatchSource(data), search_evaluation=True,
    )
    search(workload, bf.SimulatedGPU("4MiB"), SearchOptions(progress=True, confirm_steps=0))
    lines = capsys.readouterr().err.splitlines()
    headings = [i for i, line in enumerate(lines) if line.startswith("searching ")]
    assert [lines[i].split()[1] for i in headings] == ["training", "evaluation"]
    assert all(lines[i + 1].startswith("trial  1:") for i in headings)  # each list counts from its heading


def test_an_inference_search_where_nothing_fits_gives_no_optimizer_advice():
    data = classification_data(64, (8,), 2)
    with pytest.raises(bf.NoBatchSizeFitsError, match="Use a larger GPU, mixed precision, or a smaller model") as info:
        bf.find_batch_size(WideOutput(), data, device="sim:4MiB", train=False)
    assert "optimizer" not in str(info.value)
    with pytest.raises(bf.NoBatchSizeFitsError, match="an optimizer with less state"):
        bf.find_batch_size(WideOutput(), data, device="sim:4MiB", loss_fn=lambda output, target: output.mean())
