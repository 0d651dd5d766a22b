"""The devices layer: one interface, several implementations.

:mod:`.base` is the interface every trial runs against (:class:`~batchfinder.devices.base.DeviceBackend`);
:mod:`.cuda` is a real CUDA GPU (the only reader of ``torch.cuda`` memory statistics), :mod:`.simulated` the
simulated GPU that charges what a GPU would hold, :mod:`.nvml` reads the board through NVML, and :mod:`.resolve`
turns the public ``device`` argument into a backend. May import :mod:`batchfinder.memory` and the layers below it,
never :mod:`batchfinder.engine` or a front end.
"""

from __future__ import annotations

from .base import DeviceBackend
from .cuda import CudaDevice
from .simulated import SimulatedGPU

__all__ = ["DeviceBackend", "CudaDevice", "SimulatedGPU"]
