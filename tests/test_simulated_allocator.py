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
