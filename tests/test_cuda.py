"""The real CUDA backend: runs where CUDA is present, skips cleanly otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from conftest import MLP, assert_unchanged, snapshot

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _data(n: int = 20_000) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_cuda_device_reads_real_statistics():
    device = bf.CudaDevice("cuda")
    before = device.memory_allocated()
    x = torch.empty(1024 * 1024, device="cuda")
    assert device.memory_allocated() >= before + 4 * 1024 * 1024
    assert device.capacity_bytes == torch.cuda.get_device_properties(0).total_memory
    del x


def test_search_on_cuda_with_a_memory_limit_moves_a_cpu_model_and_puts_it_back():
    model = MLP(hidden=4096)
    before = snapshot(model)
    cpu_storage = model.net[1].weight.data_ptr()
    result = bf.find_batch_size(model, _data(), device="cuda", memory_limit="1GiB", max_trials=12)
    assert result.max_batch_size >= 16
    assert model.net[1].weight.device.type == "cpu" and model.net[1].weight.data_ptr() == cpu_storage
    assert_unchanged(before, model)
    trial = bf.try_batch_size(model, _data(), result.max_batch_size, device="cuda", memory_limit="1GiB")
    assert trial.fits and trial.peak_bytes > 0


def test_search_on_cuda_finds_an_oom_and_recovers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8192), nn.ReLU(), nn.Linear(8192, 10)).cuda()
    before = snapshot(model)
    baseline = torch.cuda.memory_allocated()
    result = bf.find_batch_size(model, _data(200_000), device="cuda", memory_limit="512MiB")
    assert result.num_ooms >= 1
    assert result.trial_for(result.max_batch_size).fits
    assert all(t.leaked_bytes == 0 for t in result.trials)
    assert torch.cuda.memory_allocated() == baseline
    assert_unchanged(before, model)


def test_simulated_gpu_refuses_a_cuda_model():
    model = MLP().cuda()
    with pytest.raises(ValueError, match="SimulatedGPU runs the model on the CPU"):
        bf.find_batch_size(model, _data(100), device=bf.SimulatedGPU("8MiB"))
