"""The batch of one a trace runs on: from an input shape (with the target a model's output calls for, found by
running the model once on fake tensors, :mod:`batchfinder.memory.tracing`), or a data set's largest sample.

The rules for the target are those of :func:`batchfinder.training.synthetic.target_for_output`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import FakeTensorUnsupportedError, exception_first_line
from ..training.batching import BatchSource, describe_batch, is_supported_sample
from ..training.sample_sizes import SampleSize
from ..training.synthetic import TargetSpec, target_for_output
from .tracing import describe_template, fake_output, is_fake_unsupported

__all__ = ["target_for_shape", "template_from_shape", "check_sample", "is_data", "largest_template"]


def target_for_shape(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> TargetSpec | None:
    """The target a model trains against for inputs of ``shape`` (see :mod:`batchfinder.training.synthetic`), found by running
    the model once on fake tensors. Raises a ValueError naming ``sample`` when the model rejects the shape."""
    inputs = torch.zeros((1, *shape), dtype=dtype)
    try:
        output = fake_output(model, inputs)
    except Exception as exc:
        if is_fake_unsupported(exc):
            raise FakeTensorUnsupportedError(
                f"the model's forward cannot run under fake tensors ({type(exc).__name__}: {exception_first_line(exc)}). "
                "Use the real search instead: batchfinder.find_batch_size(model, dataset, device=...)."
            ) from exc
        error_type = TypeError if isinstance(exc, TypeError) else ValueError
        raise error_type(
            f"sample={shape!r}: the model rejects inputs of shape {list((2, *shape))} "
            f"({type(exc).__name__}: {exception_first_line(exc)}). Give the shape of one sample without the batch "
            "dimension as the model's first layer expects it, e.g. (1, 28, 28) for an MNIST model, (3, 32, 32) for "
            "CIFAR-10, or pass one dataset item as dataset[0] returns it."
        ) from exc
    return target_for_output(output)


def template_from_shape(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Any, str]:
    """A batch of one made up from an input shape, with the target the model's output calls for, and its label."""
    target = target_for_shape(model, shape, dtype)
    inputs = torch.zeros((1, *shape), dtype=dtype)
    label = f"input shape {shape}"
    if target is None:
        return inputs, label
    return (inputs, target.example().unsqueeze(0)), f"{label} with {target.describe()}"


def check_sample(sample: Any) -> None:
    """Raise a TypeError unless ``sample`` is one dataset item a trace can batch."""
    if is_supported_sample(sample):
        return
    raise TypeError(
        f"sample must be one dataset item as dataset[0] returns it (a tensor, an (input, target, ...) tuple or a dict "
        f"of tensors, without the batch dimension) or an input shape such as (1, 28, 28) or '1x28x28', not "
        f"{describe_batch(sample)}"
    )


def is_data(value: Any) -> bool:
    """Whether ``value`` is a data set (whose largest sample a trace runs on) rather than one sample."""
    return isinstance(value, (Dataset, DataLoader))


def largest_template(data: Any, sample_size: SampleSize | None, scan_budget: float) -> tuple[Any, str, int]:
    """(a batch of one, the largest sample of ``data``, collated as its loader collates; its label; its index)."""
    source = BatchSource(data, sample_size=sample_size, scan_budget=scan_budget)
    index = source.largest_index
    template = source.collate([source.sample(index)])
    scan = source.scan
    if scan.varies:
        where = f"dataset[{index:,}], the largest sample ({scan.describe().split(': trials')[0]})"
    else:
        where = f"dataset[{index}] (samples are fixed-size)"
    return template, f"{describe_template(template)} from {where}", index
