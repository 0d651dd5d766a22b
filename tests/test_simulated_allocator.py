"""The simulated GPU with ``allocator="caching"``: PyTorch's caching allocator behind real CPU tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf

MiB = 2**20


def test_reserved_memory_comes_in_segments_and_stays_cached():
    gpu = bf.SimulatedGPU("64MiB", allocator="caching")
    with gpu:
        x = torch.zeros(1000)  # 4,000 B -> one 4,096 B block of a 2 MiB small-pool segment
        assert (gpu.memory_allocated(), gpu.memory_reserved()) == (4096, 2 * MiB)
        y = torch.zeros(3 * MiB // 4)  # 3 MiB -> a 20 MiB segment
        assert gpu.memory_reserved() == 22 * MiB
        del y
        assert gpu.memory_allocated() == 4096 and gpu.memory_reserved() == 22 * MiB  # cached, not returned
        assert gpu.mem_get_info() == (64 * MiB - 22 * MiB, 64 * MiB)
        gpu.empty_cache()
        assert gpu.memory_reserved() == 2 * MiB  # the wholly free segment went back; x's segment stays
        assert gpu.max_memory_reserved() == 22 * MiB
        del x


def test_fragmentation_runs_out_of_memory_below_the_capacity():
    def fragment(gpu: bf.SimulatedGPU) -> list[torch.Tensor]:
        # 12 blocks of 5 MiB fill three 20 MiB segments; freeing every other one leaves 5 MiB holes only.
        blocks = [torch.zeros(5 * MiB, dtype=torch.uint8) for _ in range(12)]
        return blocks[::2]

    caching = bf.SimulatedGPU("64MiB", allocator="caching")
    with caching:
        kept = fragment(caching)
        assert caching.memory_allocated() == 30 * MiB and caching.memory_reserved() == 60 * MiB
        with pytest.raises(torch.OutOfMemoryError, match=r"reserved by PyTorch but unallocated") as info:
            torch.zeros(8 * MiB, dtype=torch.uint8)  # 38 MiB would be allocated: far below 64 MiB
        assert "30.00 MiB is allocated by PyTorch, and 30.00 MiB is reserved" in str(info.value)
        assert caching.memory_allocated() == 30 * MiB  # the failed request is not charged
        del kept
    ideal = bf.SimulatedGPU("64MiB")
    with ideal:
        kept = fragment(ideal)
        torch.zeros(8 * MiB, dtype=torch.uint8)  # allocated bytes alone: it fits
        del kept


def test_searches_on_the_caching_allocator_fit_no_more_than_on_allocated_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    data = TensorDataset(torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,)))
    ideal = bf.find_batch_size(model, data, device=bf.SimulatedGPU("32MiB"))
    caching = bf.find_batch_size(model, data, device=bf.SimulatedGPU("32MiB", allocator="caching"))
    assert caching.max_batch_size < ideal.max_batch_size
    assert all(t.peak_reserved_bytes >= t.peak_bytes for t in caching.trials)
    assert any(t.peak_reserved_bytes > t.peak_bytes for t in caching.trials)
    assert all(t.peak_reserved_bytes == t.peak_bytes for t in ideal.trials)
    largest = caching.trial_for(caching.max_batch_size)
    assert largest is not None and largest.peak_reserved_bytes <= 32 * MiB
    assert "caching allocator" in caching.device


def test_an_unknown_allocator_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"allocator='cuda' .*\['ideal', 'caching'\]"):
        bf.SimulatedGPU("1GiB", allocator="cuda")


def test_a_simulated_gpu_like_a_real_one():
    from batchfinder.gpus import CUBLAS_WORKSPACE_BYTES, CUBLAS_WORKSPACE_BYTES_HOPPER, CUDA_CONTEXT_BYTES, lookup_gpu

    a100 = bf.SimulatedGPU.like("A100-40GB")
    assert a100.capacity_bytes == lookup_gpu("A100-40GB").memory_bytes - CUDA_CONTEXT_BYTES
    assert "like A100-40GB" in a100.name and "caching allocator" in a100.name
    workspace = -(-CUBLAS_WORKSPACE_BYTES // 512) * 512
    with a100:
        model, x = nn.Linear(8, 8), torch.randn(4, 8)
        before = a100.memory_allocated()
        out = model(x)  # the first matrix multiply of the forward pass creates its cuBLAS workspace
        assert a100.memory_allocated() - before == workspace + 512
        out.sum().backward()  # and the backward pass, on autograd's handle, one more
        assert sorted(a100.ledger.workspaces) == ["backward", "forward"]
        assert a100.memory_allocated() >= before + 2 * workspace
        model(x).sum().backward()  # no further workspace
        assert len(a100.ledger.workspaces) == 2
    h100 = bf.SimulatedGPU.like("H100")
    assert h100.ledger.workspace_bytes == CUBLAS_WORKSPACE_BYTES_HOPPER


def test_trials_on_a_gpu_like_device_count_the_workspaces_in_the_baseline_not_as_a_leak():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    data = TensorDataset(torch.randn(256, 32), torch.randint(0, 4, (256,)))
    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU.like("T4"), max_trials=3)
    first = result.trials[0]
    assert first.leaked_bytes == 0
    assert first.baseline_bytes >= 2 * 8_519_680  # both workspaces were there before the first trial
    assert first.peak_reserved_bytes >= first.peak_bytes


def test_like_refuses_unknown_gpus_and_impossible_contexts():
    with pytest.raises(ValueError, match="known GPUs: .*A100-40GB"):
        bf.SimulatedGPU.like("Voodoo 3")
    with pytest.raises(ValueError, match="the CUDA context must be smaller than the GPU"):
        bf.SimulatedGPU.like("T4", context_bytes=64 * 2**30)


def test_a_confirmation_run_reports_its_reserved_peak_and_lowers_a_size_that_does_not_hold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    data = TensorDataset(torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,)))
    gpu = bf.SimulatedGPU("32MiB", allocator="caching")
    result = bf.find_batch_size(model, data, device=gpu, confirm_steps=5)
    (confirmation,) = result.confirmations
    assert confirmation.fits and confirmation.steps == 5 and confirmation.batch_size == result.batch_size
    assert result.confirmed_reserved_fraction == confirmation.peak_reserved_bytes / (32 * MiB) <= 1
    assert "confirmed: 5 steps at" in str(result) and result.as_dict()["confirmations"][0]["steps"] == 5

    # Memory that grows from step to step (a cache the step keeps): the trials' 2 steps fit, 6 steps do not.
    held: list[tuple[torch.Tensor, torch.Tensor]] = []

    def growing(m: nn.Module, batch: object) -> torch.Tensor:
        x, y = batch  # type: ignore[misc]
        if held and held[0][0] is not x:  # a new trial (a new batch): what the last one held goes
            held.clear()
        held.append((x, torch.zeros(len(x), 512)))  # 2 KiB per sample and step, kept for the rest of the trial
        return nn.functional.cross_entropy(m(x), y)

    lowered = bf.find_batch_size(model, data, device=bf.SimulatedGPU("32MiB", allocator="caching"), step_fn=growing,
                                 confirm_steps=4)
    assert len(lowered.confirmations) >= 2 and not lowered.confirmations[0].fits and lowered.confirmations[-1].fits
    assert lowered.batch_size == lowered.confirmations[-1].batch_size < lowered.confirmations[0].batch_size
    assert "lowered" in str(lowered)
