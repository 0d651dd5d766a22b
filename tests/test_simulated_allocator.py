"""The simulated GPU's default ``allocator="caching"``: PyTorch's caching allocator behind real CPU tensors."""

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


def test_predictions_budget_reserved_bytes_and_match_the_caching_simulated_gpu():
    from batchfinder.zoo import mnist_mlp

    torch.manual_seed(0)
    model = mnist_mlp()
    data = TensorDataset(torch.randn(16000, 1, 28, 28), torch.randint(0, 10, (16000,)))
    predicted = bf.predict_max_batch_size(model, (1, 28, 28), capacity="64MiB")
    guided = bf.find_batch_size(model, data, device=bf.SimulatedGPU("64MiB"), mode="guided")
    assert guided.max_batch_size == predicted.max_batch_size and guided.num_trials == 1  # the prediction confirmed
    assert guided.prediction_status == "exact" and guided.num_ooms == 0
    assert predicted.peak_bytes <= 64 * MiB < predicted.next_peak_bytes  # reserved bytes, in whole segments
    ideal = bf.predict_max_batch_size(model, (1, 28, 28), capacity="64MiB", allocator="ideal")
    assert ideal.max_batch_size > predicted.max_batch_size  # allocated bytes alone overstate what fits
    assert "reserved by the caching allocator" in str(predicted)


def test_a_prediction_for_a_gpu_leaves_out_the_context_and_counts_the_workspaces():
    from batchfinder.memory.gpus import CUDA_CONTEXT_BYTES, lookup_gpu
    from batchfinder.zoo import mnist_mlp

    prediction = bf.predict_max_batch_size(mnist_mlp(), (1, 28, 28), gpu="T4", optimizer=torch.optim.SGD)
    assert prediction.capacity_bytes == lookup_gpu("T4").memory_bytes - CUDA_CONTEXT_BYTES
    assert prediction.allowance_bytes == CUDA_CONTEXT_BYTES
    assert prediction.peak_bytes <= prediction.capacity_bytes
    with pytest.raises(ValueError, match="allocator='exact'"):
        bf.predict_max_batch_size(mnist_mlp(), (1, 28, 28), gpu="T4", allocator="exact")


def test_the_device_string_names_the_allocator():
    from batchfinder.devices.resolve import resolve_device

    assert resolve_device("sim:64MiB").allocator == "caching"
    ideal = resolve_device("sim:64MiB:ideal")
    assert ideal.allocator == "ideal" and ideal.capacity_bytes == 64 * MiB
    with pytest.raises(ValueError, match="allocator='fast'"):
        resolve_device("sim:64MiB:fast")


def test_the_search_plot_shows_reserved_peaks_on_a_caching_allocator():
    pytest.importorskip("matplotlib")
    from batchfinder.plot import search_figure

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    data = TensorDataset(torch.randn(2048, 32), torch.randint(0, 4, (2048,)))
    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"), max_trials=4)
    labels = [line.get_label() for line in search_figure(result).axes[0].get_lines()]
    assert "trial: peak reserved (allocator segments)" in labels
    ideal = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB", allocator="ideal"), max_trials=4)
    assert "trial: peak reserved (allocator segments)" not in [l.get_label() for l in search_figure(ideal).axes[0].get_lines()]


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
