"""The device a benchmark runs on: a real CUDA GPU (optionally limited to a smaller capacity) or a simulated GPU.

Every finder sees the same accounting. batchfinder gets :meth:`BenchDevice.backend` as its ``device``; the other
tools run inside :meth:`BenchDevice.limited`, which on the CPU is a :class:`~batchfinder.SimulatedGPU` of the same
capacity used as a context manager (host-side data loading and prefetching are charged to no one), and on CUDA
caps the process with ``torch.cuda.set_per_process_memory_fraction`` and restores the previous fraction afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

import batchfinder as bf
from batchfinder.devices.base import DeviceBackend
from batchfinder.devices.cuda import CudaDevice
from batchfinder.units import format_bytes

__all__ = ["BenchDevice", "device_label", "cuda_total_bytes"]

MEASURING_CAPACITY = 1 << 40
"""Bytes: the simulated GPU used to measure peaks for the ground truth's first guess is this large (1 TiB)."""


def cuda_total_bytes() -> int:
    """Total memory of the current CUDA GPU (0 without one)."""
    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def device_label(kind: str) -> str:
    """The file-name stem results on this kind of device are written under, e.g. ``NVIDIA-H100-80GB-HBM3``."""
    if kind == "simulated":
        return "simulated-cpu"
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "cuda"


@dataclass(frozen=True)
class BenchDevice:
    """One capacity on one kind of device (``"simulated"`` or ``"cuda"``)."""

    kind: str
    capacity_bytes: int

    def __post_init__(self) -> None:
        if self.kind not in ("simulated", "cuda"):
            raise ValueError(f"device kind must be 'simulated' or 'cuda', not {self.kind!r}")

    @property
    def capacity_text(self) -> str:
        """E.g. ``64MiB`` or ``1536MiB`` (as the CLI takes it: whole MiB rather than ``1.50GiB``)."""
        mib = 1 << 20
        if self.capacity_bytes >= 1 << 30 and self.capacity_bytes % (1 << 30) and not self.capacity_bytes % mib:
            return f"{self.capacity_bytes // mib}MiB"
        return format_bytes(self.capacity_bytes).replace(".00 ", "").replace(" ", "")

    @property
    def torch_device(self) -> torch.device:
        """Where the other tools put the model and batches."""
        return torch.device("cuda") if self.kind == "cuda" else torch.device("cpu")

    @property
    def lightning_accelerator(self) -> str:
        return "gpu" if self.kind == "cuda" else "cpu"

    def backend(self) -> DeviceBackend:
        """A fresh batchfinder device of this capacity."""
        if self.kind == "cuda":
            return CudaDevice("cuda", memory_limit=self.capacity_bytes)
        return bf.SimulatedGPU(self.capacity_bytes)

    def measuring_backend(self) -> DeviceBackend:
        """A device without this capacity's limit, to measure peaks above it (the whole GPU, or 1 TiB simulated)."""
        if self.kind == "cuda":
            return CudaDevice("cuda")
        return bf.SimulatedGPU(MEASURING_CAPACITY)

    @contextlib.contextmanager
    def limited(self) -> Iterator[None]:
        """Run other tools' code as if the device had exactly this capacity."""
        backend = self.backend()
        if isinstance(backend, bf.SimulatedGPU):
            with backend:
                yield
            return
        with backend.measuring():  # CudaDevice: set_per_process_memory_fraction, restored afterwards
            yield

    def to_device(self, batch: Any) -> Any:
        """Move a host batch where a training loop would (on the simulated GPU it is charged when first used)."""
        if self.kind != "cuda":
            return batch
        return tree_map(lambda v: v.to(self.torch_device) if isinstance(v, torch.Tensor) else v, batch)

    def clean(self, *, collect: bool = True) -> None:
        """Free what the last run left: garbage (unless ``collect`` is False), and on CUDA the allocator's cache."""
        if collect:
            gc.collect()
        if self.kind == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
