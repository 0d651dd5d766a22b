"""Building real batches of any size from a user's dataset or DataLoader.

A :class:`BatchSource` accepts any map-style ``Dataset`` (``TensorDataset``, torchvision datasets, user classes)
or a ``DataLoader`` (its dataset and ``collate_fn`` are used). Samples may be a tensor, a tuple/list
``(input, target, ...)`` or a dict of tensors. Batches are built host-side from the first ``batch_size`` samples;
samples are cached in host memory (up to a budget) so that repeated trials do not reload them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate, default_convert

from .accounting import host_side_loading

__all__ = ["BatchSource", "describe_batch", "sample_bytes", "is_supported_sample"]

_CACHE_BUDGET_BYTES = 2 * 1024**3


def sample_bytes(sample: Any) -> int:
    """Unrounded bytes of the tensors in a sample or batch (nested tuples, lists and dicts); other values count 0."""
    if isinstance(sample, torch.Tensor):
        return sample.numel() * sample.element_size()
    if isinstance(sample, Mapping):
        return sum(sample_bytes(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        return sum(sample_bytes(v) for v in sample)
    return 0


def _is_array_like(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or type(value).__module__.split(".")[0] == "numpy"


def _sample_problem(sample: Any) -> str | None:
    """Why ``sample`` cannot be batched (None when it can): a tensor, a dict with tensors, or a tuple/list whose
    first element is a tensor (or NumPy array)."""
    if _is_array_like(sample):
        return None
    if isinstance(sample, Mapping):
        if sample and any(_is_array_like(v) for v in sample.values()):
            return None
        return "dataset[0] is a dict without tensors; dict samples must map argument names of model.forward to tensors"
    if isinstance(sample, (tuple, list)):
        if sample and _is_array_like(sample[0]):
            return None
        first = type(sample[0]).__name__ if sample else "nothing"
        return (
            f"dataset[0] is a {type(sample).__name__} whose first element is {first}, not a tensor: samples must be "
            "(input_tensor, target, ...). For image datasets add transforms.ToTensor() to the dataset's transform."
        )
    return (
        f"unsupported sample type {type(sample).__name__} (dataset[0]): samples must be a tensor, a tuple/list "
        "(input, target, ...) or a dict of tensors. For PIL images add transforms.ToTensor(); for anything else "
        "pass a DataLoader with a collate_fn that returns tensors."
    )


def is_supported_sample(sample: Any) -> bool:
    """True for a tensor, a dict with tensors, or a tuple/list whose first element is a tensor (or NumPy array)."""
    return _sample_problem(sample) is None


def _check_sample(sample: Any) -> None:
    problem = _sample_problem(sample)
    if problem is not None:
        raise TypeError(problem)


class BatchSource:
    """Real batches of a requested size from a dataset (or a DataLoader's dataset and collate function)."""

    def __init__(self, data: Dataset | DataLoader | Any) -> None:
        collate: Callable[[list[Any]], Any] = default_collate
        dataset = data
        if isinstance(data, DataLoader):
            dataset = data.dataset
            if data.collate_fn is not default_convert:
                collate = data.collate_fn
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "dataset is an IterableDataset: batch sizes are searched over map-style datasets (with __getitem__ "
                "and __len__); wrap a few thousand samples in a list or TensorDataset"
            )
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"dataset must be a map-style Dataset or a DataLoader (with __getitem__ and __len__), "
                f"not {type(dataset).__name__}"
            )
        length = len(dataset)
        if length == 0:
            raise ValueError("dataset is empty: the search needs at least one sample to build batches from")
        self.dataset = dataset
        self.collate = collate
        self.length = length
        self._cache: list[Any] = []
        self._cached_bytes = 0
        with host_side_loading():
            first = self.sample(0)
        _check_sample(first)

    def sample(self, index: int) -> Any:
        """Sample ``index`` of the dataset (cached)."""
        if index < len(self._cache):
            return self._cache[index]
        sample = self.dataset[index]
        if index == len(self._cache) and self._cached_bytes < _CACHE_BUDGET_BYTES:
            self._cache.append(sample)
            self._cached_bytes += sample_bytes(sample)
        return sample

    def batch(self, batch_size: int) -> Any:
        """A host-side batch of the first ``batch_size`` samples (``batch_size`` at most the dataset length)."""
        if not 1 <= batch_size <= self.length:
            raise ValueError(f"batch_size={batch_size} must be between 1 and the dataset length {self.length}")
        with host_side_loading():  # loading and collation happen on the host, also inside a SimulatedGPU block
            return self.collate([self.sample(i) for i in range(batch_size)])


def describe_batch(batch: Any, batch_size: int | str | None = None) -> str:
    """A one-line description of a batch's (or a sample's) structure, e.g.
    ``(Tensor[2, 1, 28, 28] float32, Tensor[2] int64)``; with ``batch_size`` the first dimension of every tensor is
    shown as that (``describe_batch(template, "B")`` gives ``Tensor[B, 1, 28, 28]``)."""
    if isinstance(batch, torch.Tensor):
        shape: list[Any] = list(batch.shape)
        if batch_size is not None and shape:
            shape[0] = batch_size
        return f"Tensor[{', '.join(map(str, shape))}] {str(batch.dtype).replace('torch.', '')}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_batch(v, batch_size)}" for k, v in batch.items()) + "}"
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return "(" + ", ".join(describe_batch(v, batch_size) for v in batch) + ")"
    return type(batch).__name__
