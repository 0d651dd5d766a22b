"""The GPU table, at its documented import path (the code is :mod:`batchfinder.memory.gpus`).

``from batchfinder.gpus import lookup_gpu, GPUSpec`` and the other names below keep working.
"""

from __future__ import annotations

from .memory.gpus import (
    CUBLAS_WORKSPACE_BYTES,
    CUBLAS_WORKSPACE_BYTES_HOPPER,
    CUDA_CONTEXT_BYTES,
    GPUS,
    GPUSpec,
    known_gpu_names,
    lookup_gpu,
)

__all__ = [
    "GPUSpec",
    "GPUS",
    "lookup_gpu",
    "known_gpu_names",
    "CUDA_CONTEXT_BYTES",
    "CUBLAS_WORKSPACE_BYTES",
    "CUBLAS_WORKSPACE_BYTES_HOPPER",
]
