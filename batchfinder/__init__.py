"""batchfinder: find the largest batch size a PyTorch model can train with, by running real training steps.

Usage::

    import torch, batchfinder as bf

    result = bf.find_batch_size(model, dataset, optimizer=torch.optim.Adam)        # on the current CUDA GPU
    result = bf.find_batch_size(model, dataset, device=bf.SimulatedGPU("16GiB"))  # anywhere, on the CPU
    print(result)                 # trial table and the recommendation
    result.max_batch_size         # largest batch size whose trial fitted
    result.batch_size             # recommended: floor(0.8 x max_batch_size)

    trial = bf.try_batch_size(model, dataset, 512, device="cuda")   # does 512 fit?
    bf.estimate_memory(model, (1, 28, 28), 1024)                   # memory by category, without a GPU
    bf.predict_max_batch_size(model, (1, 28, 28), gpu="A100-40GB")  # the largest size predicted to fit

The search never changes the model's weights, buffers, gradients, train/eval mode, the optimizer's state or the
RNG states, also when it fails or is interrupted. The Lightning callback is ``batchfinder.lightning.BatchFinder``;
everything else is reachable from its module (``batchfinder.units.format_bytes``, ``batchfinder.zoo``,
``batchfinder.gpus``, ``batchfinder.estimate.estimate_memory_curve``, ...).
"""

from __future__ import annotations

import logging

from .api import find_batch_size, try_batch_size
from .devices.simulated import SimulatedGPU
from .engine.oom import is_oom_error
from .errors import (
    BatchFinderError,
    FakeTensorUnsupportedError,
    NoBatchSizeFitsError,
    RankFailedError,
    SearchIncompleteError,
)
from .guard import OOMGuard
from .memory.estimate import MemoryEstimate, estimate_memory
from .memory.predict import Prediction, predict_max_batch_size
from .result import SearchResult, Trial

__version__ = "0.1.0"

__all__ = [
    "find_batch_size",
    "try_batch_size",
    "estimate_memory",
    "predict_max_batch_size",
    "is_oom_error",
    "SearchResult",
    "Trial",
    "SimulatedGPU",
    "MemoryEstimate",
    "Prediction",
    "BatchFinderError",
    "NoBatchSizeFitsError",
    "SearchIncompleteError",
    "RankFailedError",
    "FakeTensorUnsupportedError",
    "OOMGuard",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
