"""The CUDA backend's defects found by reading it against torch 2.14, each shown without a GPU.

Where the behaviour can be shown on the simulated GPU it is; where it needs ``torch.cuda``, a test double replaces
the few ``torch.cuda`` calls the backend makes (``FakeCuda``). The same paths run for real in ``test_cuda.py`` on a
machine with a GPU.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.devices.base import swapped_data
from batchfinder.devices.cuda import CudaDevice
from batchfinder.devices.resolve import resolve_device
from batchfinder.engine.distributed import RankAgreement
from batchfinder.engine.modes import _guided_limit
from batchfinder.engine.options import SearchOptions
from batchfinder.engine.run import search
from batchfinder.engine.workload import Workload
from batchfinder.training.batching import BatchSource
from batchfinder.training.optimizers import resolve_optimizer
from batchfinder.training.state import AttributeSnapshot

GiB = 2**30


class FakeCuda:
    """The ``torch.cuda`` calls the CUDA backend makes, on a 16 GiB GPU that nothing runs on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, total: int = 16 * GiB, free: int = 12 * GiB,
                 reserved: int = 2 * GiB, fraction: float = 1.0) -> None:
        self.total, self.free, self.reserved, self.fraction = total, free, reserved, fraction
        self.calls: list[Any] = []
        patches = {
            "is_available": lambda: True,
            "current_device": lambda: 0,
            "get_device_properties": lambda index: types.SimpleNamespace(total_memory=self.total),
            "get_device_name": lambda device=None: "Fake GPU",
            "memory_allocated": lambda device=None: 0,
            "max_memory_allocated": lambda device=None: 0,
            "memory_reserved": lambda device=None: self.reserved,
            "max_memory_reserved": lambda device=None: self.reserved,
            "mem_get_info": lambda device=None: (self.free, self.total),
            "empty_cache": lambda: self.calls.append("empty_cache"),
            "get_per_process_memory_fraction": lambda index=None: self.fraction,
            "set_per_process_memory_fraction": self._set_fraction,
        }
        for name, value in patches.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def _set_fraction(self, fraction: float, index: int | None = None) -> None:
        self.calls.append(("fraction", round(fraction, 6)))
        self.fraction = fraction


# -- 1 and 8: memory_limit -------------------------------------------------------------------------------------------
def test_memory_limit_empties_the_cache_first_and_restores_the_users_fraction(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    device = CudaDevice("cuda", memory_limit="8GiB")  # half of the GPU
    with device.measuring():
        # The fraction is only checked when a new segment is needed: cached blocks would let trials pass it.
        assert cuda.calls == ["empty_cache", ("fraction", 0.5)]
    assert cuda.calls[-1] == ("fraction", 1.0)


def test_memory_limit_never_loosens_a_stricter_fraction_the_user_set(monkeypatch):
    cuda = FakeCuda(monkeypatch, fraction=0.25)
    with CudaDevice("cuda", memory_limit="8GiB").measuring():
        assert cuda.fraction == 0.25
    assert cuda.fraction == 0.25


# -- 2: reserved memory, other processes --------------------------------------------------------------------------
def test_the_budget_counts_what_is_reserved_and_free_not_the_total(monkeypatch):
    FakeCuda(monkeypatch, free=6 * GiB, reserved=2 * GiB)  # 8 GiB held by other processes and the context
    device = CudaDevice("cuda")
    assert device.memory_budget() == 8 * GiB
    assert _guided_limit(device) == (8 * GiB, False)  # guided mode aims below what is really there
    assert CudaDevice("cuda", memory_limit="4GiB").memory_budget() == 4 * GiB
    report = device.memory_report()
    assert "8.00 GiB are held outside" in report and "reserves 2.00 GiB" in report and "6.00 GiB are free" in report


def test_trials_record_the_reserved_peak_and_reports_show_it():
    class CachingGPU(bf.SimulatedGPU):
        """A simulated GPU whose allocator keeps 2 MiB cached beyond what tensors hold."""

        def max_memory_reserved(self) -> int:
            return self.max_memory_allocated() + 2 * 2**20

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    trial = bf.try_batch_size(model, data, 32, device=CachingGPU("8MiB", allocator="ideal"))
    assert trial.fits and trial.peak_reserved_bytes == trial.peak_bytes + 2 * 2**20
    plain = bf.try_batch_size(model, data, 32, device=bf.SimulatedGPU("8MiB", allocator="ideal"))
    assert plain.peak_reserved_bytes == plain.peak_bytes  # no cache: reserved is allocated
    result = bf.find_batch_size(model, data, device=CachingGPU("8MiB", allocator="ideal"), max_trials=2)
    assert "reserved" in result.table().splitlines()[0]
    assert result.as_dict()["trials"][0]["peak_reserved_bytes"] == result.trials[0].peak_reserved_bytes


# -- 5 and 6: ranks agree over the CPU -------------------------------------------------------------------------------
def test_ranks_agree_on_a_cpu_gloo_group_whatever_the_training_backend(monkeypatch):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        real = dist.get_backend
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl" if group is None else real(group))
        agreement = RankAgreement()
        # Not on whichever GPU is current, and not on a CUDA context a failing rank may have poisoned.
        assert agreement.group is not None and real(agreement.group) == "gloo"
        assert agreement._device == torch.device("cpu")
        agreement.check(True, "a test")
        assert agreement.agree_outcome(True, 123, False, "a trial") == (True, 123, [])
        agreement.close()
    finally:
        dist.destroy_process_group()


# -- 7: device=None follows the model ----------------------------------------------------------------------------
def test_without_a_device_the_search_uses_the_gpu_the_model_is_on(monkeypatch):
    FakeCuda(monkeypatch)

    class OnSecondGpu:
        def parameters(self) -> list[Any]:
            return [types.SimpleNamespace(device=torch.device("cuda", 1))]

        def buffers(self) -> list[Any]:
            return []

    assert resolve_device(None, model=OnSecondGpu()).torch_device == torch.device("cuda", 1)  # type: ignore[arg-type]
    assert resolve_device(None).torch_device == torch.device("cuda", 0)


# -- 9: cuDNN's NOT_SUPPORTED ------------------------------------------------------------------------------------
NOT_SUPPORTED = "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."


def test_cudnn_not_supported_at_a_tiny_batch_is_an_unsupported_configuration_not_oom():
    model = nn.Linear(8, 2)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))

    def always(m: nn.Module, batch: Any) -> torch.Tensor:
        raise RuntimeError(NOT_SUPPORTED)

    with pytest.raises(ValueError, match="unsupported layer configuration"):
        bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"), step_fn=always)


def test_cudnn_not_supported_at_a_large_batch_means_no_workspace_fits():
    model = nn.Linear(8, 2)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))

    def above_40(m: nn.Module, batch: Any) -> torch.Tensor:
        if len(batch[0]) > 40:
            raise RuntimeError(NOT_SUPPORTED)
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"), step_fn=above_40)
    assert result.max_batch_size == 40 and result.smallest_failure == 41


# -- 10: moving a CPU model keeps its tensors ------------------------------------------------------------------------
def test_moving_a_model_keeps_the_same_tensors_and_shares_shared_buffers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    shared = torch.zeros(3)
    model[0].register_buffer("shared", shared)
    model[1].register_buffer("shared", shared)
    tensors = [*model.parameters(), *model.buffers()]
    pointers = [t.data_ptr() for t in tensors]
    converted: list[int] = []

    def to_new_memory(data: torch.Tensor) -> torch.Tensor:  # what .to("cuda") does, on the CPU: new storage
        converted.append(data.data_ptr())
        return data.clone()

    with swapped_data(model, to_new_memory):
        # Restores between trials write into these very objects, so they must be the ones the model uses.
        assert all(a is b for a, b in zip([*model.parameters(), *model.buffers()], tensors))
        assert all(t.data_ptr() != p for t, p in zip(tensors, pointers))
        assert model[0].shared is model[1].shared  # one buffer, moved once, not duplicated
        assert sorted(converted) == sorted(pointers)
        model[1].running_mean.add_(1.0)  # a trial's BatchNorm update lands in the moved copy
    assert [t.data_ptr() for t in tensors] == pointers
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # the original data is back, untouched


# -- 3: a gradient scaler between trials -------------------------------------------------------------------------
def _scaled_workload(extra_state: list[Any]) -> tuple[Workload, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    data = TensorDataset(torch.randn(256, 16), torch.randint(0, 4, (256,)))
    spec = resolve_optimizer(torch.optim.Adam, model)
    optimizer = spec.create()
    scaler = torch.amp.GradScaler("cpu")

    def train_step(m: nn.Module, batch: Any, index: int) -> None:
        loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # e.g. before gradient clipping
        torch.empty(len(batch[0]) * 4096, dtype=torch.uint8)  # memory after unscale_: large batches run out here
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    workload = Workload(model, BatchSource(data), None, spec, train_step=train_step, extra_optimizers=[optimizer],
                        extra_state=[lambda: AttributeSnapshot(scaler, deep=True), *extra_state])
    return workload, scaler


def test_a_trial_that_runs_out_of_memory_after_unscale_does_not_break_the_next_one():
    workload, scaler = _scaled_workload([])
    before = {k: v for k, v in vars(scaler).items() if k != "_per_optimizer_states"}
    result = search(workload, bf.SimulatedGPU("1MiB", allocator="ideal"), SearchOptions())
    assert result.num_ooms >= 1 and result.trials[-1].fits is not None  # every trial after an OOM ran
    assert {k: v for k, v in vars(scaler).items() if k != "_per_optimizer_states"}.keys() == before.keys()
    assert not scaler._per_optimizer_states  # as before the search


def test_without_resetting_the_scaler_the_next_trial_would_fail():
    workload, _ = _scaled_workload([])
    workload.extra_state = []  # what Lightning's callback did before: the scaler's stage survives a failed trial
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        search(workload, bf.SimulatedGPU("1MiB", allocator="ideal"), SearchOptions())


# -- 4: steps skipped by a gradient scaler ----------------------------------------------------------------------------
def _trial_with_skipped_steps(skipped: int) -> bf.Trial:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    data = TensorDataset(torch.randn(64, 64), torch.randint(0, 4, (64,)))
    spec = resolve_optimizer(torch.optim.Adam, model)
    optimizer = spec.create()
    calls: list[object] = []

    def train_step(m: nn.Module, batch: Any, index: int) -> None:
        calls.append(batch)
        nn.functional.cross_entropy(m(batch[0]), batch[1]).backward()
        if sum(b is batch for b in calls) > skipped:  # as a GradScaler skips steps whose gradients hold inf
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    workload = Workload(model, BatchSource(data), None, spec, train_step=train_step, extra_optimizers=[optimizer])
    result = search(workload, bf.SimulatedGPU("64MiB", allocator="ideal"), SearchOptions(init_batch_size=64))
    return result.trials[0]


def test_a_trial_runs_on_until_skipped_steps_have_created_the_optimizers_state(caplog):
    normal = _trial_with_skipped_steps(0)
    skipped = _trial_with_skipped_steps(3)  # both of a 2-step trial's steps would be skipped: no Adam state
    assert normal.steps == 2
    assert skipped.steps == 4  # steps went on until a step was taken and Adam's moments existed
    assert skipped.peak_bytes == normal.peak_bytes  # the optimizer state's memory is measured after all
    never = _trial_with_skipped_steps(100)
    assert never.steps == 2 + 8 and "still has no state" in caplog.text
