"""The real CUDA backend: runs where CUDA is present, skips cleanly otherwise."""

from __future__ import annotations

import pytest
import torch
from conftest import MLP, assert_unchanged, snapshot
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.devices.cuda import CudaDevice

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _data(n: int = 20_000) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _warm_up_cublas() -> None:
    """Run the matrix multiplies whose workspaces outlive them before a test takes a memory baseline.

    cuBLAS (and cuBLASLt, used for addmm with a bias) allocate a workspace through PyTorch's caching allocator on
    the first multiply of each handle and keep it for the life of the process, so it counts in memory_allocated().
    Handles are per thread: the forward pass multiplies on this thread, the backward pass on autograd's device
    thread, each with its own workspace. In a fresh process the first search would otherwise be blamed for them.
    No random numbers: the CUDA RNG must stay as it is.
    """
    x = torch.ones(16, 16, device="cuda", requires_grad=True)
    w = torch.ones(16, 16, device="cuda", requires_grad=True)
    b = torch.ones(16, device="cuda", requires_grad=True)
    (nn.functional.linear(x, w, b) @ w).sum().backward()
    del x, w, b
    torch.cuda.synchronize()


def test_cuda_device_reads_real_statistics():
    device = CudaDevice("cuda")
    assert device.torch_device.type == "cuda"
    torch.cuda.synchronize()
    before = device.memory_allocated()
    x = torch.empty(1024 * 1024, device="cuda")  # 4 MiB, a multiple of the allocator's 512-byte rounding
    assert device.memory_allocated() == before + 4 * 1024 * 1024
    device.reset_peak_memory_stats()
    del x
    assert device.memory_allocated() == before
    assert device.max_memory_allocated() == before + 4 * 1024 * 1024

    # The capacity against an independent source: the total of cudaMemGetInfo (the implementation reads the device
    # properties). The driver normally reports the same figure through both; 64 MiB of tolerance allows for a
    # difference in rounding and stays well below the CUDA context (300+ MiB), so free memory passed off as the
    # capacity would still fail.
    free, total = torch.cuda.mem_get_info(device.torch_device)
    assert abs(device.capacity_bytes - total) <= 64 * 1024**2
    assert device.capacity_bytes > free
    assert CudaDevice("cuda", memory_limit="1GiB").capacity_bytes == 2**30


def test_search_on_cuda_with_a_memory_limit_moves_a_cpu_model_and_puts_it_back():
    model = MLP(hidden=4096)
    torch.cuda.init()  # so that the snapshot holds the CUDA RNG state (the model's dropout draws from it)
    before = snapshot(model)
    cpu_storage = model.net[1].weight.data_ptr()
    result = bf.find_batch_size(model, _data(), device="cuda", memory_limit="1GiB", max_trials=12)
    assert result.max_batch_size >= 16
    assert result.capacity_bytes == 2**30
    assert all(t.peak_bytes <= 2**30 for t in result.trials if t.fits)
    assert model.net[1].weight.device.type == "cpu" and model.net[1].weight.data_ptr() == cpu_storage
    assert_unchanged(before, model)
    trial = bf.try_batch_size(model, _data(), result.max_batch_size, device="cuda", memory_limit="1GiB")
    assert trial.fits and trial.baseline_bytes > 0 and trial.baseline_bytes < trial.peak_bytes <= 2**30


def test_search_on_cuda_finds_an_oom_and_recovers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8192), nn.ReLU(), nn.Linear(8192, 10)).cuda()
    _warm_up_cublas()  # its workspaces stay allocated: take the baseline after them
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
