"""The device interface every trial runs against, and :func:`resolve_device` that picks one.

Two backends implement it: :class:`~batchfinder.simulated.SimulatedGPU` (a GPU of a chosen capacity, simulated on
the CPU) and :class:`~batchfinder.cuda.CudaDevice` (a real CUDA GPU). The engine never calls ``torch.cuda`` itself.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["DeviceBackend", "resolve_device", "DeviceLike"]


class DeviceBackend(ABC):
    """Where trials run and how their memory is measured."""

    #: The torch device tensors of a trial live on.
    torch_device: torch.device

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


def resolve_device(device: DeviceLike, *, memory_limit: int | str | None = None) -> DeviceBackend:
    """Turn the ``device`` argument of the public functions into a backend.

    ``None`` means the current CUDA GPU when there is one. Strings and ``torch.device`` naming CUDA give a
    :class:`~batchfinder.cuda.CudaDevice`; ``"sim:64MiB"`` gives a :class:`~batchfinder.simulated.SimulatedGPU`
    of that capacity; a backend instance is returned as it is.
    """
    from .cuda import CudaDevice
    from .simulated import SimulatedGPU

    if isinstance(device, DeviceBackend):
        if memory_limit is not None and not isinstance(device, CudaDevice):
            raise ValueError("memory_limit applies to CUDA devices only; give a SimulatedGPU its capacity instead")
        return device
    if device is None:
        if torch.cuda.is_available():
            return CudaDevice("cuda", memory_limit=memory_limit)
        raise ValueError(
            "device was not given and no CUDA GPU is available. To search on this machine, pass a simulated GPU "
            "of the size you train on, e.g. device=batchfinder.SimulatedGPU('16GiB')."
        )
    if isinstance(device, str) and device.strip().lower().startswith("sim:"):
        if memory_limit is not None:
            raise ValueError("memory_limit applies to CUDA devices only; 'sim:CAPACITY' already sets the capacity")
        return SimulatedGPU(device.strip()[4:])
    if isinstance(device, (str, torch.device)):
        try:
            parsed = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device={device!r} is not a device: use 'cuda', 'cuda:N', 'sim:16GiB' or batchfinder.SimulatedGPU(...)"
            ) from exc
        if parsed.type == "cuda":
            return CudaDevice(parsed, memory_limit=memory_limit)
        raise ValueError(
            f"device={device!r}: batch sizes are searched on CUDA GPUs; a {parsed.type!r} device has no memory limit "
            "to find. On a machine without a GPU use device=batchfinder.SimulatedGPU('16GiB') (or 'sim:16GiB')."
        )
    raise TypeError(
        f"device must be a torch.device, a string such as 'cuda' or 'sim:16GiB', or a SimulatedGPU, "
        f"not {type(device).__name__}"
    )
