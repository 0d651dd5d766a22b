"""Compiled models and activation checkpointing, as people train them."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import TensorDataset

import batchfinder as bf


class Deep(nn.Module):
    """Four wide blocks; with ``checkpointing`` each block's activations are recomputed in the backward pass."""

    def __init__(self, checkpointing: str | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 64)) for _ in range(4))
        self.head = nn.Linear(64, 10)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing == "non-reentrant":
                x = x + checkpoint(block, x, use_reentrant=False)
            elif self.checkpointing == "reentrant":
                x = x + checkpoint(block, x, use_reentrant=True)
            else:
                x = x + block(x)
        return self.head(x)


def _data(n: int = 4096) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 64, generator=generator), torch.randint(0, 10, (n,), generator=generator))


def test_a_compiled_model_is_searched_through_its_original_module_without_compiling():
    torch.manual_seed(0)
    model = Deep()
    compiled = torch.compile(model, backend="eager")
    data = _data()
    torch._dynamo.reset()
    found = bf.find_batch_size(compiled, data, device=bf.SimulatedGPU("16MiB"), confirm_steps=0)
    assert torch._dynamo.utils.counters["frames"]["total"] == 0  # nothing was compiled during the search
    plain = bf.find_batch_size(model, data, device=bf.SimulatedGPU("16MiB"), confirm_steps=0)
    assert found.max_batch_size == plain.max_batch_size
    assert any(note.startswith("torch.compile: the original (uncompiled) module was searched") for note in found.notes)
    assert "note: torch.compile" in str(found) and found.as_dict()["notes"] == found.notes
    # The compiled model trains at the size found.
    x, y = data.tensors
    loss = nn.functional.cross_entropy(compiled(x[: found.batch_size]), y[: found.batch_size])
    loss.backward()
    assert torch._dynamo.utils.counters["frames"]["total"] >= 1


def test_non_reentrant_checkpointing_fits_more_and_is_estimated_exactly():
    torch.manual_seed(0)
    data = _data(16_384)
    plain = bf.find_batch_size(Deep(), data, device=bf.SimulatedGPU("32MiB", allocator="ideal"), confirm_steps=0)
    torch.manual_seed(0)
    checkpointed = Deep("non-reentrant")
    result = bf.find_batch_size(checkpointed, data, device=bf.SimulatedGPU("32MiB", allocator="ideal"), confirm_steps=0)
    assert result.max_batch_size > 2 * plain.max_batch_size and not result.notes
    trial = bf.try_batch_size(checkpointed, data, 1000, device=bf.SimulatedGPU("1GiB", allocator="ideal"))
    assert trial.peak_bytes == bf.estimate_memory(checkpointed, data, 1000).peak


@pytest.mark.parametrize("mode", ["binsearch", "guided"])  # guided: the model check is the recorded trial
def test_reentrant_checkpointing_that_computes_no_gradients_is_warned_about(caplog, mode):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="batchfinder"):
        result = bf.find_batch_size(
            Deep("reentrant"), _data(), device=bf.SimulatedGPU("16MiB"), confirm_steps=0, mode=mode
        )
    assert any("computes no gradients" in note for note in result.notes)
    assert any("use_reentrant=False" in record.getMessage() for record in caplog.records)


def test_a_backward_pass_that_ran_out_of_memory_does_not_keep_its_activations():
    """resnet50 at 16 runs out of memory inside loss.backward() on 1.5 GiB: the autograd engine keeps that graph (1.27
    GB of activations) until the next backward on its thread, so without a flush every later trial failed too."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    data = TensorDataset(torch.randn(16, 3, 224, 224), torch.randint(0, 10, (16,)))
    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("1536MiB"), confirm_steps=0, max_trials=2)
    first, second = result.trials
    assert (first.batch_size, first.fits, second.batch_size, second.fits) == (16, False, 8, True)
    assert first.leaked_bytes == 0
