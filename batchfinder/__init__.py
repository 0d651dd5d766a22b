"""batchfinder: find the largest batch size a PyTorch model can train with, by running real training steps.

Usage::

    import torch, batchfinder as bf

    result = bf.find_batch_size(model, dataset, optimizer=torch.optim.Adam)        # on the current CUDA GPU
    result = bf.find_batch_size(model, dataset, device=bf.SimulatedGPU("16GiB"))  # anywhere, on the CPU
    print(result)                 # trial table and the recommendation
    result.max_batch_size         # largest batch size whose trial fitted
    result.batch_size             # recommended: floor(0.8 x max_batch_size)

    trial = bf.try_batch_size(model, dataset, 512, device="cuda")   # does 512 fit?
    bf.is_oom_error(exc)                                               # is this an out-of-memory error?

The search never changes the model's weights, buffers, gradients, train/eval mode, the optimizer's state or the
RNG states, also when it fails or is interrupted.
"""

from __future__ import annotations

import logging

from .accumulation import AccumulationPlan, plan_accumulation
from .cuda import CudaDevice
from .devices import DeviceBackend, resolve_device
from .distributed import RankFailedError
from .engine import SearchResult, find_batch_size, recommend_batch_size, try_batch_size
from .errors import BatchFinderError, NoBatchSizeFitsError, SearchIncompleteError
from .oom import is_oom_error
from .search import StopReason
from .simulated import SimulatedGPU
from .trial import Trial
from .units import format_bytes, parse_bytes
from . import zoo
from .estimate import FakeTensorUnsupportedError, MemoryEstimate, MemoryEstimates, estimate_memory
from .gpus import GPUSpec, lookup_gpu
from .predict import Prediction, predict_max_batch_size  # also registers mode="guided"

__version__ = "0.1.0"

__all__ = [
    "find_batch_size",
    "try_batch_size",
    "is_oom_error",
    "recommend_batch_size",
    "SearchResult",
    "Trial",
    "StopReason",
    "SimulatedGPU",
    "CudaDevice",
    "DeviceBackend",
    "resolve_device",
    "BatchFinderError",
    "NoBatchSizeFitsError",
    "SearchIncompleteError",
    "parse_bytes",
    "format_bytes",
    "plan_accumulation",
    "AccumulationPlan",
    "RankFailedError",
    "estimate_memory",
    "MemoryEstimate",
    "MemoryEstimates",
    "FakeTensorUnsupportedError",
    "predict_max_batch_size",
    "Prediction",
    "GPUSpec",
    "lookup_gpu",
    "zoo",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
