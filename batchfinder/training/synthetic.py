"""Inputs given as a shape: parsing ``"1x28x28"``, the targets a model's output calls for, and synthetic datasets.

Where only an input shape is known (``estimate_memory(model, (1, 28, 28), ...)`` or the command line's
``--input 1x28x28``) a sample is made up as a classification dataset would give it:

* the input is a tensor of that shape (``float32`` unless another dtype is asked for);
* the target follows the model's output for a batch of such inputs (found by running the model once on fake
  tensors): an output of shape ``(N, C, *rest)`` with ``C >= 2`` calls for integer class labels of shape
  ``(*rest)`` in ``[0, C)`` (cross-entropy, as MNIST's ``(image, label)`` pairs); an output of shape ``(N,)`` or
  ``(N, 1, ...)`` calls for a float target of the output's per-sample shape (mean squared error); a scalar output
  (a model that returns its own loss) calls for no target.

:class:`SyntheticDataset` serves such samples for real trials (``batchfinder find``): deterministic random inputs
(zeros for integer inputs, which are valid indices for embeddings) and labels, drawn from a small pool so that a
dataset of a million samples costs no more memory than the pool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = [
    "SequenceDataset",
    "parse_shape",
    "as_shape",
    "TargetSpec",
    "target_for_output",
    "SyntheticDataset",
    "DTYPES",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
}
"""Input dtypes accepted by name (the command line's ``--dtype``)."""

_SHAPE_TEXT = re.compile(r"^\s*\(?\s*(\d+(?:\s*[x×,*]\s*\d+)*)\s*,?\s*\)?\s*$", re.IGNORECASE)


def parse_shape(text: str, *, argument: str = "input") -> tuple[int, ...]:
    """``"1x28x28"``, ``"1,28,28"`` or ``"(1, 28, 28)"`` as ``(1, 28, 28)``; a ``ValueError`` naming ``argument``."""
    match = _SHAPE_TEXT.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{argument}={text!r} is not an input shape: give the shape of one sample without the batch dimension, "
            "e.g. 1x28x28 (MNIST), 3x32x32 (CIFAR-10), 3x224x224 (ImageNet) or 784"
        )
    dims = tuple(int(d) for d in re.split(r"\s*[x×,*]\s*", match.group(1).strip(), flags=re.IGNORECASE))
    if any(d < 1 for d in dims):
        raise ValueError(f"{argument}={text!r}: every dimension of the input shape must be at least 1")
    return dims


def as_shape(value: Any, *, argument: str = "sample") -> tuple[int, ...] | None:
    """``value`` as an input shape when it is one (a string such as ``"1x28x28"``, a tuple/list of ints, a
    ``torch.Size``), otherwise None (it is then a sample)."""
    if isinstance(value, str):
        return parse_shape(value, argument=argument)
    if isinstance(value, torch.Size):
        dims = tuple(value)
    elif isinstance(value, (tuple, list)) and value and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        dims = tuple(value)
    else:
        return None
    if any(d < 1 for d in dims):
        raise ValueError(
            f"{argument}={tuple(value)!r} is an input shape with a dimension below 1; give the shape of one sample "
            "without the batch dimension, e.g. (1, 28, 28)"
        )
    return dims


@dataclass(frozen=True)
class TargetSpec:
    """The target of one synthetic sample: integer class labels in ``[0, classes)`` or a float tensor."""

    shape: tuple[int, ...]
    """Per-sample shape (``()`` for one label per sample)."""
    dtype: torch.dtype
    classes: int | None = None
    """Number of classes for integer labels (None for float targets)."""

    def describe(self) -> str:
        if self.classes is not None:
            where = f" of shape {self.shape}" if self.shape else ""
            return f"integer class labels{where} in [0, {self.classes})"
        return f"float targets of shape {self.shape} (mean squared error)"

    def example(self) -> torch.Tensor:
        """One target (zeros of the right shape and dtype)."""
        return torch.zeros(self.shape, dtype=self.dtype)


def target_for_output(output: Any) -> TargetSpec | None:
    """The target a model with this output (for a batch) trains against, by the rules in the module documentation."""
    from .steps import primary_output

    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return None
    if getattr(output, "loss", None) is not None and isinstance(getattr(output, "loss"), torch.Tensor):
        return None
    try:
        prediction = primary_output(output)
    except TypeError:
        return None
    if prediction.dim() == 0 or not prediction.is_floating_point():
        return None
    if prediction.dim() >= 2 and prediction.shape[1] >= 2:
        return TargetSpec(tuple(prediction.shape[2:]), torch.int64, int(prediction.shape[1]))
    return TargetSpec(tuple(prediction.shape[1:]), prediction.dtype)


class SyntheticDataset(Dataset):
    """``length`` samples ``(input, target)`` (or just the input when ``target`` is None) of the given shapes.

    Inputs are standard-normal for floating dtypes and zeros for integer dtypes; labels are uniform in
    ``[0, classes)``. Samples repeat with period ``pool`` (default 64), so memory does not grow with ``length``.
    """

    def __init__(
        self,
        shape: Sequence[int],
        length: int,
        *,
        target: TargetSpec | None = None,
        dtype: torch.dtype = torch.float32,
        pool: int = 64,
        seed: int = 0,
    ) -> None:
        if length < 1:
            raise ValueError(f"length={length} must be at least 1")
        generator = torch.Generator().manual_seed(seed)
        size = min(pool, length)
        shape = tuple(shape)
        if dtype.is_floating_point:
            self.inputs = torch.randn((size, *shape), generator=generator).to(dtype)
        else:
            self.inputs = torch.zeros((size, *shape), dtype=dtype)
        self.targets: torch.Tensor | None = None
        if target is not None and target.classes is not None:
            self.targets = torch.randint(0, target.classes, (size, *target.shape), generator=generator)
        elif target is not None:
            self.targets = torch.randn((size, *target.shape), generator=generator).to(target.dtype)
        self.length = length
        self.shape = shape
        self.target = target

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} samples")
        slot = index % len(self.inputs)
        if self.targets is None:
            return self.inputs[slot]
        return self.inputs[slot], self.targets[slot]


class SequenceDataset(Dataset):
    """A sequence of samples (a list) as a map-style ``Dataset``."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]
