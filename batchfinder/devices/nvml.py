"""What the NVIDIA driver says about the GPUs: names, memory (used by every process), driver and CUDA versions.

Reads NVML through the ``pynvml`` module of the official ``nvidia-ml-py`` package, imported only when asked, so that
``import batchfinder`` works without it. Without an NVIDIA driver or GPU nothing is raised: :func:`query` returns an
:class:`NvmlReport` whose ``available`` is False and whose ``reason`` says why.

>>> from batchfinder import nvml
>>> report = nvml.query()
>>> print(nvml.format_report(report))          # doctest: +SKIP
NVIDIA driver 550.54.15, CUDA 12.4 (driver), NVML 12.550.54.15
GPU 0: NVIDIA H100 80GB HBM3 (cuda:0): 80.00 GiB total, 1.20 GiB used (0 B by this process, 1.20 GiB by 1 other), ...
>>> report.gpu_for_device("cuda:0")           # doctest: +SKIP
GpuInfo(index=0, name='NVIDIA H100 80GB HBM3', ...)

Unlike ``torch.cuda.memory_allocated()``, NVML's "used" memory counts everything on the device: other processes,
every CUDA context, and memory cached by PyTorch's allocator.

**Which NVML GPU is ``cuda:N``.** NVML numbers GPUs in PCI bus order, whatever ``CUDA_VISIBLE_DEVICES`` says; CUDA
numbers only the visible ones, in the order that variable lists them. :func:`query` therefore maps every GPU to the
index this process's CUDA gives it (:attr:`GpuInfo.cuda_index`):

* by UUID, when this process has already initialised CUDA through PyTorch (``torch.cuda.get_device_properties(i).uuid``
  against ``nvmlDeviceGetUUID``, ``GPU-`` prefix ignored): exact, whatever the environment says;
* otherwise from ``CUDA_VISIBLE_DEVICES``: indices (in PCI order, which is CUDA's order for identical GPUs or with
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), ``GPU-<uuid>`` entries or unique UUID prefixes; like CUDA, the list ends at the
  first entry that names no GPU. Indices on a machine with different GPU models and CUDA's default
  ``FASTEST_FIRST`` order are not mapped (``cuda_index`` None) rather than guessed.

:attr:`NvmlReport.cuda_mapping` says how the mapping was made.

**Which process is this one.** NVML lists processes by their PID on the host; inside a container with its own PID
namespace, ``os.getpid()`` is another number, which may be absent from the list or even belong to another host
process. An entry is taken as this process's only when its PID is ``os.getpid()`` and, when PyTorch has initialised
CUDA, it holds at least what PyTorch's allocator has reserved on that GPU. When this process uses a GPU (PyTorch has
a CUDA context or reserved memory on it) but no entry is its own, :attr:`GpuInfo.this_process` is ``"unlisted"``: its
memory is reported as unknown, and so is the other processes' (one of the listed ones may be this process), instead
of charging another process's memory to it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..units import format_bytes

__all__ = [
    "GpuProcess",
    "GpuInfo",
    "NvmlReport",
    "TorchView",
    "query",
    "format_report",
    "normalize_uuid",
    "map_cuda_indices",
]

logger = logging.getLogger(__name__)

LISTED = "listed"
"""NVML lists an entry that is this process (its PID, and enough memory for what PyTorch holds there)."""
NOT_USING = "not using"
"""This process holds nothing on the GPU: NVML lists no entry of it and it has no CUDA context there."""
UNLISTED = "unlisted"
"""This process uses the GPU but NVML lists no entry with its PID (another PID namespace, e.g. a container)."""
UNKNOWN = "unknown"
"""Not determined (a :class:`GpuInfo` built by hand)."""


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    """The PID as NVML reports it: in the host's PID namespace, which may not be this process's."""
    used_bytes: int | None
    """None when the driver does not say (e.g. inside some containers)."""
    kind: str = "compute"
    """``"compute"`` or ``"graphics"``."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it."""

    index: int
    """NVML's index: PCI bus order over every GPU of the machine, whatever ``CUDA_VISIBLE_DEVICES`` says."""
    name: str
    uuid: str | None
    total_bytes: int
    used_bytes: int
    """Memory in use on the device by every process (and the driver's reservations)."""
    free_bytes: int
    processes: list[GpuProcess] = field(default_factory=list)
    cuda_index: int | None = None
    """This process's CUDA index of the GPU (``cuda:N``); None when it is not visible to this process or the
    mapping is unknown (see :attr:`NvmlReport.cuda_mapping`)."""
    this_process: str = UNKNOWN
    """``"listed"``, ``"not using"``, ``"unlisted"`` or ``"unknown"``: see the module's documentation."""
    own_pid: int | None = None
    """PID of the entry in :attr:`processes` that is this process (only when :attr:`this_process` is ``"listed"``)."""
    torch_reserved_bytes: int | None = None
    """What PyTorch's caching allocator in this process has reserved on the GPU (None when PyTorch has not
    initialised CUDA or the GPU is not mapped); NVML's figure for this process adds the CUDA context to it."""

    @property
    def other_processes(self) -> list[GpuProcess]:
        """The listed processes other than this one (when :attr:`this_process` is ``"unlisted"`` one of them may be
        this process under its host PID)."""
        if self.this_process == LISTED:
            return [p for p in self.processes if p.pid != self.own_pid]
        return list(self.processes)

    @property
    def used_by_this_process(self) -> int | None:
        """Bytes this process holds on the GPU, when known (None when NVML does not say which entry is this process,
        or does not report its memory)."""
        if self.this_process == NOT_USING:
            return 0
        if self.this_process != LISTED:
            return None
        own = [p.used_bytes for p in self.processes if p.pid == self.own_pid]
        if any(b is None for b in own):
            return None
        return sum(b for b in own if b is not None)

    @property
    def used_by_other_processes(self) -> int | None:
        """Bytes other processes hold on the GPU, when the driver reports it for all of them and this process's
        entry is known (or it has none)."""
        if self.this_process not in (LISTED, NOT_USING):
            return None
        others = [p.used_bytes for p in self.other_processes]
        if any(b is None for b in others):
            return None
        return sum(b for b in others if b is not None)


@dataclass(frozen=True)
class TorchView:
    """What this process's PyTorch knows about the GPUs it has initialised, indexed by CUDA index."""

    uuids: list[str | None]
    """``torch.cuda.get_device_properties(i).uuid`` as text (None where this torch does not expose it)."""
    reserved_bytes: list[int]
    """``torch.cuda.memory_reserved(i)``."""
    contexts: list[bool] | None = None
    """Whether this process has a CUDA context on each device (None when this torch cannot say: then a device with
    memory reserved counts as in use)."""

    def uses(self, cuda_index: int) -> bool:
        """True when this process holds (or may hold) memory on ``cuda:<cuda_index>``."""
        if cuda_index >= len(self.reserved_bytes):
            return False
        if self.contexts is not None and cuda_index < len(self.contexts):
            return self.contexts[cuda_index] or self.reserved_bytes[cuda_index] > 0
        return self.reserved_bytes[cuda_index] > 0


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
    """Every GPU of the machine, in NVML's (PCI) order."""
    cuda_mapping: str | None = None
    """How :attr:`GpuInfo.cuda_index` was found, e.g. ``"by UUID, from torch"`` or ``"CUDA_VISIBLE_DEVICES=1"``."""
    pid: int | None = None
    """``os.getpid()`` when the report was made."""

    @property
    def has_gpu(self) -> bool:
        return self.available and bool(self.gpus)

    @property
    def visible_gpus(self) -> list[GpuInfo]:
        """The GPUs this process's CUDA can use, in CUDA's order (``cuda:0`` first)."""
        mapped = [g for g in self.gpus if g.cuda_index is not None]
        return sorted(mapped, key=lambda g: g.cuda_index if g.cuda_index is not None else 0)

    def gpu_for_device(self, device: Any = 0) -> GpuInfo | None:
        """The GPU that is ``device`` for this process: ``"cuda:1"``, ``"cuda"`` (``cuda:0``), a ``torch.device`` or
        an index. None when no GPU is mapped to it."""
        index = _device_index(device)
        for gpu in self.gpus:
            if gpu.cuda_index == index:
                return gpu
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (bytes as integers, processes included, per-process totals derived)."""
        data = asdict(self)
        for info, gpu in zip(self.gpus, data["gpus"]):
            gpu["used_by_this_process"] = info.used_by_this_process
            gpu["used_by_other_processes"] = info.used_by_other_processes
        return data


def _device_index(device: Any) -> int:
    if isinstance(device, int):
        return device
    index = getattr(device, "index", None)
    if getattr(device, "type", None) is not None:  # a torch.device
        if device.type != "cuda":
            raise ValueError(f"not a CUDA device: {device!r}")
        return 0 if index is None else int(index)
    text = str(device).strip()
    kind, _, number = text.partition(":")
    if kind != "cuda" or (number and not number.isdigit()):
        raise ValueError(f"not a CUDA device: {device!r} (expected e.g. 'cuda:0' or 0)")
    return int(number) if number else 0


# -- mapping NVML's GPUs to this process's CUDA indices -----------------------------------------------------------
def normalize_uuid(uuid: Any) -> str:
    """A GPU UUID as comparable text: lower case, without NVML's ``GPU-`` prefix (torch's has none)."""
    return _text(uuid).strip().lower().removeprefix("gpu-")


def _same_order(gpus: Sequence[GpuInfo], environ: Mapping[str, str]) -> bool:
    """True when CUDA numbers the GPUs in NVML's PCI order: ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, or every GPU alike
    (CUDA's default ``FASTEST_FIRST`` order keeps PCI order among equally fast GPUs)."""
    if environ.get("CUDA_DEVICE_ORDER", "").strip().upper() == "PCI_BUS_ID":
        return True
    return len({g.name for g in gpus}) <= 1


def _by_environment(gpus: Sequence[GpuInfo], environ: Mapping[str, str]) -> tuple[dict[int, int], str]:
    """NVML index -> CUDA index from ``CUDA_VISIBLE_DEVICES``, and how it was made."""
    ordered = _same_order(gpus, environ)
    order_note = "" if ordered else (
        "; GPU models differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID, so CUDA's order is unknown"
    )
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        if not ordered:
            return {}, "not mapped: CUDA_VISIBLE_DEVICES is unset" + order_note
        return {g.index: g.index for g in gpus}, "PCI order (CUDA_VISIBLE_DEVICES unset)"
    described = f"CUDA_VISIBLE_DEVICES={value}"
    uuids = {g.index: normalize_uuid(g.uuid) for g in gpus if g.uuid}
    mapping: dict[int, int] = {}
    notes: list[str] = []
    entries = [e.strip() for e in value.split(",")] if value.strip() else []
    for entry in entries:
        found: int | None = None
        if entry.lstrip("-").isdigit():
            number = int(entry)
            if not ordered:
                notes.append(f"index {entry} not mapped{order_note}")
                break
            found = number if 0 <= number < len(gpus) else None
        elif entry.lower().startswith("gpu-"):
            prefix = normalize_uuid(entry)
            matches = [index for index, uuid in uuids.items() if uuid.startswith(prefix)]
            found = matches[0] if len(matches) == 1 else None
        elif entry.lower().startswith("mig-"):
            notes.append(f"{entry} is a MIG instance, which NVML's per-GPU figures do not describe")
            break
        if found is None or found in mapping:
            notes.append(f"{entry!r} names no further GPU, so CUDA sees no GPU after it")
            break
        mapping[found] = len(mapping)
    return mapping, described + (f" ({'; '.join(notes)})" if notes else "")


def map_cuda_indices(
    gpus: Sequence[GpuInfo], *, environ: Mapping[str, str] | None = None, torch_view: TorchView | None = None
) -> tuple[dict[int, int], str]:
    """NVML index -> this process's CUDA index, and how the mapping was made.

    By UUID when ``torch_view`` gives every CUDA device's UUID, else from ``CUDA_VISIBLE_DEVICES`` in ``environ``
    (default ``os.environ``). A GPU absent from the mapping is not visible to this process, or not mapped.
    """
    environ = os.environ if environ is None else environ
    if torch_view is not None and torch_view.uuids and all(torch_view.uuids):
        by_uuid = {normalize_uuid(g.uuid): g.index for g in gpus if g.uuid}
        mapping = {by_uuid[u]: i for i, u in enumerate(map(normalize_uuid, torch_view.uuids)) if u in by_uuid}
        unmatched = len(torch_view.uuids) - len(mapping)
        note = f" ({unmatched} CUDA device(s) match no NVML GPU, e.g. MIG instances)" if unmatched else ""
        return mapping, "by UUID, from torch" + note
    return _by_environment(gpus, environ)


def _torch_view() -> TorchView | None:
    """PyTorch's view of the GPUs, only when this process has already initialised CUDA (asking would otherwise
    initialise it, and fix ``CUDA_VISIBLE_DEVICES`` for good)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        count = torch.cuda.device_count()
        uuids: list[str | None] = []
        for index in range(count):
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            uuids.append(None if uuid is None else str(uuid))
        reserved = [int(torch.cuda.memory_reserved(index)) for index in range(count)]
        # Private but long-standing (torch.cuda uses it itself); without it, reserved memory stands for use.
        has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
        contexts = [bool(has_context(index)) for index in range(count)] if has_context is not None else None
    except Exception as exc:  # a broken CUDA setup: fall back to the environment
        logger.debug("torch's view of the GPUs is unavailable: %s", exc)
        return None
    return TorchView(uuids, reserved, contexts)


def _identify_this_process(gpu: GpuInfo, pid: int, torch_view: TorchView | None) -> GpuInfo:
    """``gpu`` with :attr:`GpuInfo.this_process`, :attr:`GpuInfo.own_pid` and the torch figure filled in."""
    reserved: int | None = None
    if torch_view is not None and gpu.cuda_index is not None and gpu.cuda_index < len(torch_view.reserved_bytes):
        reserved = torch_view.reserved_bytes[gpu.cuda_index]
    own = [p for p in gpu.processes if p.pid == pid]
    listed_bytes = [p.used_bytes for p in own if p.used_bytes is not None]
    if own and reserved and len(listed_bytes) == len(own) and sum(listed_bytes) < reserved:
        # The PID is this process's number in its own namespace, but the entry holds less than PyTorch alone has
        # reserved here: it is another (host) process with the same number.
        own = []
    if own:
        state = LISTED
    elif torch_view is not None and gpu.cuda_index is not None and torch_view.uses(gpu.cuda_index):
        state = UNLISTED  # this process has a CUDA context on this GPU, but NVML lists no entry with its PID
    else:
        state = NOT_USING
    return replace(gpu, this_process=state, own_pid=pid if own else None, torch_reserved_bytes=reserved)


# -- NVML -----------------------------------------------------------------------------------------------------------
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
    """Ask the NVIDIA driver about every GPU; never raises for a missing driver, GPU or ``pynvml``.

    Each GPU is mapped to this process's CUDA index and this process's own entry is identified as the module's
    documentation describes; this never initialises CUDA.
    """
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
    pid = os.getpid()
    torch_view = _torch_view()
    mapping, how = map_cuda_indices(gpus, torch_view=torch_view)
    gpus = [_identify_this_process(replace(g, cuda_index=mapping.get(g.index)), pid, torch_view) for g in gpus]
    return NvmlReport(
        available=True,
        reason=None if gpus else "the NVIDIA driver is loaded but reports no GPU",
        driver_version=None if driver is None else _text(driver),
        cuda_driver_version=None if cuda is None else _cuda_version(int(cuda)),
        nvml_version=None if nvml_version is None else _text(nvml_version),
        gpus=gpus,
        cuda_mapping=how if gpus else None,
        pid=pid,
    )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'es' if count != 1 else ''}"


def _usage(gpu: GpuInfo) -> str:
    """E.g. ``0 B by this process, 1.20 GiB by 1 other process``."""
    others = gpu.other_processes
    detail: list[str] = []
    if gpu.this_process == UNLISTED:
        detail.append("this process: unknown, its PID is not among those NVML lists (another PID namespace?)")
    elif gpu.used_by_this_process is not None:
        detail.append(f"{format_bytes(gpu.used_by_this_process)} by this process")
    if gpu.this_process in (LISTED, UNLISTED) and gpu.torch_reserved_bytes is not None:
        detail.append(f"torch has {format_bytes(gpu.torch_reserved_bytes)} reserved")
    if others:
        known = [p.used_bytes for p in others if p.used_bytes is not None]
        amount = format_bytes(sum(known)) if len(known) == len(others) else "unknown"
        who = "other process" if gpu.this_process in (LISTED, NOT_USING) else "listed process"
        detail.append(f"{amount} by {_plural(len(others), who)}")
    return ", ".join(detail)


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
        described = _usage(gpu)
        where = f"cuda:{gpu.cuda_index}" if gpu.cuda_index is not None else "no CUDA index here"
        lines.append(
            f"GPU {gpu.index}: {gpu.name} ({where}): {format_bytes(gpu.total_bytes)} total, "
            f"{format_bytes(gpu.used_bytes)} used{f' ({described})' if described else ''}, "
            f"{format_bytes(gpu.free_bytes)} free" + (f" [{gpu.uuid}]" if gpu.uuid else "")
        )
    if report.gpus and report.cuda_mapping:
        lines.append(f"CUDA indices: {report.cuda_mapping}")
    return "\n".join(lines)
