"""One training step's forward pass and loss, with defaults that suit most models.

The default step calls the model the way the sample is shaped:

* a tensor ``x``: ``model(x)``, no target;
* a tuple/list ``(x, y, ...)``: ``model(x)`` with target ``y`` (further elements are ignored);
* a dict: ``model(**batch)``; a ``loss`` in the output (a key or attribute) is used as it is.

The default loss is cross-entropy for integer class targets, mean squared error for floating targets of the
output's shape, and the mean of the output when there is no target. Pass ``loss_fn(output, target)`` for another
loss, or ``step_fn(model, batch) -> loss`` to take over the whole forward pass (AMP, several inputs, custom losses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LossTypeError, LossValueError

__all__ = [
    "StepFn",
    "LossFn",
    "PhaseHook",
    "make_step",
    "compute_loss",
    "primary_output",
    "check_loss",
    "run_training_step",
]

StepFn = Callable[[nn.Module, Any], torch.Tensor]
LossFn = Callable[..., torch.Tensor]
PhaseHook = Callable[[str], None]
"""Called with ``"forward"``, ``"backward"``, ``"optimizer step"`` and ``"zero_grad"`` as a step enters each phase."""


def check_loss(loss: Any) -> None:
    """Raise unless ``loss`` is a single-element tensor that requires grad."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else ""
        raise LossTypeError(
            f"the step returned {type(loss).__name__}{shape}, not a scalar loss tensor; "
            "step_fn and loss_fn must return a single-element tensor"
        )
    if not loss.requires_grad:
        raise LossValueError(
            "the loss does not require grad: no trainable parameter contributes to it (is the model frozen, or does "
            "step_fn run under torch.no_grad()?)"
        )


def run_training_step(
    model: nn.Module,
    batch: Any,
    step: StepFn,
    optimizer: torch.optim.Optimizer,
    on_phase: PhaseHook | None = None,
    *,
    check: bool = False,
    precision: Any = None,
) -> None:
    """One training step as trials and traces run it: forward and loss, backward, ``optimizer.step()``, and
    ``zero_grad(set_to_none=True)`` on the optimizer and the model (frozen parameters included).

    ``on_phase`` is told when each phase starts; ``check`` verifies the loss with :func:`check_loss` first;
    ``precision`` (a :class:`~batchfinder.training.precision.StepPrecision`) runs the forward pass under autocast and scales
    the loss where the precision asks for it.
    """
    if on_phase is not None:
        on_phase("forward")
    if precision is not None:
        with precision.autocast():
            loss = step(model, batch)
    else:
        loss = step(model, batch)
    if check:
        check_loss(loss)
    if on_phase is not None:
        on_phase("backward")
    if precision is not None:
        precision.backward(loss)
    else:
        loss.backward()
    del loss
    if on_phase is not None:
        on_phase("optimizer step")
    if precision is not None:
        precision.step(optimizer)
    else:
        optimizer.step()
    if on_phase is not None:
        on_phase("zero_grad")
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def _explicit_loss(output: Any) -> torch.Tensor | None:
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def primary_output(output: Any) -> torch.Tensor:
    """The tensor a loss is computed from: the output itself, its ``logits``, or its first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        values = []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"the model returned {type(output).__name__} with no tensor to compute a loss from; "
        "pass step_fn(model, batch) -> loss"
    )


def compute_loss(output: Any, target: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """The loss of one step from the model's output and the batch's target (None when there is none)."""
    if loss_fn is not None:
        prediction = output if isinstance(output, torch.Tensor) else primary_output(output)
        return loss_fn(prediction) if target is None else loss_fn(prediction, target)
    explicit = _explicit_loss(output)
    if explicit is not None:
        return explicit
    prediction = primary_output(output)
    if target is None:
        return prediction.float().mean()
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"the batch's target is a {type(target).__name__}, not a tensor; pass loss_fn or step_fn")
    if not target.is_floating_point():
        return F.cross_entropy(prediction, target)
    if target.shape == prediction.shape:
        return F.mse_loss(prediction, target)
    raise ValueError(
        f"the model's output has shape {list(prediction.shape)} but the floating-point target has shape "
        f"{list(target.shape)}; the default loss (MSE) needs equal shapes: pass loss_fn(output, target)"
    )


def make_step(loss_fn: LossFn | None = None, step_fn: StepFn | None = None) -> StepFn:
    """The step function a trial runs: ``step_fn`` when given, otherwise the default forward pass and loss."""
    if step_fn is not None:
        if loss_fn is not None:
            raise ValueError("pass either step_fn (which computes the loss itself) or loss_fn, not both")
        if not callable(step_fn):
            raise TypeError(f"step_fn must be callable as step_fn(model, batch) -> loss, not {type(step_fn).__name__}")
        return step_fn
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target) -> loss, not {type(loss_fn).__name__}")

    def default_step(model: nn.Module, batch: Any) -> torch.Tensor:
        if isinstance(batch, Mapping):
            return compute_loss(model(**batch), None, loss_fn)
        if isinstance(batch, (tuple, list)):
            target = batch[1] if len(batch) > 1 else None
            return compute_loss(model(batch[0]), target, loss_fn)
        return compute_loss(model(batch), None, loss_fn)

    return default_step
