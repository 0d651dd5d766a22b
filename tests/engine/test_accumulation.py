"""Gradient accumulation measured as it will run (batchfinder.engine.accumulation): the plan toward
target_batch_size is tried with the gradients kept between micro-batches, and lowered until it fits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.engine.options import SearchOptions
from batchfinder.engine.run import search
from batchfinder.engine.trial import TrialSession
from batchfinder.engine.workload import Workload
from batchfinder.search.accumulation import plan_accumulation
from batchfinder.training.batching import BatchSource
from batchfinder.training.optimizers import resolve_optimizer
from batchfinder.training.steps import make_step
from tests.helpers import assert_unchanged, classification_data, snapshot


class EmbeddingClassifier(nn.Module):
    """Token ids -> a large embedding with a dense gradient -> mean -> a small head (the issue's shape, scaled)."""

    def __init__(self, vocab: int = 25_000, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def _train_with_accumulation(model: nn.Module, data: TensorDataset, capacity: str, micro: int, steps: int) -> str | None:
    """Two optimizer steps of a plain training loop with real accumulation on a fresh simulated GPU: None when it
    fits, else the out-of-memory message."""
    gpu = bf.SimulatedGPU(capacity)
    optimizer = _sgd(model.parameters())
    try:
        with gpu:
            for _ in range(2):
                for index in range(steps):
                    tokens, labels = gpu.to_device(data[index * micro:(index + 1) * micro])
                    loss = F.cross_entropy(model(tokens), labels) / steps
                    loss.backward()
                    del loss, tokens, labels
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError as exc:
        return str(exc).splitlines()[0]
    return None


@pytest.mark.slow
def test_plan_of_a_large_dense_gradient_trains_with_real_accumulation_on_the_same_simulated_gpu():
    """The issue's case at an eighth of its size: a 6.1 MiB embedding with a dense gradient on a 40 MiB simulated GPU.
    The recommended size fits on its own but not with a second micro-batch (the first one's gradients still held):
    the plan the search returns must train with real accumulation."""
    torch.manual_seed(0)
    model = EmbeddingClassifier()
    data = TensorDataset(torch.randint(0, 25_000, (40_000, 2)), torch.randint(0, 10, (40_000,)))
    before = snapshot(model)
    result = bf.find_batch_size(model, data, optimizer=_sgd, device="sim:40MiB", target_batch_size=54_000)
    assert_unchanged(before, model)
    micro, steps = result.micro_batch_size, result.accumulation_steps
    assert steps > 1 and micro * steps >= 54_000
    # Without the accumulation check the plan would have been this one, which runs out of memory when trained:
    unchecked = plan_accumulation(54_000, result.batch_size)
    assert _train_with_accumulation(model, data, "40MiB", unchecked.micro_batch_size, unchecked.accumulation_steps)
    assert micro < unchecked.micro_batch_size
    assert _train_with_accumulation(model, data, "40MiB", micro, steps) is None
    last = result.accumulation_trials[-1]
    assert last.fits and last.batch_size == micro and last.micro_batches == steps
    assert not result.accumulation_trials[0].fits
    assert any("with gradient accumulation" in note for note in result.notes)
    assert "accumulation measured" in str(result)


class CountingGPU(bf.SimulatedGPU):
    """A simulated GPU that counts the batches moved to it."""

    moved = 0

    def to_device(self, batch: Any) -> Any:
        self.moved += 1
        return super().to_device(batch)


def _session(model: nn.Module, data: Any, optimizer: Any) -> TrialSession:
    return TrialSession(model, BatchSource(data), make_step(), optimizer, CountingGPU("64MiB", allocator="ideal"))


def test_an_accumulating_trial_holds_the_gradients_while_the_next_micro_batch_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 4))  # 1 MiB of gradients
    data = classification_data(64, (256,), 4)
    steps_taken: list[int] = []

    def counting_sgd(params: Any) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(params, lr=0.1)
        optimizer.register_step_post_hook(lambda *_: steps_taken.append(1))
        return optimizer

    forwards: list[int] = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    with _session(model, data, resolve_optimizer(counting_sgd, model)) as session:
        forwards.clear()
        plain = session.run(32)
        assert (len(forwards), len(steps_taken)) == (2, 2)
        forwards.clear()
        steps_taken.clear()
        session.device.moved = 0
        accumulated = session.run(32, accumulation=3)
        moved = session.device.moved
    assert (len(forwards), len(steps_taken)) == (6, 2)  # three micro-batches per optimizer step
    assert moved == 1 + 2 * 2  # every later micro-batch of each step moved to the device anew, as a loop moves it
    assert accumulated.micro_batches == 3 and accumulated.steps == 2
    gradients = sum(p.numel() * 4 for p in model.parameters())
    assert accumulated.peak_bytes - plain.peak_bytes >= 0.95 * gradients  # the first micro-batch's gradients, held
    assert accumulated.samples_per_second is not None


def test_a_target_reached_by_one_micro_batch_runs_no_accumulation_trial():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    result = bf.find_batch_size(model, classification_data(512, (32,), 4), optimizer=_sgd, device="sim:64MiB",
                                target_batch_size=64)
    assert (result.micro_batch_size, result.accumulation_steps) == (64, 1)
    assert result.accumulation_trials == []


def test_the_users_own_accumulation_is_measured_without_a_target():
    """A front end whose training already accumulates (Lightning's accumulate_grad_batches, the Trainer's
    gradient_accumulation_steps) gets its recommendation measured with that accumulation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    data = classification_data(512, (32,), 4)
    workload = Workload(model, BatchSource(data), make_step(), resolve_optimizer(_sgd, model), accumulation_steps=4)
    result = search(workload, bf.SimulatedGPU("64MiB"), SearchOptions(confirm_steps=0))
    assert result.target_batch_size is None
    assert (result.accumulation_steps, result.micro_batch_size) == (4, result.batch_size)
    trial = result.accumulation_trials[-1]
    assert trial.fits and trial.micro_batches == 2  # without confirm_steps: two micro-batches show the steady state
    assert "gradient accumulation: micro-batch" in str(result)
