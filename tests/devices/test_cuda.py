"""The CUDA backend (batchfinder/devices/cuda.py): on the CPU through a stand-in for the ``torch.cuda`` calls it makes
(:mod:`tests.cuda_double`, a faithful double of ``torch.cuda``'s memory API built on the allocator model), and for real where CUDA is present (the tests marked ``cuda``, which skip cleanly
otherwise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.devices.cuda import CudaDevice
from batchfinder.engine.modes import _guided_limit
from tests.cuda_double import CudaDouble
from tests.helpers import (
    MLP,
    GiB,
    assert_unchanged,
    batchnorm_mlp,
    classification_data,
    requires_cuda,
    snapshot,
)

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20


def _data(n: int = 20_000) -> TensorDataset:
    return classification_data(n, (1, 8, 8), 10)


# -- on the CPU: CudaDevice's own code against the double of torch.cuda (tests/cuda_double.py) ------------------------
def test_memory_limit_empties_the_cache_first_and_restores_the_users_fraction(monkeypatch):
    cuda = CudaDouble(monkeypatch)
    device = CudaDevice("cuda", memory_limit="8GiB")  # half of the GPU
    with device.measuring():
        # The fraction is only checked when a new segment is needed: cached blocks would let trials pass it.
        assert cuda.calls == ["empty_cache", ("fraction", 0.5)]
    assert cuda.calls[-1] == ("fraction", 1.0)


def test_memory_limit_never_loosens_a_stricter_fraction_the_user_set(monkeypatch):
    cuda = CudaDouble(monkeypatch)
    torch.cuda.set_per_process_memory_fraction(0.25)
    with CudaDevice("cuda", memory_limit="8GiB").measuring():
        assert cuda.fraction == 0.25
    assert cuda.fraction == 0.25


def test_without_the_fraction_getter_the_users_fraction_is_never_written(monkeypatch):
    """torch 2.5-2.7 have no get_per_process_memory_fraction: the fraction in force cannot be read, so it is left
    alone (never overwritten, never "restored" to 1.0) and memory_limit holds on the measured reserved peaks."""
    cuda = CudaDouble(monkeypatch, fraction_getter=False)
    assert not hasattr(torch.cuda, "get_per_process_memory_fraction")
    torch.cuda.set_per_process_memory_fraction(0.25)
    device = cuda.backend(memory_limit="8GiB")
    with device.measuring():
        assert cuda.fraction == 0.25
    assert cuda.fraction == 0.25 and cuda.calls == [("fraction", 0.25)]
    assert device.over_limit(8 * GiB) is None
    assert "more than memory_limit=8.00 GiB" in device.over_limit(8 * GiB + 2 * MiB)


def test_without_the_fraction_getter_a_trial_over_the_limit_does_not_fit(monkeypatch):
    cuda = CudaDouble(monkeypatch, fraction_getter=False)
    device = cuda.backend(memory_limit="96MiB")  # 64 MiB of cuBLAS workspaces, a small model
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    fits = bf.try_batch_size(model, _data(4096), 256, device=device)
    too_big = bf.try_batch_size(model, _data(40_000), 20_000, device=device)
    assert fits.fits and fits.peak_reserved_bytes <= 96 * MiB
    assert not too_big.fits and "memory_limit" in too_big.error
    assert cuda.calls == ["empty_cache"] * cuda.calls.count("empty_cache")  # no fraction was ever set


def test_the_budget_counts_what_is_reserved_and_free_not_the_total(monkeypatch):
    # 16 GiB of which the CUDA context holds 512 MiB and other processes 7.5 GiB
    cuda = CudaDouble(monkeypatch, others=7 * GiB + 512 * MiB)
    cuda.put(torch.empty(2 * GiB, dtype=torch.uint8))  # 2 GiB reserved by this process
    device = CudaDevice("cuda")
    assert device.memory_budget() == 8 * GiB
    assert _guided_limit(device) == (8 * GiB, False)  # guided mode aims below what is really there
    assert CudaDevice("cuda", memory_limit="4GiB").memory_budget() == 4 * GiB
    report = device.memory_report()
    assert "8.00 GiB are held outside" in report and "reserves 2.00 GiB" in report and "6.00 GiB are free" in report


def test_the_first_trial_does_not_count_what_the_user_left_cached(monkeypatch):
    """CUDA's resetPeakStats sets the reserved peak to the current reserved bytes, cached segments included: the
    cache is emptied before the peaks are reset (also without memory_limit), so trial 1 is not inflated."""
    cuda = CudaDouble(monkeypatch)
    cuda.leave_cached(256 * MiB)
    assert torch.cuda.memory_reserved() == 256 * MiB
    trial = bf.try_batch_size(MLP(), _data(4096), 64, device=cuda.backend())
    assert trial.fits and trial.peak_reserved_bytes < 100 * MiB  # 2 x 32 MiB of workspaces and the trial


def test_warm_up_creates_both_threads_workspaces_before_the_first_trial(monkeypatch):
    cuda = CudaDouble(monkeypatch)  # compute capability 9.0: 32 MiB per workspace
    device = cuda.backend()
    assert device.workspace_bytes == 32 * MiB  # what a guided prediction adds to the model, twice
    model = MLP()
    trial = bf.try_batch_size(model, _data(4096), 64, device=device)
    assert cuda.workspaces() == ["backward", "forward"]
    assert trial.baseline_bytes >= 64 * MiB and trial.leaked_bytes == 0
    assert CudaDouble(monkeypatch, capabilities=((8, 0),)).backend().workspace_bytes == 8_519_680


def test_a_memory_limit_at_or_below_what_is_reserved_is_refused_with_both_figures(monkeypatch):
    cuda = CudaDouble(monkeypatch)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cuda.put(model)
    before = snapshot(model)
    # the two 32 MiB workspaces alone reserve 64 MiB
    with pytest.raises(ValueError, match=r"memory_limit=48.00 MiB is at or below the 66.00 MiB PyTorch already reserves"):
        bf.find_batch_size(model, _data(), device=cuda.backend(memory_limit="48MiB"))
    assert_unchanged(before, model)


def test_trials_fit_under_the_limit_with_the_workspaces_counted(monkeypatch):
    cuda = CudaDouble(monkeypatch)
    result = bf.find_batch_size(MLP(), _data(), device=cuda.backend(memory_limit="72MiB"), max_trials=12)
    assert result.num_ooms >= 1
    assert all(t.peak_reserved_bytes <= 72 * MiB for t in result.trials if t.fits)
    assert cuda.fraction == 1.0  # restored


def test_guided_mode_on_the_double_predicts_with_the_workspaces(monkeypatch):
    cuda = CudaDouble(monkeypatch)
    result = bf.find_batch_size(MLP(), _data(), device=cuda.backend(memory_limit="72MiB"), mode="guided")
    assert result.max_batch_size >= 16
    # the prediction's baseline has the two 32 MiB workspaces the limit includes: the only trial that does not fit
    # is the one just above the largest that does (without them the first three proposals ran out of memory)
    assert result.num_ooms == 1 and not result.trial_for(result.max_batch_size + 1).fits
    assert all(t.peak_reserved_bytes <= 72 * MiB for t in result.trials if t.fits)


def test_true_precision_on_a_model_on_the_device_does_not_keep_the_float32_weights_there(monkeypatch):
    cuda = CudaDouble(monkeypatch)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(1024, 10))
    cuda.put(model)  # 1.13 M parameters: 4.3 MiB in float32, 2.2 MiB in float16
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    trial = bf.try_batch_size(model, _data(256), 16, device=cuda.backend(), precision="16-true")
    assert trial.fits
    # the baseline holds the float16 weights and the workspaces, not the float32 originals next to them
    assert trial.baseline_bytes < fp32 // 2 + 64 * MiB + MiB
    assert all(t.dtype == torch.float32 for t in model.parameters())
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_bf16_support_is_asked_of_the_backends_device_not_the_current_one(monkeypatch):
    CudaDouble(monkeypatch, count=2, capabilities=((7, 0), (9, 0)))  # device 0 (current) is a V100
    CudaDevice("cuda:1").check_precision("bf16-mixed")
    with pytest.raises(ValueError, match="does not support bfloat16"):
        CudaDevice("cuda:0").check_precision("bf16-mixed")
    assert torch.cuda.current_device() == 0


def test_the_cache_emptied_is_the_backends_devices(monkeypatch):
    cuda = CudaDouble(monkeypatch, count=2)
    cuda.leave_cached(256 * MiB, device=1)
    CudaDevice("cuda:1").start_measurement()  # device 0 is current
    assert torch.cuda.memory_reserved(1) == 0 and torch.cuda.current_device() == 0


def test_an_allocation_past_the_device_raises_cudas_message(monkeypatch):
    cuda = CudaDouble(monkeypatch, total=GiB)
    with cuda.out_of_memory(), cuda.charging():
        torch.empty(2 * GiB, dtype=torch.uint8).add_(1)


# -- on a real GPU ---------------------------------------------------------------------------------------------------
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


@pytest.mark.cuda
@requires_cuda
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


@pytest.mark.cuda
@requires_cuda
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


@pytest.mark.cuda
@requires_cuda
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


@pytest.mark.cuda
@requires_cuda
def test_simulated_gpu_refuses_a_cuda_model():
    model = MLP().cuda()
    with pytest.raises(ValueError, match="SimulatedGPU runs the model on the CPU"):
        bf.find_batch_size(model, _data(100), device=bf.SimulatedGPU("8MiB"))


@pytest.mark.cuda
@requires_cuda
def test_memory_limit_holds_although_the_user_left_blocks_cached():
    cached = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    del cached  # 256 MiB now sit in PyTorch's cache
    result = bf.find_batch_size(batchnorm_mlp().cuda(), _data(), device="cuda", memory_limit="64MiB")
    assert all(t.peak_reserved_bytes <= 64 * MiB for t in result.trials if t.fits)


@pytest.mark.cuda
@requires_cuda
def test_a_stricter_fraction_the_user_set_is_kept():
    if not hasattr(torch.cuda, "get_per_process_memory_fraction"):
        pytest.skip("this torch cannot read the per-process memory fraction")
    torch.cuda.set_per_process_memory_fraction(0.05)
    try:
        total = torch.cuda.get_device_properties(0).total_memory
        with CudaDevice("cuda", memory_limit=total // 2).measuring():
            assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(0.05)
        assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(0.05)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.cuda
@requires_cuda
def test_trials_record_reserved_peaks_and_errors_say_who_holds_memory():
    result = bf.find_batch_size(batchnorm_mlp().cuda(), _data(), device="cuda", memory_limit="256MiB", max_trials=4)
    assert all(t.peak_reserved_bytes >= t.peak_bytes > 0 for t in result.trials)
    with pytest.raises(bf.NoBatchSizeFitsError, match="held outside this search's tensors"):
        huge = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Linear(64, 10)).cuda()
        bf.find_batch_size(huge, _data(), device="cuda", memory_limit="1MiB", step_fn=lambda m, b: m(b[0]).sum() + torch.empty(2**30, device="cuda").sum() * 0)


@pytest.mark.cuda
@requires_cuda
def test_a_cpu_model_keeps_its_tensors_and_statistics():
    model = batchnorm_mlp()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    ids = [id(t) for t in (*model.parameters(), *model.buffers())]
    bf.find_batch_size(model, _data(), device="cuda", memory_limit="256MiB", max_trials=4)
    assert [id(t) for t in (*model.parameters(), *model.buffers())] == ids
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


@pytest.mark.cuda
@requires_cuda
def test_the_first_search_in_a_fresh_process_leaks_nothing():
    code = (
        "import torch, batchfinder as bf; from torch import nn; from torch.utils.data import TensorDataset\n"
        "m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10)).cuda()\n"
        "d = TensorDataset(torch.randn(4096, 64), torch.randint(0, 10, (4096,)))\n"
        "r = bf.find_batch_size(m, d, device='cuda', memory_limit='128MiB', max_trials=3)\n"
        "print(max(t.leaked_bytes for t in r.trials))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_the_ddp_wrapper_hfs_train_will_build_has_its_buckets_charged_on_a_gpu(monkeypatch):
    """A real DDP wrapper allocated its gradient buckets when it was built (they are in the baseline); the one the
    Hugging Face Trainer builds in train(), after the search, holds nothing yet: the search charges them, on a real
    GPU too."""
    from batchfinder.engine.options import SearchOptions
    from batchfinder.engine.run import search
    from batchfinder.engine.workload import Workload
    from batchfinder.hf.workload import PlannedDDP
    from batchfinder.training.batching import BatchSource
    from batchfinder.training.optimizers import resolve_optimizer
    from batchfinder.training.steps import make_step

    cuda = CudaDouble(monkeypatch)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10))  # 1.1 MB of gradients
    grads = sum(p.numel() * 4 for p in model.parameters())

    def baseline(ddp: Any) -> int:
        workload = Workload(model, BatchSource(_data(256)), make_step(), resolve_optimizer(torch.optim.SGD, model), ddp=ddp)
        result = search(workload, cuda.backend(), SearchOptions(max_trials=1, confirm_steps=0))
        return result.trials[0].baseline_bytes

    plain = baseline(None)
    assert baseline(PlannedDDP(model, 25 * 2**20)) - plain >= grads


# -- the same defects, on a real GPU ------------------------------------------------------------------------------------
@pytest.mark.cuda
@requires_cuda
def test_on_a_gpu_the_first_trial_does_not_count_what_the_user_left_cached():
    torch.cuda.empty_cache()
    left = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    del left  # 256 MiB now sit in PyTorch's cache
    assert torch.cuda.memory_reserved() >= 256 * MiB
    trial = bf.try_batch_size(MLP().cuda(), _data(4096), 64, device="cuda")
    assert trial.fits and trial.peak_reserved_bytes < 256 * MiB


@pytest.mark.cuda
@requires_cuda
def test_on_a_gpu_a_memory_limit_below_what_is_reserved_is_refused():
    keep = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="is at or below the .* PyTorch already reserves"):
        bf.find_batch_size(MLP().cuda(), _data(), device="cuda", memory_limit="32MiB")
    del keep


@pytest.mark.cuda
@requires_cuda
def test_on_a_gpu_the_warm_up_leaves_no_workspace_to_the_first_measurement():
    device = CudaDevice("cuda")
    device.warm_up()
    before = torch.cuda.memory_allocated()
    x = torch.ones(16, 16, device="cuda", requires_grad=True)
    (nn.functional.linear(x, x, torch.ones(16, device="cuda")) @ x).sum().backward()
    del x
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # both threads' workspaces existed already


@pytest.mark.cuda
@requires_cuda
def test_on_a_gpu_true_precision_does_not_keep_the_float32_weights_there():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.Linear(4096, 10)).cuda()
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    _warm_up_cublas()
    held_before = torch.cuda.memory_allocated() - fp32  # everything but the model
    trial = bf.try_batch_size(model, _data(256), 16, device="cuda", precision="16-true")
    assert trial.fits and trial.baseline_bytes - held_before < fp32 // 2 + 4 * MiB
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
