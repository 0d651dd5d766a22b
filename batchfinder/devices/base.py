"""The device interface every trial runs against.

Two backends implement it: :class:`~batchfinder.devices.simulated.SimulatedGPU` (a GPU of a chosen capacity, simulated on
the CPU) and :class:`~batchfinder.devices.cuda.CudaDevice` (a real CUDA GPU); :func:`batchfinder.devices.resolve.resolve_device`
turns the public ``device`` argument into one. The engine never calls ``torch.cuda`` itself.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..memory.allocator import CachingAllocator

__all__ = ["DeviceBackend", "DeviceLike", "moved_to", "swapped_data"]


class DeviceBackend(ABC):
    """Where trials run and how their memory is measured."""

    #: The torch device tensors of a trial live on.
    torch_device: torch.device

    #: True when the device charges memory with the same accounting as the fake-tensor estimator (the simulated
    #: GPU), so that a prediction is exact on it.
    accounting_is_exact: bool = False

    #: True when memory comes from a caching allocator's segments (a real GPU, the default simulated GPU): a trial
    #: then runs out of memory on reserved bytes, which is what a prediction for it must budget.
    reserves_segments: bool = True

    #: cuBLAS workspace bytes the device holds per handle from before the first trial, that a prediction must add
    #: (0 where they are not charged separately: on a real GPU they are part of every trial's measured baseline).
    workspace_bytes: int = 0

    #: True for devices that stand in for a GPU on the CPU: memory a real GPU would already hold before the search
    #: (a parallel wrapper's buffers) has to be charged to them explicitly.
    simulated: bool = False

    #: Which kernels the device's memory follows (:mod:`batchfinder.memory.kernels`): ``"cuda"`` on a GPU and, by
    #: default, on the simulated GPU; an estimate made for the device follows the same.
    kernels: str = "cuda"

    #: The compute capability attention kernels are chosen for (an A100's where unknown).
    compute_capability: tuple[int, int] = (8, 0)

    def kernel_counts(self) -> dict[str, int]:
        """How often each kernel model applied on this device so far (none on a real GPU: its kernels are its own)."""
        return {}

    def kernel_notes(self, since: dict[str, int] | None = None) -> list[str]:
        """Which kernel models applied (since the counts ``since`` of :meth:`kernel_counts`), one line each."""
        return []

    def check_precision(self, precision: str) -> None:
        """Raise a ``ValueError`` when this device cannot train in ``precision`` (every precision is fine here)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """A short description for reports, e.g. ``'SimulatedGPU(64.00 MiB)'`` or ``'NVIDIA H100 80GB HBM3'``."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int | None:
        """Total memory the device offers to this process (None when unknown)."""

    @abstractmethod
    def memory_allocated(self) -> int:
        """Bytes currently held by tensors on the device."""

    @abstractmethod
    def max_memory_allocated(self) -> int:
        """Peak of :meth:`memory_allocated` since the last :meth:`reset_peak_memory_stats`."""

    @abstractmethod
    def reset_peak_memory_stats(self) -> None:
        """Start a new peak measurement at the current level."""

    def memory_reserved(self) -> int:
        """Bytes the device's allocator holds (allocated plus cached); without a cache, :meth:`memory_allocated`."""
        return self.memory_allocated()

    def max_memory_reserved(self) -> int:
        """Peak of :meth:`memory_reserved` since the last :meth:`reset_peak_memory_stats`."""
        return self.max_memory_allocated()

    def memory_budget(self) -> int | None:
        """The most this process's tensors (model included) can hold now, measured: what is reserved plus what is
        free on the device, within any limit set on the search. ``None`` where nothing measures it."""
        return None

    def memory_report(self) -> str:
        """A short account of the device's memory for error messages (who holds what), or ``""``."""
        return ""

    def reservation_for(self, sizes: list[int]) -> int:
        """Bytes the device's allocator reserves to hold blocks of ``sizes`` from an empty cache: PyTorch's caching
        allocator's segments (see :mod:`batchfinder.memory.allocator`)."""
        allocator = CachingAllocator(None)
        for size in sizes:
            allocator.malloc(size)
        return allocator.reserved

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op where work is synchronous)."""

    def empty_cache(self) -> None:
        """Return cached, unused memory to the device (a no-op where there is no cache)."""

    def measuring(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which a trial's steps run (the simulated GPU charges memory only inside it)."""
        return contextlib.nullcontext()

    @abstractmethod
    def to_device(self, batch: Any) -> Any:
        """Move every tensor of a host batch to the device, as a training loop would (call inside :meth:`measuring`)."""

    @abstractmethod
    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when the model's tensors are somewhere this device cannot use them."""

    @contextlib.contextmanager
    def resident(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Keep the model (and an existing optimizer's state) on the device for the duration of a search."""
        yield

    def __repr__(self) -> str:
        return self.name


DeviceLike = DeviceBackend | torch.device | str | None


@contextlib.contextmanager
def moved_to(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Move every parameter and buffer of ``model`` to ``device`` for the length of the block (see
    :func:`swapped_data`)."""
    with swapped_data(model, lambda data: data.to(device), only=lambda tensor: tensor.device != device):
        yield


@contextlib.contextmanager
def swapped_data(
    model: nn.Module,
    convert: Callable[[torch.Tensor], torch.Tensor],
    *,
    only: Callable[[torch.Tensor], bool] = lambda tensor: True,
) -> Iterator[None]:
    """Give every parameter and buffer of ``model`` (each once, also when shared) the data ``convert(data)`` for
    the length of the block, keeping the very same tensor objects (their ``.data`` is swapped, as ``model.to`` does
    for parameters), so that references held elsewhere (an optimizer, a snapshot of the user's state, a buffer two
    modules share) follow. On exit every tensor gets its original data back; gradients made meanwhile are dropped."""
    swapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for tensor in (*model.parameters(), *model.buffers()):
            if id(tensor) not in swapped and only(tensor):
                original = tensor.data
                swapped[id(tensor)] = (tensor, original)
                tensor.data = convert(original)
        yield
    finally:
        for tensor, original in swapped.values():
            if isinstance(tensor, nn.Parameter):
                tensor.grad = None
            tensor.data = original
