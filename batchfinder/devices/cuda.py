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

from ..training.batching import plain_containers
from ..units import format_bytes, parse_bytes
from .base import DeviceBackend, moved_to

__all__ = ["CudaDevice"]


class CudaDevice(DeviceBackend):
    """The CUDA GPU ``device`` (``"cuda"``, ``"cuda:1"`` or a ``torch.device``).

    ``memory_limit`` (bytes or a string such as ``"16GiB"``) makes the GPU behave like a smaller one during the
    search, through ``torch.cuda.set_per_process_memory_fraction``; the previous fraction is restored afterwards.
    """

    def __init__(self, device: torch.device | str = "cuda", *, memory_limit: int | str | None = None) -> None:
        if not torch.cuda.is_available():
            raise ValueError(
                "no CUDA GPU is available on this machine; use device=batchfinder.SimulatedGPU('16GiB') instead"
            )
        parsed = torch.device(device)
        if parsed.type != "cuda":
            raise ValueError(f"CudaDevice needs a CUDA device, got {device!r}")
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        self.torch_device = torch.device("cuda", index)
        self._total = torch.cuda.get_device_properties(index).total_memory
        self.memory_limit = None if memory_limit is None else parse_bytes(memory_limit, argument="memory_limit")
        if self.memory_limit is not None and self.memory_limit > self._total:
            raise ValueError(
                f"memory_limit={format_bytes(self.memory_limit)} is more than the GPU's {format_bytes(self._total)}"
            )

    @property
    def name(self) -> str:
        """The GPU's name, with the limit set on the search and, when it is on, ``cudnn.benchmark`` (cuDNN then
        picks algorithms by timing them, with workspaces sized to the memory free at that moment)."""
        label = torch.cuda.get_device_name(self.torch_device)
        notes = [f"limited to {format_bytes(self.memory_limit)}"] if self.memory_limit is not None else []
        if torch.backends.cudnn.benchmark:
            notes.append("cudnn.benchmark on")
        return f"{label} ({', '.join(notes)})" if notes else label

    @property
    def capacity_bytes(self) -> int:
        return self.memory_limit if self.memory_limit is not None else self._total

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.torch_device)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.torch_device)

    def memory_reserved(self) -> int:
        return torch.cuda.memory_reserved(self.torch_device)

    def max_memory_reserved(self) -> int:
        return torch.cuda.max_memory_reserved(self.torch_device)

    def memory_budget(self) -> int:
        """What this process's tensors can hold: what PyTorch reserves now plus what the driver reports free (so
        other processes and the CUDA context are left out), within ``memory_limit``."""
        free, _total = torch.cuda.mem_get_info(self.torch_device)
        budget = self.memory_reserved() + free
        return budget if self.memory_limit is None else min(budget, self.memory_limit)

    def check_precision(self, precision: str) -> None:
        """bfloat16 needs a GPU that supports it (compute capability 8.0 or later, or emulation)."""
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"precision={precision!r}: {self.name} does not support bfloat16; use precision='16-mixed' instead"
            )

    def memory_report(self) -> str:
        free, total = torch.cuda.mem_get_info(self.torch_device)
        reserved = self.memory_reserved()
        others = max(total - free - reserved, 0)
        return (
            f"of the GPU's {format_bytes(total)}, {format_bytes(others)} are held outside this search's tensors (the "
            f"CUDA context, other processes), PyTorch here reserves {format_bytes(reserved)} and "
            f"{format_bytes(free)} are free"
        )

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.torch_device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Apply ``memory_limit`` for the trial's steps, never loosening a stricter fraction the user had set.

        The allocator checks the fraction only when it asks the driver for a new segment, so blocks it already
        caches would let a trial pass the limit: the cache is emptied first.
        """
        if self.memory_limit is None:
            yield
            return
        index = self.torch_device.index
        previous = torch.cuda.get_per_process_memory_fraction(index) if hasattr(
            torch.cuda, "get_per_process_memory_fraction"
        ) else 1.0
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(previous, self.memory_limit / self._total), index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(previous, index)

    def to_device(self, batch: Any) -> Any:
        return tree_map(lambda v: v.to(self.torch_device) if isinstance(v, torch.Tensor) else v, plain_containers(batch))

    def check_model(self, model: nn.Module) -> None:
        devices = {t.device for t in (*model.parameters(), *model.buffers())}
        if len(devices) > 1:
            raise ValueError(f"the model's tensors are spread over {sorted(map(str, devices))}; put it on one device")

    @contextlib.contextmanager
    def resident(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Keep the model on the GPU for the search: a CPU model is moved there (the very same tensor objects, so
        restores between trials write into what the trials use) and gets its CPU data back afterwards. cuBLAS's
        workspaces are created first, so that they are part of every trial's baseline rather than a leak of the
        first one."""
        devices = {t.device for t in (*model.parameters(), *model.buffers())}
        if devices and devices not in ({self.torch_device}, {torch.device("cpu")}):
            raise ValueError(f"the model is on {sorted(map(str, devices))}; move it to {self.torch_device} or the CPU")
        if devices == {torch.device("cpu")}:
            if optimizer is not None and optimizer.state:
                raise ValueError(
                    "the optimizer already has state on the CPU: move the model to the GPU before creating the optimizer"
                )
            if any(param.grad is not None for param in model.parameters()):
                raise ValueError("the CPU model has gradients: clear them (optimizer.zero_grad()) or move it to the GPU")
        self.warm_up()
        with moved_to(model, self.torch_device):
            yield

    def warm_up(self) -> None:
        """Run small matrix multiplies forward and backward on the GPU, so that cuBLAS and cuBLASLt have created
        their workspaces (one per handle and stream; the backward runs on autograd's own thread) before anything is
        measured."""
        with torch.enable_grad():
            # No random numbers (the CUDA RNG stays as it is); a bias makes addmm use cuBLASLt, whose workspace is
            # separate from cuBLAS's.
            weight = torch.ones(16, 16, device=self.torch_device, requires_grad=True)
            bias = torch.ones(16, device=self.torch_device, requires_grad=True)
            (nn.functional.linear(weight, weight, bias) @ weight).sum().backward()
        del weight, bias
        torch.cuda.synchronize(self.torch_device)
