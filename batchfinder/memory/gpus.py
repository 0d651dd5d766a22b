"""Common GPUs by name, their memory, and the allowance for what fake tensors cannot see.

>>> from batchfinder.memory.gpus import lookup_gpu
>>> gpu = lookup_gpu("a100 40gb")
>>> gpu.name, gpu.memory_bytes == 40960 * 2**20
('A100-40GB', True)

``memory_bytes`` is the board's memory as ``nvidia-smi`` reports it (``memory.total``, MiB). What a training
process can fill with tensors is less, and :func:`~batchfinder.predict_max_batch_size` (and
``SimulatedGPU.like``) account for it:

* :data:`CUDA_CONTEXT_BYTES` (512 MiB, subtracted): the CUDA context of the process (driver state, loaded kernels and the
  libraries' module images), which ``nvidia-smi`` counts and ``torch.cuda.memory_allocated()`` does not; 300-500 MiB
  with lazy module loading on recent drivers, more with eager loading.
* the cuBLAS workspace PyTorch allocates per handle and stream, through its allocator (charged as blocks, twice): :data:`CUBLAS_WORKSPACE_BYTES` (8,519,680 B,
  PyTorch's default ``CUBLAS_WORKSPACE_CONFIG=:4096:2:16:8``) before Hopper, :data:`CUBLAS_WORKSPACE_BYTES_HOPPER`
  (32 MiB) on Hopper and Blackwell.

Not covered (a search with real trials sees them): cuDNN workspaces as cuDNN sizes them (they depend on the
algorithm and on free memory; ``cudnn.benchmark=True`` can add large transient peaks; estimates charge a calibrated
rule, :mod:`batchfinder.memory.cudnn`), the caching allocator's segment rounding and
fragmentation, NCCL buffers, memory used by other processes, and kernels that differ between the CPU trace and the
GPU (fused/foreach optimizers, attention kernels). That is what the 0.8 safety factor is for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "GPUSpec",
    "GPUS",
    "lookup_gpu",
    "known_gpu_names",
    "CUDA_CONTEXT_BYTES",
    "CUBLAS_WORKSPACE_BYTES",
    "CUBLAS_WORKSPACE_BYTES_HOPPER",
    "cublas_workspace_bytes",
]

MiB = 1024**2

CUDA_CONTEXT_BYTES = 512 * MiB
"""Allowance for the CUDA context of the training process."""
CUBLAS_WORKSPACE_BYTES = 8_519_680
"""PyTorch's default cuBLAS workspace (``:4096:2:16:8``: 2 x 4 MiB + 8 x 16 KiB) before Hopper."""
CUBLAS_WORKSPACE_BYTES_HOPPER = 32 * MiB
"""PyTorch's cuBLAS workspace on Hopper and later (compute capability 9.0+)."""

_HOPPER_AND_LATER = ("Hopper", "Blackwell")
_ARCHITECTURE_CAPABILITIES = {
    "Pascal": (6, 0), "Volta": (7, 0), "Turing": (7, 5), "Ampere": (8, 6), "Ada": (8, 9), "Hopper": (9, 0),
    "Blackwell": (10, 0),
}
_CAPABILITIES = {"A100-40GB": (8, 0), "A100-80GB": (8, 0), "A30": (8, 0)}
"""Data-centre Ampere (sm80); the other Ampere boards are sm86."""


def cublas_workspace_bytes(capability: tuple[int, int]) -> int:
    """The cuBLAS workspace PyTorch allocates per (handle, stream) on a GPU of compute ``capability`` (major,
    minor), with ``CUBLAS_WORKSPACE_CONFIG`` unset: 32 MiB from compute capability 9.0 (Hopper) on, 8,519,680 B
    before (``getChosenWorkspaceSize`` in ``aten/src/ATen/cuda/CublasHandlePool.cpp``)."""
    return CUBLAS_WORKSPACE_BYTES_HOPPER if capability[0] >= 9 else CUBLAS_WORKSPACE_BYTES


@dataclass(frozen=True)
class GPUSpec:
    """A GPU model: its canonical name, memory and architecture."""

    name: str
    memory_bytes: int
    architecture: str
    aliases: tuple[str, ...] = ()

    @property
    def workspace_bytes(self) -> int:
        """The cuBLAS workspace PyTorch allocates on this architecture."""
        return CUBLAS_WORKSPACE_BYTES_HOPPER if self.architecture in _HOPPER_AND_LATER else CUBLAS_WORKSPACE_BYTES

    @property
    def compute_capability(self) -> tuple[int, int]:
        """The CUDA compute capability (which attention kernels run: :mod:`batchfinder.memory.kernels`)."""
        if self.name in _CAPABILITIES:
            return _CAPABILITIES[self.name]
        return _ARCHITECTURE_CAPABILITIES.get(self.architecture, (8, 0))

    @property
    def allowance_bytes(self) -> int:
        """What lives outside PyTorch's allocator: the CUDA context."""
        return CUDA_CONTEXT_BYTES

    @property
    def usable_bytes(self) -> int:
        """Memory PyTorch's allocator may hold: ``memory_bytes - allowance_bytes``. cuBLAS's workspaces are blocks
        inside it (:attr:`workspace_bytes` per handle; predictions charge two: the forward and backward threads')."""
        return self.memory_bytes - self.allowance_bytes


def _gpu(name: str, mib: int, architecture: str, *aliases: str) -> GPUSpec:
    return GPUSpec(name, mib * MiB, architecture, aliases)


GPUS: tuple[GPUSpec, ...] = (
    _gpu("T4", 15360, "Turing", "tesla t4"),
    _gpu("RTX-2080-Ti", 11264, "Turing", "2080 ti", "2080ti"),
    _gpu("P100-16GB", 16384, "Pascal", "p100"),
    _gpu("V100-16GB", 16384, "Volta", "v100 16"),
    _gpu("V100-32GB", 32768, "Volta", "v100 32"),
    _gpu("A10G", 23028, "Ampere", "a10g 24gb"),
    _gpu("A10", 23028, "Ampere", "a10 24gb"),
    _gpu("A30", 24576, "Ampere", "a30 24gb"),
    _gpu("A40", 46068, "Ampere", "a40 48gb"),
    _gpu("RTX-3080", 10240, "Ampere", "3080"),
    _gpu("RTX-3090", 24576, "Ampere", "3090"),
    _gpu("RTX-A6000", 49140, "Ampere", "a6000"),
    _gpu("A100-40GB", 40960, "Ampere", "a100 40"),
    _gpu("A100-80GB", 81920, "Ampere", "a100 80"),
    _gpu("L4", 23034, "Ada", "l4 24gb"),
    _gpu("L40S", 46068, "Ada", "l40s 48gb"),
    _gpu("RTX-4080", 16376, "Ada", "4080"),
    _gpu("RTX-4090", 24564, "Ada", "4090"),
    _gpu("H100-80GB", 81559, "Hopper", "h100", "h100 sxm", "h100 pcie"),
    _gpu("H100-NVL", 95830, "Hopper", "h100 94gb", "h100nvl"),
    _gpu("H200", 143771, "Hopper", "h200 141gb"),
)
"""The GPUs :func:`lookup_gpu` knows (memory as ``nvidia-smi`` reports it)."""

_NOISE = re.compile(r"\b(nvidia|geforce|tesla|quadro|sxm\d?|pcie|hbm\d?e?)\b")


def _key(text: str) -> str:
    text = text.lower().replace("_", " ").replace("-", " ")
    text = _NOISE.sub(" ", text)
    text = re.sub(r"(\d+)\s*(gb|gib|g)\b", r"\1gb", text)
    key = re.sub(r"[^a-z0-9]", "", text)
    return key.removeprefix("rtx") if not key.startswith("rtxa") else key


def _index() -> dict[str, GPUSpec]:
    index: dict[str, GPUSpec] = {}
    for spec in GPUS:
        for alias in (spec.name, *spec.aliases):
            key = _key(alias)
            index.setdefault(key, spec)
            if not key.endswith("gb"):
                index.setdefault(key + f"{round(spec.memory_bytes / 1024**3)}gb", spec)
    return index


_INDEX = _index()


def known_gpu_names() -> list[str]:
    """Canonical names of the known GPUs."""
    return [spec.name for spec in GPUS]


def lookup_gpu(name: str) -> GPUSpec:
    """The :class:`GPUSpec` for a GPU name, tolerant of case and format (``"a100-40gb"``, ``"NVIDIA A100 40GB"``,
    ``"RTX 4090"``, ``"h100"``). Raises ``ValueError`` listing the known names for an unknown or ambiguous one."""
    if isinstance(name, GPUSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"gpu must be a GPU name such as 'A100-40GB', not {type(name).__name__}")
    key = _key(name)
    spec = _INDEX.get(key)
    if spec is None and key:
        # "a100" matches both A100-40GB and A100-80GB: ambiguous; "4090" matches one.
        candidates = {s.name: s for k, s in _INDEX.items() if k.startswith(key) and k[len(key) : len(key) + 1].isdigit()}
        if len(candidates) == 1:
            spec = next(iter(candidates.values()))
        elif len(candidates) > 1:
            raise ValueError(
                f"gpu={name!r} is ambiguous: say which of {', '.join(sorted(candidates))} (or pass capacity= in bytes)"
            )
    if spec is None:
        raise ValueError(
            f"gpu={name!r} is not a GPU batchfinder knows; known GPUs: {', '.join(known_gpu_names())}. "
            "For another GPU pass its memory as capacity= (e.g. capacity='24GiB'), minus what the CUDA context takes."
        )
    return spec
