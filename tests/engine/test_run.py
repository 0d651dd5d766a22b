"""The one search entry (batchfinder.engine.run): what a whole call shows the user."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchfinder as bf
from tests.helpers import classification_data


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
