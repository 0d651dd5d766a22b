"""Turning the public ``device`` argument into a :class:`~batchfinder.devices.base.DeviceBackend`."""

from __future__ import annotations

import torch
from torch import nn

from .base import DeviceBackend, DeviceLike
from .cuda import CudaDevice
from .simulated import SimulatedGPU

__all__ = ["resolve_device"]


def resolve_device(
    device: DeviceLike, *, memory_limit: int | str | None = None, model: nn.Module | None = None
) -> DeviceBackend:
    """Turn the ``device`` argument of the public functions into a backend.

    ``None`` means the GPU ``model`` lives on when it lives on one, and the current CUDA GPU otherwise. Strings and ``torch.device`` naming CUDA give a
    :class:`~batchfinder.devices.cuda.CudaDevice`; ``"sim:64MiB"`` gives a :class:`~batchfinder.devices.simulated.SimulatedGPU`
    of that capacity (``"sim:64MiB:ideal"`` with allocated-bytes-only accounting); a backend instance is returned as
    it is.
    """
    if isinstance(device, DeviceBackend):
        if memory_limit is not None and not isinstance(device, CudaDevice):
            raise ValueError("memory_limit applies to CUDA devices only; give a SimulatedGPU its capacity instead")
        return device
    if device is None:
        if model is not None:
            gpus = {t.device for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"}
            if len(gpus) == 1:
                return CudaDevice(gpus.pop(), memory_limit=memory_limit)
        if torch.cuda.is_available():
            return CudaDevice("cuda", memory_limit=memory_limit)
        raise ValueError(
            "device was not given and no CUDA GPU is available. To search on this machine, pass a simulated GPU "
            "of the size you train on, e.g. device=batchfinder.SimulatedGPU('16GiB')."
        )
    if isinstance(device, str) and device.strip().lower().startswith("sim:"):
        if memory_limit is not None:
            raise ValueError("memory_limit applies to CUDA devices only; 'sim:CAPACITY' already sets the capacity")
        capacity, _, allocator = device.strip()[4:].partition(":")
        return SimulatedGPU(capacity, allocator=allocator or "caching")
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
