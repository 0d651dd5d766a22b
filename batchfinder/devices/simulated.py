"""A simulated GPU: real computation on the CPU, memory charged as a GPU of a chosen capacity would hold it.

>>> import torch, batchfinder as bf
>>> gpu = bf.SimulatedGPU("64MiB")
>>> with gpu:
...     x = torch.zeros(1000)          # 4,000 bytes: a 4,096-byte block (rounded to 512 B) of a 2 MiB segment
>>> gpu.memory_allocated(), gpu.memory_reserved()
(4096, 2097152)

What it charges: every storage that aten operations create inside it (parameters, buffers, gradients, optimizer
state, activations, temporaries), and every storage that existed before the first time an operation inside
consumes it (as a transfer to the device would be), each rounded up to 512 bytes. A view costs nothing. What is
charged is released when it is freed. Nothing is charged while a DataLoader produces a batch (host-side loading).
By default the charges go through a model of PyTorch's CUDA caching allocator (:mod:`batchfinder.memory.allocator`), so
that memory is reserved in segments, cached blocks are reused, and a charge fails where the real allocator would.

Kernels: where CUDA's kernels allocate differently from the CPU's (scaled-dot-product attention, the optimizers'
foreach step), the simulated GPU charges what CUDA's would (:mod:`batchfinder.memory.kernels`; ``kernels="cpu"``
keeps the CPU's).

What it does not model: the CUDA context (0.3-0.5 GiB per process; :meth:`SimulatedGPU.like` subtracts one),
cuDNN workspaces and memory used by other processes. Those are why the recommendation keeps a 0.8 safety factor.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..memory.accounting import (
    ChargingMode,
    MemoryLedger,
    local_tensor,
    round_allocation,
    tensor_storages,
)
from ..memory.allocator import ALLOCATORS, CachingAllocator
from ..memory.gpus import CUDA_CONTEXT_BYTES, lookup_gpu
from ..memory.kernels import DEFAULT_CAPABILITY, KernelModels, check_kernels, describe_usage
from ..training.batching import plain_containers
from ..training.host import host_side_loading
from ..training.optimizers import state_tensors
from ..units import format_bytes, parse_bytes
from .base import DeviceBackend

__all__ = ["SimulatedGPU"]

"""``allocator=`` values: ``"caching"`` (the default) models PyTorch's CUDA caching allocator (segments, cached blocks,
fragmentation; see :mod:`batchfinder.memory.allocator`); ``"ideal"`` charges allocated bytes only (each storage rounded to
512 B)."""


class SimulatedGPU(DeviceBackend):
    """A GPU of ``capacity`` bytes (an int, or a string such as ``"64MiB"``, ``"16GB"``, ``"16GiB"``) on the CPU.

    Use it as the ``device`` of :func:`~batchfinder.find_batch_size`, or as a context manager around any code to
    measure it under the same accounting (``with SimulatedGPU("8GiB") as gpu: ...; gpu.max_memory_allocated()``).
    Allocations past the capacity raise ``torch.OutOfMemoryError`` with a CUDA-style message.

    ``allocator="caching"`` (the default) models PyTorch's CUDA caching allocator in its default configuration
    (512-byte rounding, 2 MiB and 20 MiB segments, cached blocks reused best-fit, split and merged, cached segments
    released and the request retried once before failing): it fails where a real GPU's allocator would, on
    *reserved* bytes, so that fragmentation can end a trial although allocated memory is below the capacity.
    ``allocator="ideal"`` charges allocated bytes only and fails where they would pass the capacity.
    ``expandable_segments=True`` models ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (one growing segment
    per pool, mapped page by page: far less fragmentation).
    ``kernels="cuda"`` (the default) charges attention and optimizer steps as CUDA's kernels allocate them, on a GPU
    of compute capability ``compute_capability`` (sm80 unless :meth:`like` names a GPU; see
    :mod:`batchfinder.memory.kernels`); ``kernels="cpu"`` charges what the CPU's kernels allocate.
    """

    torch_device = torch.device("cpu")
    accounting_is_exact = True
    simulated = True

    def __init__(
        self,
        capacity: int | str,
        *,
        label: str = "GPU 0",
        allocator: str = "caching",
        workspace_bytes: int = 0,
        expandable_segments: bool = False,
        kernels: str = "cuda",
        compute_capability: tuple[int, int] = DEFAULT_CAPABILITY,
    ) -> None:
        self.kernels = check_kernels(kernels)
        self.compute_capability = tuple(compute_capability)
        self.kernel_usage: Counter[str] = Counter()
        """Which kernel models applied inside this device so far, and how often (:mod:`batchfinder.memory.kernels`)."""
        self._models: KernelModels | None = None
        self._capacity = parse_bytes(capacity, argument="capacity")
        if allocator not in ALLOCATORS:
            raise ValueError(f"allocator={allocator!r} is not a simulated allocator; choose one of {list(ALLOCATORS)}")
        if expandable_segments and allocator != "caching":
            raise ValueError("expandable_segments=True is a setting of the caching allocator: use allocator='caching'")
        if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes < 0:
            raise ValueError(f"workspace_bytes={workspace_bytes!r} must be a whole number of bytes, 0 for none")
        self.allocator = allocator
        self.reserves_segments = allocator == "caching"
        self.workspace_bytes = workspace_bytes
        self.like_gpu: str | None = None
        """The GPU this device stands for when built with :meth:`like`."""
        self.ledger = MemoryLedger(
            self._capacity,
            device_label=f"{label} (simulated)",
            allocator=(
                CachingAllocator(self._capacity, expandable_segments=expandable_segments)
                if allocator == "caching"
                else None
            ),
            workspace_bytes=workspace_bytes,
        )
        self._depth = 0
        self._mode: ChargingMode | None = None
        self._lock = threading.Lock()

    @classmethod
    def like(
        cls, gpu: str, *, allocator: str = "caching", context_bytes: int = CUDA_CONTEXT_BYTES, kernels: str = "cuda"
    ) -> "SimulatedGPU":
        """A simulated GPU shaped like a real one (a name from :mod:`batchfinder.memory.gpus`, e.g. ``"A100-40GB"``).

        Its capacity is the board's memory less the CUDA context (``context_bytes``, 512 MiB by default: 300-500
        MiB with lazy module loading on current drivers, see :mod:`batchfinder.memory.gpus`), which lives outside
        PyTorch's allocator. The caching allocator is modelled (``allocator="caching"``), and cuBLAS's workspace
        for that architecture (8,519,680 B before Hopper, 32 MiB from Hopper on) is charged at the first matrix
        multiply of the forward pass and again at the first of the backward pass, which runs on autograd's own
        thread with a cuBLAS handle of its own. Attention kernels are chosen for the GPU's compute capability.
        """
        spec = lookup_gpu(gpu)
        if isinstance(context_bytes, bool) or not isinstance(context_bytes, int) or context_bytes < 0:
            raise ValueError(f"context_bytes={context_bytes!r} must be a whole number of bytes")
        capacity = spec.memory_bytes - context_bytes
        if capacity <= 0:
            raise ValueError(
                f"context_bytes={format_bytes(context_bytes)} leaves nothing of the {spec.name}'s "
                f"{format_bytes(spec.memory_bytes)}: the CUDA context must be smaller than the GPU"
            )
        device = cls(
            capacity, allocator=allocator, workspace_bytes=spec.workspace_bytes, kernels=kernels,
            compute_capability=spec.compute_capability,
        )
        device.like_gpu = spec.name
        return device

    # -- DeviceBackend ----------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        suffix = ", allocated bytes only" if self.allocator == "ideal" else ""
        if self.like_gpu is not None:
            return f"SimulatedGPU(like {self.like_gpu}: {format_bytes(self._capacity)} after the CUDA context{suffix})"
        return f"SimulatedGPU({format_bytes(self._capacity)}{suffix})"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def memory_allocated(self) -> int:
        """Bytes charged now, like ``torch.cuda.memory_allocated()``."""
        return self.ledger.allocated

    def max_memory_allocated(self) -> int:
        """Peak charged bytes since the last reset, like ``torch.cuda.max_memory_allocated()``."""
        return self.ledger.peak

    def reset_peak_memory_stats(self) -> None:
        """Like ``torch.cuda.reset_peak_memory_stats()``."""
        self.ledger.reset_peak()

    def memory_reserved(self) -> int:
        """Bytes in the allocator's segments, like ``torch.cuda.memory_reserved()`` (allocated bytes when ideal)."""
        return self.ledger.reserved

    def max_memory_reserved(self) -> int:
        """Peak reserved bytes since the last reset, like ``torch.cuda.max_memory_reserved()``."""
        return self.ledger.peak_reserved

    def empty_cache(self) -> None:
        """Release cached segments that hold no tensor, like ``torch.cuda.empty_cache()``."""
        self.ledger.empty_cache()

    def reservation_for(self, sizes: list[int]) -> int:
        if self.allocator == "ideal":
            return sum(round_allocation(size) for size in sizes)
        return super().reservation_for(sizes)

    def mem_get_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes, like ``torch.cuda.mem_get_info()`` with nothing else on the GPU."""
        return self._capacity - self.ledger.reserved, self._capacity

    def holds(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor``'s storage is charged to this simulated GPU."""
        return self.ledger.is_charged(local_tensor(tensor).untyped_storage())

    def charging(self) -> "SimulatedGPU":
        """Charges the ledger for every operation inside (the simulated GPU as a context manager)."""
        return self

    def to_device(self, batch: Any) -> Any:
        """Copy each tensor of a host batch into a new, charged storage, as ``tensor.to('cuda')`` would."""

        def transfer(value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or self.ledger.is_charged(value.untyped_storage()):
                return value
            with host_side_loading():  # reading the host copy is not a device operation
                copy = value.clone()
            self.ledger.charge([copy.untyped_storage()])
            return copy

        return tree_map(transfer, plain_containers(batch))

    def check_model(self, model: nn.Module) -> None:
        devices = {t.device.type for t in _model_tensors(model)}
        if devices - {"cpu", "meta"}:
            raise ValueError(
                f"the model has tensors on {sorted(devices)}, but a SimulatedGPU runs the model on the CPU: "
                "move it there with model.cpu() first (or search on the real GPU with device='cuda')"
            )

    @contextlib.contextmanager
    def hold_model(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Charge the model's parameters and buffers (and the optimizer's existing state) while the search runs."""
        tensors = list(_model_tensors(model))
        if optimizer is not None:
            tensors.extend(state_tensors(optimizer))
        fresh = [s for s in {id(s): s for s in tensor_storages(tensors)}.values() if not self.ledger.is_charged(s)]
        self.ledger.charge(fresh)
        try:
            yield
        finally:
            for storage in fresh:
                self.ledger.release(storage)

    def warm_up(self) -> None:
        """As CUDA's first matrix multiplies on the forward and on autograd's backward thread: charge the two cuBLAS
        workspaces (``workspace_bytes`` each; none when 0), which belong to every trial's baseline."""
        self.ledger.charge_workspace("forward")
        self.ledger.charge_workspace("backward")

    # -- context manager --------------------------------------------------------------------------------------
    def __enter__(self) -> "SimulatedGPU":
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return self
            mode = ChargingMode(self.ledger)
            try:
                mode.__enter__()
            except BaseException:
                self._depth -= 1
                raise
            self._mode = mode
            models = KernelModels(self.kernels, self.compute_capability)
            try:
                models.__enter__()
            except BaseException:
                self._depth -= 1
                self._mode = None
                mode.__exit__(None, None, None)
                raise
            self._models = models
        return self

    def __exit__(self, *exc_info: Any) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth > 0 or self._mode is None:
                return
            mode, self._mode = self._mode, None
            models, self._models = self._models, None
        try:
            if models is not None:
                models.__exit__(*exc_info)
                self.kernel_usage.update(models.usage)
        finally:
            mode.__exit__(*exc_info)

    def kernel_counts(self) -> dict[str, int]:
        return dict(self.kernel_usage)

    def kernel_notes(self, since: dict[str, int] | None = None) -> list[str]:
        """Which kernel models applied (e.g. ``"attention: memory-efficient (CUDA), 24 calls"``), since the counts
        ``since`` of :meth:`kernel_counts` when given."""
        usage = Counter(self.kernel_usage)
        usage.subtract(since or {})
        return describe_usage(+usage, self.kernels)


def _model_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()
