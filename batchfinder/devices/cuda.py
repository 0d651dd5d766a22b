"""A real CUDA GPU behind the :class:`~batchfinder.devices.base.DeviceBackend` interface.

This is the only module that reads ``torch.cuda`` memory statistics, and it refuses to exist without CUDA (those
statistics silently return 0 on a machine without a GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..memory.gpus import cublas_workspace_bytes
from ..training.batching import plain_containers
from ..units import format_bytes, parse_bytes
from .base import DeviceBackend, moved_to

__all__ = ["CudaDevice", "warm_up_cublas"]


class CudaDevice(DeviceBackend):
    """The CUDA GPU ``device`` (``"cuda"``, ``"cuda:1"`` or a ``torch.device``).

    ``memory_limit`` (bytes or a string such as ``"16GiB"``) makes the GPU behave like a smaller one during the
    search, through ``torch.cuda.set_per_process_memory_fraction``; the previous fraction is restored afterwards (see
    :meth:`~batchfinder.devices.base.DeviceBackend.limited`, also for torch 2.5-2.7, which cannot read it).

    Only the raw ``torch.cuda`` calls live here, each for this backend's device index; what a trial does around
    them is :class:`~batchfinder.devices.base.DeviceBackend`'s, shared with the simulated GPU.
    """

    def __init__(self, device: torch.device | str = "cuda", *, memory_limit: int | str | None = None) -> None:
        if not torch.cuda.is_available():
            raise ValueError(
                "no CUDA GPU is available on this machine; use device=batchfinder.SimulatedGPU('16GiB') instead"
            )
        parsed = torch.device(device)
        if parsed.type != "cuda":
            raise ValueError(f"CudaDevice needs a CUDA device, got {device!r}")
        self.index: int = parsed.index if parsed.index is not None else torch.cuda.current_device()
        """The CUDA device index every ``torch.cuda`` call of this backend names."""
        self.torch_device = torch.device("cuda", self.index)
        properties = torch.cuda.get_device_properties(self.index)
        self._total = properties.total_memory
        self.workspace_bytes = cublas_workspace_bytes((properties.major, properties.minor))
        self.memory_limit = None if memory_limit is None else parse_bytes(memory_limit, argument="memory_limit")
        if self.memory_limit is not None and self.memory_limit > self._total:
            raise ValueError(
                f"memory_limit={format_bytes(self.memory_limit)} is more than the GPU's {format_bytes(self._total)}"
            )

    @property
    def name(self) -> str:
        """The GPU's name, with the limit set on the search and, when it is on, ``cudnn.benchmark`` (cuDNN then
        picks algorithms by timing them, with workspaces sized to the memory free at that moment)."""
        label = torch.cuda.get_device_name(self.index)
        notes = [f"limited to {format_bytes(self.memory_limit)}"] if self.memory_limit is not None else []
        if torch.backends.cudnn.benchmark:
            notes.append("cudnn.benchmark on")
        return f"{label} ({', '.join(notes)})" if notes else label

    @property
    def capacity_bytes(self) -> int:
        return self.memory_limit if self.memory_limit is not None else self._total

    # -- the raw torch.cuda calls ------------------------------------------------------------------------------
    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.index)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.index)

    def memory_reserved(self) -> int:
        return torch.cuda.memory_reserved(self.index)

    def max_memory_reserved(self) -> int:
        return torch.cuda.max_memory_reserved(self.index)

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.index)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.index)
        return free, total

    def total_memory(self) -> int:
        return self._total

    def read_memory_fraction(self) -> float | None:
        """The fraction in force; None on torch 2.5-2.7, which have no ``get_per_process_memory_fraction``."""
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        return None if getter is None else float(getter(self.index))

    def write_memory_fraction(self, fraction: float) -> None:
        torch.cuda.set_per_process_memory_fraction(fraction, self.index)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()`` empties the *current* device's cache: this backend's device is made current."""
        with torch.cuda.device(self.index):
            torch.cuda.empty_cache()

    def check_precision(self, precision: str) -> None:
        """bfloat16 needs a GPU that supports it (compute capability 8.0 or later, or emulation). The question is
        asked of this backend's device: ``torch.cuda.is_bf16_supported()`` answers for the current one."""
        if precision.startswith("bf16"):
            with torch.cuda.device(self.index):
                supported = torch.cuda.is_bf16_supported()
            if not supported:
                raise ValueError(
                    f"precision={precision!r}: {self.name} does not support bfloat16; use precision='16-mixed' instead"
                )

    def memory_report(self) -> str:
        free, total = self.mem_get_info()
        reserved = self.memory_reserved()
        others = max(total - free - reserved, 0)
        return (
            f"of the GPU's {format_bytes(total)}, {format_bytes(others)} are held outside this search's tensors (the "
            f"CUDA context, other processes), PyTorch here reserves {format_bytes(reserved)} and "
            f"{format_bytes(free)} are free"
        )

    def to_device(self, batch: Any) -> Any:
        return tree_map(lambda v: v.to(self.torch_device) if isinstance(v, torch.Tensor) else v, plain_containers(batch))

    def check_model(self, model: nn.Module) -> None:
        devices = {t.device for t in (*model.parameters(), *model.buffers())}
        if len(devices) > 1:
            raise ValueError(f"the model's tensors are spread over {sorted(map(str, devices))}; put it on one device")

    @contextlib.contextmanager
    def hold_model(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """A CPU model is moved to the GPU for the search (the very same tensor objects, so restores between
        trials write into what the trials use) and gets its CPU data back afterwards."""
        devices = {t.device for t in (*model.parameters(), *model.buffers())}
        if devices and devices not in ({self.torch_device}, {torch.device("cpu")}):
            raise ValueError(f"the model is on {sorted(map(str, devices))}; move it to {self.torch_device} or the CPU")
        if devices == {torch.device("cpu")} != {self.torch_device}:
            if optimizer is not None and optimizer.state:
                raise ValueError(
                    "the optimizer already has state on the CPU: move the model to the GPU before creating the optimizer"
                )
            if any(param.grad is not None for param in model.parameters()):
                raise ValueError("the CPU model has gradients: clear them (optimizer.zero_grad()) or move it to the GPU")
        with moved_to(model, self.torch_device):
            yield

    def warm_up(self) -> None:
        """Create cuBLAS's workspaces before anything is measured (:func:`warm_up_cublas`)."""
        warm_up_cublas(self.torch_device)
        self.synchronize()


def warm_up_cublas(device: torch.device) -> None:
    """Run small matrix multiplies forward and backward on ``device``, so that cuBLAS and cuBLASLt have created
    their workspaces before anything is measured: PyTorch keeps one per (handle, stream) for the life of the
    process (``cublas_handle_stream_to_workspace`` in ``aten/src/ATen/cuda/CublasHandlePool.cpp``), handles are per
    thread, and the backward runs on autograd's own device thread, so a forward multiply alone leaves the backward
    thread's workspace to the first measurement. No random numbers: the CUDA RNG stays as it is."""
    with torch.enable_grad():
        # A bias makes addmm use cuBLASLt, whose workspace is separate from cuBLAS's on some versions.
        weight = torch.ones(16, 16, device=device, requires_grad=True)
        bias = torch.ones(16, device=device, requires_grad=True)
        (nn.functional.linear(weight, weight, bias) @ weight).sum().backward()
    del weight, bias
