"""The simulated GPU's accounting: what it charges, when, and how it runs out of memory."""

import gc

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import batchfinder as bf
from batchfinder import is_oom_error
from batchfinder.devices.base import DeviceBackend


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
