"""A real CUDA GPU behind the :class:`~batchfinder.devices.DeviceBackend` interface.

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

from .devices import DeviceBackend
from .units import format_bytes, parse_bytes

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
        label = torch.cuda.get_device_name(self.torch_device)
        if self.memory_limit is not None:
            return f"{label} (limited to {format_bytes(self.memory_limit)})"
        return label

    @property
    def capacity_bytes(self) -> int:
        return self.memory_limit if self.memory_limit is not None else self._total

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.torch_device)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.torch_device)

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.torch_device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        if self.memory_limit is None:
            yield
            return
        index = self.torch_device.index
        previous = torch.cuda.get_per_process_memory_fraction(index) if hasattr(
            torch.cuda, "get_per_process_memory_fraction"
        ) else 1.0
        torch.cuda.set_per_process_memory_fraction(self.memory_limit / self._total, index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(previous, index)

    def to_device(self, batch: Any) -> Any:
        return tree_map(lambda v: v.to(self.torch_device) if isinstance(v, torch.Tensor) else v, batch)

    def check_model(self, model: nn.Module) -> None:
        devices = {t.device for t in (*model.parameters(), *model.buffers())}
        if len(devices) > 1:
            raise ValueError(f"the model's tensors are spread over {sorted(map(str, devices))}; put it on one device")

    @contextlib.contextmanager
    def resident(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Move a CPU model to the GPU for the search and put the very same CPU tensors back afterwards."""
        devices = {t.device for t in (*model.parameters(), *model.buffers())}
        if not devices or devices == {self.torch_device}:
            yield
            return
        if devices != {torch.device("cpu")}:
            raise ValueError(f"the model is on {sorted(map(str, devices))}; move it to {self.torch_device} or the CPU")
        if optimizer is not None and optimizer.state:
            raise ValueError(
                "the optimizer already has state on the CPU: move the model to the GPU before creating the optimizer"
            )
        if any(param.grad is not None for param in model.parameters()):
            raise ValueError("the CPU model has gradients: clear them (optimizer.zero_grad()) or move it to the GPU")
        moved_params: list[tuple[nn.Parameter, torch.Tensor]] = []
        moved_buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        try:
            for param in model.parameters():
                moved_params.append((param, param.data))
                param.data = param.data.to(self.torch_device)
            for module in model.modules():
                for key, buffer in list(module._buffers.items()):
                    if buffer is not None:
                        moved_buffers.append((module, key, buffer))
                        module._buffers[key] = buffer.to(self.torch_device)
            yield
        finally:
            for param, data in moved_params:
                param.grad = None
                param.data = data
            for module, key, buffer in moved_buffers:
                module._buffers[key] = buffer
