"""Memory estimates without a GPU, at their documented import path (the code is :mod:`batchfinder.memory.estimate`).

``from batchfinder.estimate import estimate_memory_curve`` and the other names below keep working.
"""

from __future__ import annotations

from .errors import FakeTensorUnsupportedError
from .memory.breakdown import MemoryEstimate, MemoryEstimates
from .memory.estimate import Estimator, estimate_memory, estimate_memory_curve

__all__ = [
    "MemoryEstimate",
    "MemoryEstimates",
    "Estimator",
    "estimate_memory",
    "estimate_memory_curve",
    "FakeTensorUnsupportedError",
]
