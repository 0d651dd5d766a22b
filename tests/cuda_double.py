"""A faithful double of ``torch.cuda``'s memory API on the CPU, so that the CUDA backend's own code
(:class:`batchfinder.devices.cuda.CudaDevice`) runs in every test run.

Each device is the project's model of PyTorch's caching allocator (:mod:`batchfinder.memory.allocator`) with the
semantics of ``c10/cuda/CUDACachingAllocator.cpp`` and ``torch/cuda/memory.py``:

* ``memory_allocated``/``memory_reserved`` are the allocator's block and segment bytes; ``max_memory_*`` their peaks;
  ``reset_peak_memory_stats`` sets each peak to the *current* value (``resetPeakStats``: cached free segments stay
  in the reserved peak); ``empty_cache`` releases the wholly free segments of the *current* device only;
* ``mem_get_info`` is the driver's view: the device's total less the CUDA context, other processes and what the
  allocator reserves;
* ``set_per_process_memory_fraction(f, device)`` bounds reserved bytes at ``int(f * total)``, checked when a new
  segment is needed (``allowed_memory_maximum`` in ``alloc_block``); ``get_per_process_memory_fraction`` reads it,
  and is absent with ``fraction_getter=False`` (torch 2.5-2.7);
* ``synchronize``, ``current_device``/``set_device``/``device(...)``, ``device_count``, ``get_device_properties``
  (total memory, compute capability), ``get_device_name``;
* cuBLAS's workspaces: one per (handle, stream), created at the first GEMM of each thread, forward (the caller's
  thread) and backward (autograd's device thread), 32 MiB each from compute capability 9.0 on
  (``cublas_handle_stream_to_workspace`` and ``getChosenWorkspaceSize`` in ``aten/src/ATen/cuda/CublasHandlePool.cpp``);
* an allocation that does not fit raises ``torch.OutOfMemoryError`` with CUDA's message.

Tensors stay on the CPU: :meth:`CudaDouble.backend` builds a real ``CudaDevice`` whose ``torch_device`` is the CPU,
and the operations of its trials (inside ``CudaDevice.charging()``, which the double provides) are charged to the
device's allocator, as they would allocate on the GPU; ``CudaDevice``'s own ``hold_model`` and ``to_device`` run,
with the copies they make to the GPU charged (on the CPU they are no-ops). :meth:`CudaDouble.put` charges tensors that are "already on
the device" (a model the user moved there), :meth:`CudaDouble.leave_cached` leaves freed blocks in the cache.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

from batchfinder.devices.cuda import CudaDevice
from batchfinder.memory.accounting import ChargingMode, MemoryLedger, tensor_storages
from batchfinder.memory.allocator import CachingAllocator
from batchfinder.memory.gpus import cublas_workspace_bytes
from batchfinder.training.host import host_side_loading

GiB = 2**30
MiB = 2**20

__all__ = ["CudaDouble", "GiB", "MiB"]


class _DeviceLedger(MemoryLedger):
    """The storages charged to one device; out of memory is CUDA's own message (no simulated-GPU note)."""

    def _malloc(self, allocator: CachingAllocator, sizes: list[int], raws: list[int] | None = None) -> list[int | None]:
        try:
            return super()._malloc(allocator, sizes, raws)
        except torch.OutOfMemoryError as exc:
            text = str(exc).split(" (simulated GPU", 1)[0]
            raise torch.OutOfMemoryError(text) from None


class _Gpu:
    def __init__(self, index: int, total: int, context: int, others: int, capability: tuple[int, int], name: str) -> None:
        self.index, self.total, self.context, self.others = index, total, context, others
        self.capability, self.name = capability, name
        self.allocator = CachingAllocator(total - context - others)
        self.ledger = _DeviceLedger(
            None, device_label=f"GPU {index}", allocator=self.allocator, workspace_bytes=cublas_workspace_bytes(capability)
        )
        self.fraction = 1.0

    def free(self) -> int:
        return self.total - self.context - self.others - self.allocator.reserved


class CudaDouble:
    """``torch.cuda``'s memory API on ``count`` devices of ``total`` bytes each (see the module documentation).

    ``capabilities`` gives each device's compute capability (default 9.0, Hopper: 32 MiB cuBLAS workspaces);
    ``context`` is the CUDA context outside the allocator, ``others`` memory other processes hold. ``calls`` lists
    ``"empty_cache"`` and ``("fraction", f)`` in the order they were made."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        *,
        total: int = 16 * GiB,
        context: int = 512 * MiB,
        others: int = 0,
        count: int = 1,
        capabilities: tuple[tuple[int, int], ...] | None = None,
        name: str = "NVIDIA H100 80GB HBM3",
        fraction_getter: bool = True,
    ) -> None:
        capabilities = capabilities or ((9, 0),) * count
        self.gpus = [_Gpu(i, total, context, others, capabilities[i], name) for i in range(count)]
        self.current = 0
        self.calls: list[Any] = []
        double = self

        class _DeviceContext:
            """``torch.cuda.device(index)``: makes ``index`` current for the block."""

            def __init__(self, device: Any) -> None:
                self.index = double._index(device)
                self.previous = double.current

            def __enter__(self) -> None:
                self.previous, double.current = double.current, self.index

            def __exit__(self, *exc_info: Any) -> None:
                double.current = self.previous

        patches = {
            "is_available": lambda: True,
            "device_count": lambda: len(self.gpus),
            "current_device": lambda: self.current,
            "set_device": self._set_device,
            "device": _DeviceContext,
            "get_device_properties": self._properties,
            "get_device_name": lambda device=None: self._gpu(device).name,
            "memory_allocated": lambda device=None: self._settled(device).allocator.allocated,
            "max_memory_allocated": lambda device=None: self._settled(device).allocator.peak_allocated,
            "memory_reserved": lambda device=None: self._settled(device).allocator.reserved,
            "max_memory_reserved": lambda device=None: self._settled(device).allocator.peak_reserved,
            "reset_peak_memory_stats": lambda device=None: self._settled(device).allocator.reset_peak(),
            "mem_get_info": lambda device=None: (self._settled(device).free(), self._gpu(device).total),
            "empty_cache": self._empty_cache,
            "synchronize": lambda device=None: None,
            "set_per_process_memory_fraction": self._set_fraction,
            "get_per_process_memory_fraction": lambda device=None: self._gpu(device).fraction,
        }
        for name_, value in patches.items():
            monkeypatch.setattr(torch.cuda, name_, value, raising=False)
        # The kernels run on the CPU: torch's own code (the optimizers' graph-capture check) must not look for a
        # CUDA stream.
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
        if not fraction_getter:
            monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
        monkeypatch.setattr(CudaDevice, "charging", lambda device: self.charging(device.index))
        hold_model = CudaDevice.hold_model

        @contextlib.contextmanager
        def holding(device: CudaDevice, model: nn.Module, optimizer: Any) -> Iterator[None]:
            """CudaDevice's own ``hold_model``, with the copy to the GPU charged (the move itself is a no-op here)."""
            with hold_model(device, model, optimizer):
                ledger = self._gpu(device.index).ledger
                tensors = [*model.parameters(), *model.buffers()]
                fresh = [s for s in {id(s): s for s in tensor_storages(tensors)}.values() if not ledger.is_charged(s)]
                ledger.charge(fresh)
                try:
                    yield
                finally:
                    for storage in fresh:
                        ledger.release(storage)

        monkeypatch.setattr(CudaDevice, "hold_model", holding)
        to_device = CudaDevice.to_device

        def transfer(device: CudaDevice, batch: Any) -> Any:
            """CudaDevice's own ``to_device``, each tensor then copied into a storage charged to the device (the copy
            ``.to("cuda")`` makes; here ``.to("cpu")`` returns the host tensor itself)."""
            ledger = self._gpu(device.index).ledger

            def copy(value: Any) -> Any:
                if not isinstance(value, torch.Tensor) or ledger.is_charged(value.untyped_storage()):
                    return value
                with host_side_loading():
                    moved = value.clone()
                ledger.charge([moved.untyped_storage()])
                return moved

            return tree_map(copy, to_device(device, batch))

        monkeypatch.setattr(CudaDevice, "to_device", transfer)

    # -- torch.cuda --------------------------------------------------------------------------------------------
    def _index(self, device: Any) -> int:
        if device is None:
            return self.current
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device):
            if device.type != "cuda":
                raise ValueError(f"Expected a cuda device, but got: {device}")
            return self.current if device.index is None else device.index
        if isinstance(device, int):
            if not 0 <= device < len(self.gpus):
                raise RuntimeError("CUDA error: invalid device ordinal")
            return device
        raise TypeError(f"unsupported device {device!r}")

    def _gpu(self, device: Any = None) -> _Gpu:
        return self.gpus[self._index(device)]

    def _set_device(self, device: Any) -> None:
        self.current = self._index(device)

    def _properties(self, device: Any = None) -> types.SimpleNamespace:
        gpu = self._gpu(device)
        major, minor = gpu.capability
        return types.SimpleNamespace(total_memory=gpu.total, major=major, minor=minor, name=gpu.name)

    def _empty_cache(self) -> None:
        """Only the current device's cache, as ``torch.cuda.empty_cache()`` (``emptyCache`` of the current device)."""
        self.calls.append("empty_cache")
        self._gpu().allocator.empty_cache()

    def _set_fraction(self, fraction: float, device: Any = None) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        gpu = self._gpu(device)
        self.calls.append(("fraction", round(fraction, 6)))
        gpu.fraction = fraction
        gpu.allocator.limit = int(fraction * gpu.total)

    # -- what the tests do with it -----------------------------------------------------------------------------
    @property
    def fraction(self) -> float:
        """The current device's per-process memory fraction."""
        return self._gpu().fraction

    def charging(self, index: int | None = None) -> contextlib.AbstractContextManager[Any]:
        """Charge the operations of the block to device ``index`` (the current one by default), as the GPU would."""
        return ChargingMode(self._gpu(index).ledger)

    def backend(self, device: str = "cuda", **options: Any) -> CudaDevice:
        """The real ``CudaDevice`` on this double, its tensors on the CPU."""
        backend = CudaDevice(device, **options)
        backend.torch_device = torch.device("cpu")
        return backend

    def _settled(self, device: Any = None) -> _Gpu:
        """The device, its ledger's pending frees accounted first (as CUDA's statistics count a freed block at once)."""
        gpu = self._gpu(device)
        gpu.ledger.settle()
        return gpu

    def put(self, *holders: nn.Module | torch.Tensor, device: Any = None) -> None:
        """Charge the tensors of ``holders`` to a device, as if the user had moved them there."""
        tensors: list[torch.Tensor] = []
        for holder in holders:
            tensors.extend([*holder.parameters(), *holder.buffers()] if isinstance(holder, nn.Module) else [holder])
        self._gpu(device).ledger.charge(tensor_storages(tensors))

    def leave_cached(self, nbytes: int, device: Any = None) -> None:
        """Allocate ``nbytes`` and free them again: the block stays in the allocator's cache."""
        allocator = self._gpu(device).allocator
        allocator.free(allocator.malloc(nbytes))

    def workspaces(self, device: Any = None) -> list[str]:
        """The threads whose cuBLAS workspace exists on a device (``"forward"``, ``"backward"``)."""
        return sorted(self._gpu(device).ledger.workspaces)

    @contextlib.contextmanager
    def out_of_memory(self) -> Iterator[None]:
        """Expect ``torch.OutOfMemoryError`` with CUDA's message inside the block."""
        with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory. Tried to allocate"):
            yield

