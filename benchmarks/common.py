"""Pieces every benchmark of this package shares: the environment a result is recorded with, the machine's load,
and the garbage-collector freeze that keeps every finder's collections cheap."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import platform
from collections.abc import Iterator
from typing import Any

import torch

import batchfinder as bf
from batchfinder.devices import nvml

from .devices import cuda_total_bytes

__all__ = ["environment", "load_average", "package_version", "import_everything", "frozen_gc", "LAZY_IMPORTS"]

LAZY_IMPORTS = ("pytorch_lightning", "pytorch_lightning.tuner", "accelerate.utils", "torchvision.models", "matplotlib")
"""Modules the finders and the charts import lazily; imported before the collector is frozen."""


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (None when it is not installed)."""
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:  # not installed
        return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (other work on the machine slows every finder; None where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(kind: str) -> dict[str, Any]:
    """Versions and hardware every result is recorded with (NVML's view of the GPUs included)."""
    return {
        "batchfinder": bf.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "pytorch_lightning": package_version("pytorch-lightning"),
        "accelerate": package_version("accelerate"),
        "torchvision": package_version("torchvision"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device_kind": kind,
        "gpu_name": torch.cuda.get_device_name(torch.cuda.current_device()) if kind == "cuda" else None,
        "gpu_total_bytes": cuda_total_bytes() if kind == "cuda" else None,
        "nvml": nvml.query().to_dict(),
        "load_average": load_average(),
    }


def import_everything(names: tuple[str, ...] = LAZY_IMPORTS) -> None:
    """Import what the finders and the charts import lazily, so that a frozen collector covers it too."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # reported by the finder that needs it
            pass


@contextlib.contextmanager
def frozen_gc(enabled: bool = True) -> Iterator[None]:
    """Move every object that exists now (the imported modules) out of the garbage collector's sight.

    Every finder collects garbage after each trial (batchfinder, Lightning's ``garbage_collection_cuda`` and
    Accelerate's ``clear_device_cache`` alike). With torch, torchvision and Lightning loaded a full collection takes
    0.1-0.8 s on a small CPU, which would swamp the training steps being compared; frozen, each collection costs
    milliseconds, for every finder alike. With ``enabled=False`` this does nothing.
    """
    if not enabled:
        yield
        return
    import_everything()
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
