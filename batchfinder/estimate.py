"""Memory estimates without a GPU, at their documented import path (the code is :mod:`batchfinder.memory.estimate`).

``from batchfinder.estimate import estimate_memory_curve`` and the other names below keep working;
``from batchfinder.estimate import Sharding`` describes an FSDP2 job for ``estimate_memory(..., sharding=...)`` and
``predict_max_batch_size(..., sharding=...)``.
"""

from __future__ import annotations

from .errors import FakeTensorUnsupportedError
from .memory.breakdown import MemoryEstimate, MemoryEstimates, ShardedMemory
from .memory.estimate import Estimator, estimate_memory, estimate_memory_curve
from .memory.sharding import Sharding

__all__ = [
    "MemoryEstimate",
    "MemoryEstimates",
    "Estimator",
    "estimate_memory",
    "estimate_memory_curve",
    "FakeTensorUnsupportedError",
    "Sharding",
    "ShardedMemory",
]
