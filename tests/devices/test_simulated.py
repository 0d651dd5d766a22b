"""The simulated GPU (batchfinder/devices/simulated.py): what it charges, when, and how it runs out of memory; its
default ``allocator="caching"``, PyTorch's caching allocator behind real CPU tensors; and GPUs it can be like."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import batchfinder as bf
from batchfinder import is_oom_error
from batchfinder.devices.base import DeviceBackend
from tests.helpers import MLP

MiB = 2**20


def test_storages_are_rounded_to_512_bytes_and_released_when_freed():
    gpu = bf.SimulatedGPU("1MiB", allocator="ideal")
    with gpu:
        x = torch.zeros(1000)  # 4,000 B -> 4,096 B
        assert gpu.memory_allocated() == 4096
        y = torch.ones(1)  # 4 B -> 512 B
        assert gpu.memory_allocated() == 4096 + 512
        del x
        gc.collect()
        assert gpu.memory_allocated() == 512
        del y
    assert gpu.memory_allocated() == 0
    assert gpu.max_memory_allocated() == 4096 + 512


def test_views_cost_nothing_and_in_place_operations_reuse_the_storage():
    gpu = bf.SimulatedGPU("1MiB", allocator="ideal")
    with gpu:
        x = torch.zeros(256, 4)  # 4 KiB
        assert gpu.memory_allocated() == 4096
        v = x[:, 1:].transpose(0, 1)
        w = x.view(1024)[10:20]
        x.add_(1.0)
        assert gpu.memory_allocated() == 4096
        s = v.sum()  # one new 4-byte storage: 512 B
        assert gpu.memory_allocated() == 4096 + 512
        del v, w, s


def test_out_of_memory_is_raised_in_cuda_format_and_the_failed_allocation_is_not_charged():
    gpu = bf.SimulatedGPU("64KiB", allocator="ideal")
    with gpu:
        keep = torch.zeros(8 * 1024)  # 32 KiB
        with pytest.raises(torch.OutOfMemoryError) as info:
            torch.zeros(16 * 1024)  # 64 KiB more: does not fit
        assert gpu.memory_allocated() == 32 * 1024
        again = torch.zeros(4 * 1024)  # 16 KiB still fits
    message = str(info.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 64.00 KiB.")
    assert "total capacity of 64.00 KiB of which 32.00 KiB is free" in message
    assert is_oom_error(info.value)
    del keep, again


def test_pre_existing_tensors_are_charged_when_first_consumed():
    weights = torch.randn(1024)  # made outside: not charged yet
    gpu = bf.SimulatedGPU("1MiB", allocator="ideal")
    with gpu:
        assert gpu.memory_allocated() == 0
        total = weights.sum()  # consumes weights (4 KiB) and makes a scalar (512 B)
        assert gpu.memory_allocated() == 4096 + 512
        weights.sum()
        assert gpu.memory_allocated() == 4096 + 512  # charged once
    del total
    gc.collect()
    assert gpu.memory_allocated() == 4096  # still alive: still charged
    del weights
    gc.collect()
    assert gpu.memory_allocated() == 0


def test_dataloader_batches_are_not_charged_until_used():
    data = TensorDataset(torch.randn(64, 256), torch.randint(0, 3, (64,)))
    gpu = bf.SimulatedGPU("1MiB", allocator="ideal")
    with gpu:
        for inputs, targets in DataLoader(data, batch_size=32):
            assert gpu.memory_allocated() == 0  # collation is host-side
            doubled = inputs.mul(2)  # the batch is consumed: 32 KiB in, 32 KiB out
            assert gpu.memory_allocated() == 2 * 32 * 256 * 4
            del doubled
            break


def test_peak_and_reset_like_torch_cuda():
    gpu = bf.SimulatedGPU("1MiB", allocator="ideal")
    with gpu:
        a = torch.zeros(25600)  # 100 KiB
        del a
        gc.collect()
        assert gpu.max_memory_allocated() == 102400
        gpu.reset_peak_memory_stats()
        assert gpu.max_memory_allocated() == 0
        b = torch.zeros(128)
        assert gpu.max_memory_allocated() == 512
    del b


def test_training_step_under_the_context_manager_charges_weights_gradients_and_adam_state():
    model = torch.nn.Linear(100, 100)  # 10,100 parameters: weight 40,000 B -> 40,448, bias 400 B -> 512
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(8, 100)
    gpu = bf.SimulatedGPU("10MiB")
    with gpu:
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    params = 40448 + 512
    # weights, Adam's exp_avg and exp_avg_sq, its 2 step counters, and the input batch remain charged
    assert gpu.memory_allocated() == 3 * params + 2 * 512 + 3584


def test_nested_entry_and_backward_errors_propagate_with_their_type():
    gpu = bf.SimulatedGPU("16KiB")
    model = torch.nn.Linear(64, 64)
    with gpu:
        with gpu:
            with pytest.raises(torch.OutOfMemoryError):
                model(torch.randn(64, 64)).sum().backward()
    with pytest.raises(torch.OutOfMemoryError):
        with gpu:
            torch.zeros(100000)


def test_capacity_must_parse():
    with pytest.raises(ValueError, match="does not parse"):
        bf.SimulatedGPU("a lot")
    assert bf.SimulatedGPU("16GiB").capacity_bytes == 16 * 1024**3
    gpu = bf.SimulatedGPU(1000)
    assert gpu.name == "SimulatedGPU(1000 B)" and gpu.capacity_bytes == 1000 and gpu.allocator == "caching"
    assert isinstance(gpu, DeviceBackend) and gpu.torch_device == torch.device("cpu")  # runs on the CPU
    with gpu:  # the caching allocator's smallest segment is 2 MiB: nothing fits in 1000 B
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 2.00 MiB. .* total capacity of 1000 bytes"):
            torch.zeros(100)
    assert gpu.memory_allocated() == gpu.memory_reserved() == 0
    # ... and the capacity is the integer given, enforced on allocated bytes: one 512-byte block fits, a second does not
    gpu = bf.SimulatedGPU(1000, allocator="ideal")
    assert gpu.name == "SimulatedGPU(1000 B, allocated bytes only)" and gpu.capacity_bytes == 1000
    with gpu:
        first = torch.zeros(100)  # 400 B -> 512 B
        assert gpu.memory_allocated() == 512
        with pytest.raises(torch.OutOfMemoryError, match="total capacity of 1000 B"):
            torch.zeros(100)
        assert gpu.memory_allocated() == 512
    del first


# -- allocator="caching": segments, a cache, fragmentation ------------------------------------------------------------
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
    ideal = bf.SimulatedGPU("64MiB", allocator="ideal")
    with ideal:
        kept = fragment(ideal)
        torch.zeros(8 * MiB, dtype=torch.uint8)  # allocated bytes alone: it fits
        del kept


def test_searches_on_the_caching_allocator_fit_no_more_than_on_allocated_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    data = TensorDataset(torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,)))
    ideal = bf.find_batch_size(model, data, device=bf.SimulatedGPU("32MiB", allocator="ideal"))
    caching = bf.find_batch_size(model, data, device=bf.SimulatedGPU("32MiB", allocator="caching"))
    assert caching.max_batch_size < ideal.max_batch_size
    assert all(t.peak_reserved_bytes >= t.peak_bytes for t in caching.trials)
    assert any(t.peak_reserved_bytes > t.peak_bytes for t in caching.trials)
    assert all(t.peak_reserved_bytes == t.peak_bytes for t in ideal.trials)
    largest = caching.trial_for(caching.max_batch_size)
    assert largest is not None and largest.peak_reserved_bytes <= 32 * MiB
    assert "allocated bytes only" in ideal.device and "allocated bytes only" not in caching.device


def test_an_unknown_allocator_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"allocator='cuda' .*\['caching', 'ideal'\]"):
        bf.SimulatedGPU("1GiB", allocator="cuda")


def test_expandable_segments_reach_the_allocator_model():
    gpu = bf.SimulatedGPU("64MiB", expandable_segments=True)
    assert gpu.ledger.allocator is not None and gpu.ledger.allocator.expandable_segments
    with gpu:
        a = torch.zeros(12 * MiB, dtype=torch.uint8)
        b = torch.zeros(12 * MiB, dtype=torch.uint8)
        # Fixed segments would hold each 12 MiB request in a 12 MiB segment of its own; one expandable segment
        # grows by pages instead, and both blocks share it.
        segments = gpu.ledger.allocator.segments()
        assert len(segments) == 1 and segments[0].expandable
        del a, b
    with pytest.raises(ValueError, match="setting of the caching allocator"):
        bf.SimulatedGPU("64MiB", allocator="ideal", expandable_segments=True)


# -- like a real GPU: its capacity less the CUDA context, cuBLAS workspaces ----------------------------------------------
def test_a_simulated_gpu_like_a_real_one():
    from batchfinder.memory.gpus import (
        CUBLAS_WORKSPACE_BYTES,
        CUBLAS_WORKSPACE_BYTES_HOPPER,
        CUDA_CONTEXT_BYTES,
        lookup_gpu,
    )

    a100 = bf.SimulatedGPU.like("A100-40GB")
    assert a100.capacity_bytes == lookup_gpu("A100-40GB").memory_bytes - CUDA_CONTEXT_BYTES
    assert "like A100-40GB" in a100.name and a100.allocator == "caching"
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


def test_the_first_trial_does_not_count_what_the_user_left_cached():
    """The simulated GPU follows CUDA's statistics (a reset keeps cached segments in the reserved peak), and the trial
    code is the CUDA backend's: memory the user left cached must be released before the peaks are reset."""
    gpu = bf.SimulatedGPU("1GiB")
    with gpu:
        left = torch.ones(256 * 2**20, dtype=torch.uint8)  # the user's own work, e.g. an evaluation before the search
    del left
    assert gpu.memory_allocated() == 0 and gpu.memory_reserved() == 256 * 2**20
    data = TensorDataset(torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,)))
    trial = bf.try_batch_size(MLP(), data, 64, device=gpu)
    fresh = bf.try_batch_size(MLP(), data, 64, device=bf.SimulatedGPU("1GiB"))
    assert trial.fits and trial.peak_reserved_bytes == fresh.peak_reserved_bytes < 8 * 2**20


def test_true_precision_on_a_model_already_on_the_simulated_gpu_does_not_keep_the_float32_weights():
    gpu = bf.SimulatedGPU("1GiB", allocator="ideal")
    with gpu:  # built on the device: its float32 weights are charged to it
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(1024, 10))
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    assert gpu.memory_allocated() >= fp32
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    data = TensorDataset(torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,)))
    trial = bf.try_batch_size(model, data, 16, device=gpu, precision="16-true")
    assert trial.fits and trial.baseline_bytes < fp32 // 2 + 64 * 1024  # float16 weights only (6 bytes each before)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
