"""What the NVIDIA driver says about the GPUs: names, memory (used by every process), driver and CUDA versions.

Reads NVML through the ``pynvml`` module of the official ``nvidia-ml-py`` package, imported only when asked, so that
``import batchfinder`` works without it. Without an NVIDIA driver or GPU nothing is raised: :func:`query` returns an
:class:`NvmlReport` whose ``available`` is False and whose ``reason`` says why.

>>> from batchfinder import nvml
>>> report = nvml.query()
>>> print(nvml.format_report(report))          # doctest: +SKIP
NVIDIA driver 550.54.15, CUDA 12.4 (driver), NVML 12.550.54.15
GPU 0: NVIDIA H100 80GB HBM3: 80.00 GiB total, 1.20 GiB used (0 B by this process, 1.20 GiB by 1 other), ...

Unlike ``torch.cuda.memory_allocated()``, NVML's "used" memory counts everything on the device: other processes,
every CUDA context, and memory cached by PyTorch's allocator.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .units import format_bytes

__all__ = ["GpuProcess", "GpuInfo", "NvmlReport", "query", "format_report"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    used_bytes: int | None
    """None when the driver does not say (e.g. inside some containers)."""
    kind: str = "compute"
    """``"compute"`` or ``"graphics"``."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it."""

    index: int
    name: str
    uuid: str | None
    total_bytes: int
    used_bytes: int
    """Memory in use on the device by every process (and the driver's reservations)."""
    free_bytes: int
    processes: list[GpuProcess] = field(default_factory=list)

    @property
    def used_by_this_process(self) -> int | None:
        """Bytes this process holds on the GPU, when the driver reports it."""
        own = [p.used_bytes for p in self.processes if p.pid == os.getpid()]
        if not own or any(b is None for b in own):
            return 0 if not own else None
        return sum(b for b in own if b is not None)

    @property
    def used_by_other_processes(self) -> int | None:
        """Bytes other processes hold on the GPU, when the driver reports it for all of them."""
        others = [p.used_bytes for p in self.processes if p.pid != os.getpid()]
        if any(b is None for b in others):
            return None
        return sum(b for b in others if b is not None)


@dataclass(frozen=True)
class NvmlReport:
    """The driver's view of the machine's NVIDIA GPUs, or why there is none."""

    available: bool
    """True when NVML answered (there may still be no GPU: see :attr:`gpus`)."""
    reason: str | None = None
    """Why NVML could not answer, or why there is nothing to show (no NVIDIA driver, no GPU, no ``pynvml``)."""
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    """The newest CUDA version the driver supports, e.g. ``"12.4"``."""
    nvml_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)

    @property
    def has_gpu(self) -> bool:
        return self.available and bool(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (bytes as integers, processes included, per-process totals derived)."""
        data = asdict(self)
        for info, gpu in zip(self.gpus, data["gpus"]):
            gpu["used_by_this_process"] = info.used_by_this_process
            gpu["used_by_other_processes"] = info.used_by_other_processes
        return data


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(code: int) -> str:
    """NVML's integer CUDA version (12040) as text (``"12.4"``)."""
    return f"{code // 1000}.{(code % 1000) // 10}"


def _optional(call: Any, *args: Any) -> Any:
    """Call an NVML function that some drivers or GPUs do not support; None when it fails."""
    import pynvml

    try:
        return call(*args)
    except pynvml.NVMLError as exc:
        logger.debug("NVML: %s failed: %s", getattr(call, "__name__", call), exc)
        return None


def _processes(pynvml: Any, handle: Any) -> list[GpuProcess]:
    found: list[GpuProcess] = []
    for kind, getter in (
        ("compute", "nvmlDeviceGetComputeRunningProcesses"),
        ("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
    ):
        function = getattr(pynvml, getter, None)
        entries = _optional(function, handle) if function is not None else None
        for entry in entries or []:
            used = getattr(entry, "usedGpuMemory", None)
            found.append(GpuProcess(int(entry.pid), int(used) if isinstance(used, int) else None, kind))
    return found


def _gpu(pynvml: Any, index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    uuid = _optional(pynvml.nvmlDeviceGetUUID, handle)
    return GpuInfo(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        uuid=None if uuid is None else _text(uuid),
        total_bytes=int(memory.total),
        used_bytes=int(memory.used),
        free_bytes=int(memory.free),
        processes=_processes(pynvml, handle),
    )


def _unavailable_reason(pynvml: Any, exc: Exception) -> str:
    if isinstance(exc, getattr(pynvml, "NVMLError_LibraryNotFound", ())):
        return "the NVIDIA driver's NVML library (libnvidia-ml.so / nvml.dll) was not found"
    if isinstance(exc, getattr(pynvml, "NVMLError_DriverNotLoaded", ())):
        return "the NVIDIA driver is not loaded (no NVIDIA GPU, or the kernel module is missing)"
    if isinstance(exc, getattr(pynvml, "NVMLError_NoPermission", ())):
        return f"no permission to query the NVIDIA driver ({exc})"
    return f"NVML could not be initialised: {exc}"


def query() -> NvmlReport:
    """Ask the NVIDIA driver about every GPU; never raises for a missing driver, GPU or ``pynvml``."""
    try:
        import pynvml
    except ImportError:
        return NvmlReport(False, "the pynvml module is not installed (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NvmlReport(False, _unavailable_reason(pynvml, exc))
    except OSError as exc:  # a broken driver installation
        return NvmlReport(False, f"NVML could not be loaded: {exc}")
    try:
        driver = _optional(pynvml.nvmlSystemGetDriverVersion)
        cuda_fn = getattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2", None) or getattr(
            pynvml, "nvmlSystemGetCudaDriverVersion", None
        )
        cuda = _optional(cuda_fn) if cuda_fn is not None else None
        nvml_version = _optional(pynvml.nvmlSystemGetNVMLVersion)
        count = pynvml.nvmlDeviceGetCount()
        gpus = [_gpu(pynvml, index) for index in range(count)]
    except pynvml.NVMLError as exc:
        return NvmlReport(False, f"NVML query failed: {exc}")
    finally:
        _optional(pynvml.nvmlShutdown)
    return NvmlReport(
        available=True,
        reason=None if gpus else "the NVIDIA driver is loaded but reports no GPU",
        driver_version=None if driver is None else _text(driver),
        cuda_driver_version=None if cuda is None else _cuda_version(int(cuda)),
        nvml_version=None if nvml_version is None else _text(nvml_version),
        gpus=gpus,
    )


def format_report(report: NvmlReport) -> str:
    """The report as lines of text, for ``batchfinder gpus``."""
    if not report.available:
        return f"No NVIDIA GPU or driver found: {report.reason}."
    lines = [
        f"NVIDIA driver {report.driver_version or 'unknown'}, CUDA {report.cuda_driver_version or 'unknown'} "
        f"(driver), NVML {report.nvml_version or 'unknown'}"
    ]
    if not report.gpus:
        lines.append("No NVIDIA GPU: the driver is loaded but reports no GPU.")
    for gpu in report.gpus:
        own, others = gpu.used_by_this_process, gpu.used_by_other_processes
        other_count = sum(1 for p in gpu.processes if p.pid != os.getpid())
        detail = [f"{format_bytes(own)} by this process" if own is not None else None]
        if other_count:
            amount = format_bytes(others) if others is not None else "unknown"
            detail.append(f"{amount} by {other_count} other process{'es' if other_count != 1 else ''}")
        described = ", ".join(d for d in detail if d)
        lines.append(
            f"GPU {gpu.index}: {gpu.name}: {format_bytes(gpu.total_bytes)} total, {format_bytes(gpu.used_bytes)} used"
            f"{f' ({described})' if described else ''}, {format_bytes(gpu.free_bytes)} free"
            + (f" [{gpu.uuid}]" if gpu.uuid else "")
        )
    return "\n".join(lines)
