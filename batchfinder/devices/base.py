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
from ..training.host import host_side_loading
from ..units import format_bytes

__all__ = ["DeviceBackend", "DeviceBatches", "DeviceLike", "flush_autograd", "moved_to", "swapped_data"]


class DeviceBackend(ABC):
    """Where trials run and how their memory is measured.

    A backend provides a few raw operations (the statistics of ``torch.cuda``'s memory API: :meth:`memory_allocated`,
    :meth:`max_memory_allocated`, :meth:`memory_reserved`, :meth:`max_memory_reserved`,
    :meth:`reset_peak_memory_stats`, :meth:`empty_cache`, :meth:`synchronize`, :meth:`mem_get_info`, the per-process
    memory fraction, :meth:`warm_up`, :meth:`hold_model`, :meth:`charging`). Everything a trial does around them is
    written once here and runs on every backend alike: :meth:`resident`, :meth:`start_measurement`,
    :meth:`measuring`, :meth:`read_peaks`, :meth:`over_limit`, :meth:`memory_budget`, :meth:`check_memory_limit`.

    The order follows CUDA's semantics (``c10/cuda/CUDACachingAllocator.cpp``): ``resetPeakStats`` sets each peak to
    the *current* value, and ``reserved_bytes`` counts cached free segments, so the cache is emptied before the
    peaks are reset, or a trial's reserved peak would include what was cached before it.
    """

    #: The torch device tensors of a trial live on.
    torch_device: torch.device

    #: True when the device charges memory with the same accounting as the fake-tensor estimator (the simulated
    #: GPU), so that a prediction is exact on it.
    accounting_is_exact: bool = False

    #: True when memory comes from a caching allocator's segments (a real GPU, the default simulated GPU): a trial
    #: then runs out of memory on reserved bytes, which is what a prediction for it must budget.
    reserves_segments: bool = True

    #: cuBLAS workspace bytes the device holds per handle (the forward and the backward thread each have one) from
    #: before the first trial, that a prediction must add to the model.
    workspace_bytes: int = 0

    #: True for devices that stand in for a GPU on the CPU: memory a real GPU would already hold before the search
    #: (a parallel wrapper's buffers) has to be charged to them explicitly.
    simulated: bool = False

    #: The most the search may reserve on the device (``memory_limit``), None for no limit.
    memory_limit: int | None = None

    #: Which kernels the device's memory follows (:mod:`batchfinder.memory.kernels`): ``"cuda"`` on a GPU and, by
    #: default, on the simulated GPU; an estimate made for the device follows the same.
    kernels: str = "cuda"

    #: The compute capability attention kernels are chosen for (an A100's where unknown).
    compute_capability: tuple[int, int] = (8, 0)

    #: What convolutions charge as cuDNN's workspace with ``kernels="cuda"`` (:mod:`batchfinder.memory.cudnn`):
    #: ``"auto"``, ``"none"`` or bytes; None: that of an enclosing ``cudnn_workspace()`` block, else ``"auto"``.
    cudnn_workspace: str | int | None = None

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

    # -- raw operations ------------------------------------------------------------------------------------------
    @abstractmethod
    def memory_allocated(self) -> int:
        """Bytes currently held by tensors on the device."""

    @abstractmethod
    def max_memory_allocated(self) -> int:
        """Peak of :meth:`memory_allocated` since the last :meth:`reset_peak_memory_stats`."""

    @abstractmethod
    def reset_peak_memory_stats(self) -> None:
        """Set each peak to the current level (as CUDA does: cached segments count in the reserved peak)."""

    def memory_reserved(self) -> int:
        """Bytes the device's allocator holds (allocated plus cached); without a cache, :meth:`memory_allocated`."""
        return self.memory_allocated()

    def max_memory_reserved(self) -> int:
        """Peak of :meth:`memory_reserved` since the last :meth:`reset_peak_memory_stats`."""
        return self.max_memory_allocated()

    def mem_get_info(self) -> tuple[int, int] | None:
        """``(free, total)`` bytes of the device, as ``torch.cuda.mem_get_info``; None where nothing measures it."""
        return None

    def read_memory_fraction(self) -> float | None:
        """The per-process memory fraction in force (``torch.cuda.get_per_process_memory_fraction``); None where it
        cannot be read (no fraction on this device, or a torch without the getter)."""
        return None

    def write_memory_fraction(self, fraction: float) -> None:
        """Set the per-process memory fraction (``torch.cuda.set_per_process_memory_fraction``)."""
        raise NotImplementedError(f"{self.name} has no per-process memory fraction")

    def total_memory(self) -> int | None:
        """The device's whole memory, which a memory fraction is a fraction of (None where there is none)."""
        return self.capacity_bytes

    def holds(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor``'s memory is on this device (so that keeping it keeps device memory)."""
        return tensor.device == self.torch_device

    def charging(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which device operations are charged (the simulated GPU's accounting; nothing on a real GPU)."""
        return contextlib.nullcontext()

    def warm_up(self) -> None:
        """Create what the device keeps for the life of the process before anything is measured (cuBLAS's
        workspaces, one per handle and stream: the forward thread's and autograd's backward thread's)."""

    @contextlib.contextmanager
    def hold_model(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Put the model (and an existing optimizer's state) on the device for the length of the block."""
        yield

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op where work is synchronous)."""

    def empty_cache(self) -> None:
        """Return cached, unused memory to the device (a no-op where there is no cache)."""

    # -- the orchestration, shared by every backend ----------------------------------------------------------------
    @contextlib.contextmanager
    def resident(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Keep the model (and an existing optimizer's state) on the device for the duration of a search, with the
        device warmed up (its workspaces part of every trial's baseline, not a leak of the first trial) and
        ``memory_limit`` checked against what is then reserved.

        The cache is emptied first: blocks the user left cached would otherwise be split to hold the model and the
        workspaces (the allocator serves a request from a cached block best-fit), and the segment they came from
        could never be returned, counting in every trial's reserved peak."""
        self.synchronize()
        self.empty_cache()
        with self.hold_model(model, optimizer):
            with self.charging():
                self.warm_up()
            self.check_memory_limit()
            yield

    def check_memory_limit(self) -> None:
        """Refuse a ``memory_limit`` at or below what the device already reserves once its cache is emptied (the
        model, cuBLAS's workspaces, the user's tensors): no trial could fit under it."""
        if self.memory_limit is None:
            return
        self.synchronize()
        self.empty_cache()
        reserved = self.memory_reserved()
        if self.memory_limit <= reserved:
            raise ValueError(
                f"memory_limit={format_bytes(self.memory_limit)} is at or below the {format_bytes(reserved)} PyTorch "
                f"already reserves on {self.name} before any batch (the model, optimizer state, cuBLAS's workspaces "
                "and any other tensors of this process): no trial can fit under it. Raise memory_limit above "
                f"{format_bytes(reserved)}, or free device memory first"
            )

    def start_measurement(self) -> int:
        """Begin a trial's measurement and return its baseline (bytes allocated): wait for the device, empty the
        cache, *then* reset the peaks, so that memory the user (or an earlier search) left cached is not in the
        trial's reserved peak (CUDA's ``resetPeakStats`` sets the peak to the current reserved bytes)."""
        self.synchronize()
        self.empty_cache()
        self.reset_peak_memory_stats()
        return self.memory_allocated()

    def read_peaks(self) -> tuple[int, int]:
        """``(peak allocated, peak reserved)`` since :meth:`start_measurement`, once queued work has finished."""
        self.synchronize()
        return self.max_memory_allocated(), self.max_memory_reserved()

    def over_limit(self, peak_reserved: int) -> str | None:
        """Why a trial that reserved ``peak_reserved`` does not fit under ``memory_limit`` (None when it does). Where
        the limit is applied as a memory fraction the allocator never passes it; where it cannot be (a torch
        without ``get_per_process_memory_fraction``, see :meth:`limited`) this is how it is enforced."""
        if self.memory_limit is None or peak_reserved <= self.memory_limit:
            return None
        return (
            f"CUDA out of memory under memory_limit: the trial reserved {format_bytes(peak_reserved)}, more than "
            f"memory_limit={format_bytes(self.memory_limit)}"
        )

    @contextlib.contextmanager
    def limited(self) -> Iterator[None]:
        """Apply ``memory_limit`` as the per-process memory fraction for the block, never loosening a stricter
        fraction the user had set, and restore the previous fraction afterwards.

        The allocator checks the fraction only when it asks the driver for a new segment, so blocks it already
        caches would let a trial pass the limit: the cache is emptied first. Where the fraction in force cannot be
        read (torch 2.5-2.7 have no ``get_per_process_memory_fraction``), setting one would overwrite a stricter
        fraction of the user's and restoring would guess: the fraction is left alone and the limit is enforced on
        each trial's measured reserved peak (:meth:`over_limit`).
        """
        total = self.total_memory()
        previous = self.read_memory_fraction() if self.memory_limit is not None and total else None
        if previous is None or self.memory_limit is None or not total:
            yield
            return
        self.empty_cache()
        self.write_memory_fraction(min(previous, self.memory_limit / total))
        try:
            yield
        finally:
            self.write_memory_fraction(previous)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Context in which a trial's steps run: charged where the device charges (:meth:`charging`), within
        ``memory_limit`` (:meth:`limited`)."""
        with self.limited(), self.charging():
            yield

    def memory_budget(self) -> int | None:
        """The most this process's tensors (model included) can hold now, measured: what is reserved plus what is
        free on the device (so other processes and the CUDA context are left out), within ``memory_limit``.
        ``None`` where nothing measures it."""
        info = self.mem_get_info()
        if info is None:
            return None
        budget = self.memory_reserved() + info[0]
        return budget if self.memory_limit is None else min(budget, self.memory_limit)

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

    @abstractmethod
    def to_device(self, batch: Any) -> Any:
        """Move every tensor of a host batch to the device, as a training loop would (call inside :meth:`measuring`)."""

    @abstractmethod
    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when the model's tensors are somewhere this device cannot use them."""

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
    keep_on_host: Callable[[torch.Tensor], bool] = lambda tensor: False,
) -> Iterator[None]:
    """Give every parameter and buffer of ``model`` (each once, also when shared) the data ``convert(data)`` for
    the length of the block, keeping the very same tensor objects (their ``.data`` is swapped, as ``model.to`` does
    for parameters), so that references held elsewhere (an optimizer, a snapshot of the user's state, a buffer two
    modules share) follow. On exit every tensor gets its original data back; gradients made meanwhile are dropped.

    Originals for which ``keep_on_host(original)`` is true (data on the device, e.g. float32 weights a true-precision
    search casts) are kept as host copies for the block and copied back on exit, so that the device does not hold
    them next to their converted data (6 bytes per parameter instead of 2 for ``"16-true"``)."""
    swapped: dict[int, tuple[torch.Tensor, torch.Tensor, torch.device | None]] = {}
    try:
        for tensor in (*model.parameters(), *model.buffers()):
            if id(tensor) not in swapped and only(tensor):
                original = tensor.data
                home: torch.device | None = None
                if keep_on_host(original):
                    home = original.device
                    with host_side_loading():  # a copy to the host, not a device operation
                        kept = original.detach().to("cpu", copy=True)
                else:
                    kept = original
                swapped[id(tensor)] = (tensor, kept, home)
                tensor.data = convert(original)
                del original
        yield
    finally:
        for tensor, kept, home in swapped.values():
            if isinstance(tensor, nn.Parameter):
                tensor.grad = None
            tensor.data = kept if home is None else kept.to(home)


def flush_autograd(device: DeviceBackend) -> None:
    """Run a trivial backward pass on ``device``'s autograd thread: the graph of a backward pass that raised (out
    of memory) is only released by the next backward there, and until then holds the failed step's activations."""
    with host_side_loading():
        leaf = torch.ones((), device=device.torch_device, requires_grad=True)
        (leaf * 1.0).backward()
    del leaf


class DeviceBatches:
    """The device batch of each step: one batch moved once and reused (a trial), or, for a list of host batches (the
    confirmation run), each step's own, moved before the previous one is dropped as a training loop does (the last
    one again for any extra step)."""

    def __init__(self, device: DeviceBackend, host: Any, per_step: bool) -> None:
        self.device = device
        self.host = host
        self.per_step = per_step
        self.index = -1
        self.current: Any = None if self.per_step else device.to_device(host)

    def again(self) -> Any:
        """The current step's batch moved to the device once more: a later micro-batch of the step (the first one
        is still held, so that this errs by one batch on the safe side)."""
        return self.device.to_device(self.host[max(self.index, 0)] if self.per_step else self.host)

    def get(self, index: int) -> Any:
        """The device batch of step ``index``."""
        if self.per_step:
            index = min(index, len(self.host) - 1)
            if index != self.index:
                self.current = self.device.to_device(self.host[index])  # the previous batch goes after this one arrives
                self.index = index
        return self.current
