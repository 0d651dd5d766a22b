"""Hugging Face Transformers' ``Trainer``, at its documented import path (the code is :mod:`batchfinder.hf`).

``from batchfinder.transformers import find_trainer_batch_size`` keeps working; importing it does not import
``transformers``.
"""

from __future__ import annotations

from .hf.guard import install_oom_guard
from .hf.trainer import find_trainer_batch_size

__all__ = ["find_trainer_batch_size", "install_oom_guard"]
