"""One training step's forward pass and loss, with defaults that suit most models.

The default step calls the model the way the sample is shaped:

* a tensor ``x``: ``model(x)``, no target;
* a tuple/list ``(x, y, ...)``: ``model(x)`` with target ``y`` (further elements are ignored);
* a dict: ``model(**batch)``; a ``loss`` in the output (a key or attribute) is used as it is.

The default loss is cross-entropy for integer class targets, mean squared error for floating targets of the
output's shape, and the mean of the output when there is no target. It is computed from the output itself when it is
a tensor, from its ``logits`` (a key or an attribute; a note names any other tensor it leaves out) or from its only
tensor; an output of several tensors without ``loss`` or ``logits`` (``(main, aux)``) raises :class:`TypeError`
asking for ``loss_fn`` or ``step_fn``, since which of them to train on is the user's choice.

Pass ``loss_fn(output, target)`` for another loss: it receives the output exactly as the model returns it (a
tensor, a tuple, a dict, a Hugging Face ``ModelOutput``), and the target of the batch when there is one. Pass
``step_fn(model, batch) -> loss`` to take over the whole forward pass (AMP, several inputs, custom losses).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
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
    "forward",
    "check_train",
    "compute_loss",
    "primary_output",
    "loss_input",
    "check_loss",
    "run_training_step",
    "PhaseTracker",
    "enter_phase",
    "step_phase",
]

StepFn = Callable[[nn.Module, Any], torch.Tensor]
LossFn = Callable[..., torch.Tensor]
PhaseHook = Callable[[str], None]
"""Called with ``"forward"``, ``"backward"``, ``"optimizer step"`` and ``"zero_grad"`` as a step enters each phase."""


class PhaseTracker:
    """Where a trial is in the user's code, for the note an error raised there gains: the phase entered last.

    Phases: ``"collate"`` (building a batch from the dataset), ``"moving the batch to the device"``, ``"forward"``
    (the model's forward pass under the default step), ``"loss"`` (the default loss), ``"loss_fn"``, ``"step_fn"``
    (a step of the user's own: forward and loss), ``"creating the optimizer"``, ``"backward"``, ``"optimizer step"``,
    ``"zero_grad"``, and a front end's own (``"training_step"``). ``step_index`` is the training step (0-based), or
    None outside the steps.
    """

    def __init__(self) -> None:
        self.phase: str | None = None
        self.step_index: int | None = None

    def enter(self, phase: str, step_index: int | None = None) -> None:
        """Note that ``phase`` begins (of training step ``step_index`` when given)."""
        self.phase = phase
        if step_index is not None:
            self.step_index = step_index

    @contextlib.contextmanager
    def active(self) -> Iterator["PhaseTracker"]:
        """Make this the tracker :func:`enter_phase` tells, for the length of the block."""
        token = _TRACKER.set(self)
        try:
            yield self
        finally:
            _TRACKER.reset(token)


_TRACKER: ContextVar[PhaseTracker | None] = ContextVar("batchfinder_step_phase", default=None)


def enter_phase(phase: str) -> None:
    """Tell the active :class:`PhaseTracker` (if any) that ``phase`` begins; steps and front ends call it."""
    tracker = _TRACKER.get()
    if tracker is not None:
        tracker.enter(phase)


def step_phase(step: StepFn) -> str:
    """The phase a step function starts in: ``"forward"`` for the default step (which then enters ``"loss"`` or
    ``"loss_fn"`` itself), ``"step_fn"`` for the user's own, or the name a front end gave its step."""
    return getattr(step, "batchfinder_phase", "step_fn")


def _loss_source(step: StepFn | None) -> str:
    """Who computed the loss a step returns, as the user names it."""
    phase = step_phase(step) if step is not None else "step_fn"
    return getattr(step, "batchfinder_loss_source", phase)


def check_loss(loss: Any, step: StepFn | None = None) -> None:
    """Raise unless ``loss`` is a single-element tensor that requires grad; the message names what returned it
    (``loss_fn``, ``step_fn``, the default loss) when ``step`` is given."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else ""
        if step is None:
            raise LossTypeError(
                f"the step returned {type(loss).__name__}{shape}, not a scalar loss tensor; "
                "step_fn and loss_fn must return a single-element tensor"
            )
        source = _loss_source(step)
        hint = " (reduce it, e.g. with .mean())" if isinstance(loss, torch.Tensor) else ""
        raise LossTypeError(
            f"{source} returned {type(loss).__name__}{shape}, not a scalar loss tensor: {source} must return a "
            f"single-element tensor{hint}"
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
    micro_batches: int = 1,
    next_batch: Callable[[], Any] | None = None,
) -> None:
    """One training step as trials and traces run it: forward and loss, backward, ``optimizer.step()``, and
    ``zero_grad(set_to_none=True)`` on the optimizer and the model (frozen parameters included).

    ``on_phase`` is told when each phase starts; ``check`` verifies the loss with :func:`check_loss` first;
    ``precision`` (a :class:`~batchfinder.training.precision.StepPrecision`) runs the forward pass under autocast and scales
    the loss where the precision asks for it. ``micro_batches`` > 1 is gradient accumulation: that many forward and
    backward passes on ``batch`` with the gradients kept between them (each later forward runs while the gradients
    are held, each later backward adds into them), then one optimizer step, as a training loop with
    ``accumulation_steps`` runs it; ``next_batch()`` gives each later micro-batch its own batch on the device, moved
    there before the previous one is dropped, as a loop does (without it every micro-batch reuses ``batch``).
    """

    def begin(phase: str, tracked: str | None = None) -> None:
        if on_phase is not None:
            on_phase(phase)
        enter_phase(tracked or phase)

    for micro in range(max(1, micro_batches)):
        if micro and next_batch is not None:
            batch = next_batch()
        begin("forward", step_phase(step))
        if precision is not None:
            with precision.autocast():
                loss = step(model, batch)
        else:
            loss = step(model, batch)
        if check:
            check_loss(loss, step)
        begin("backward")
        if precision is not None:
            precision.backward(loss)
        else:
            loss.backward()
        del loss
    begin("optimizer step")
    if precision is not None:
        precision.step(optimizer)
    else:
        optimizer.step()
    begin("zero_grad")
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def _explicit_loss(output: Any) -> torch.Tensor | None:
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def primary_output(output: Any) -> torch.Tensor:
    """The tensor a target is built for (input shapes, :mod:`batchfinder.training.synthetic`): the output itself, its
    ``logits``, or its first tensor. The default loss chooses with :func:`loss_input`, which is stricter."""
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


def _named_tensors(output: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors at the top level of an output, each with how a user names it (``output["aux"]``, ``output[1]``)."""
    if isinstance(output, Mapping):
        items = [(f"output[{key!r}]", value) for key, value in output.items()]
    elif isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        items = [(f"output[{index}]", value) for index, value in enumerate(output)]
    elif hasattr(output, "_fields"):  # a named tuple
        items = [(f"output.{name}", getattr(output, name)) for name in output._fields]
    else:
        items = [(f"output.{name}", value) for name, value in vars(output).items()] if hasattr(output, "__dict__") else []
    return [(name, value) for name, value in items if isinstance(value, torch.Tensor)]


def _logits(output: Any) -> torch.Tensor | None:
    if isinstance(output, Mapping):
        value = output.get("logits")
    else:
        value = getattr(output, "logits", None)
    return value if isinstance(value, torch.Tensor) else None


def loss_input(output: Any) -> tuple[torch.Tensor, list[str]]:
    """The tensor the default loss is computed from, and the names of the output's other tensors that carry
    gradients and that this loss therefore leaves out (``["output['aux']"]``).

    The output itself when it is a tensor; its ``logits`` (a key or an attribute); its only tensor, or its only
    tensor that requires grad. Raises
    :class:`TypeError` for an output with several tensors and no ``logits``, or with no tensor at all: which to
    train on is for ``loss_fn`` or ``step_fn`` to say.
    """
    if isinstance(output, torch.Tensor):
        return output, []
    tensors = _named_tensors(output)
    chosen = _logits(output)
    if chosen is None and len(tensors) == 1:
        chosen = tensors[0][1]
    if chosen is None:
        trained = [value for _, value in tensors if value.requires_grad]
        chosen = trained[0] if len(trained) == 1 else None  # the others get no gradient whatever the loss
    if chosen is not None:
        ignored = [name for name, value in tensors if value is not chosen and value.requires_grad]
        return chosen, ignored
    kind = type(output).__name__
    if not tensors:
        raise TypeError(
            f"the model returned a {kind} with no tensor to compute a loss from; pass loss_fn(output, target), which "
            "receives the output as the model returns it, or step_fn(model, batch) -> loss"
        )
    listed = ", ".join(f"{name} of shape {list(value.shape)}" for name, value in tensors)
    raise TypeError(
        f"the model returned a {kind} of {len(tensors)} tensors ({listed}) with no 'loss' and no 'logits': the "
        "default loss cannot tell which to train on. Pass loss_fn(output, target), which receives the output as the "
        "model returns it (e.g. loss_fn=lambda out, y: F.cross_entropy(out[0], y) + 0.4 * F.cross_entropy(out[1], y)), "
        "or step_fn(model, batch) -> loss"
    )


def compute_loss(
    output: Any, target: Any, loss_fn: LossFn | None, *, on_ignored: Callable[[list[str]], None] | None = None
) -> torch.Tensor:
    """The loss of one step from the model's output and the batch's target (None when there is none).

    ``loss_fn`` receives ``output`` as the model returned it. Without it: the output's own ``loss`` (a key or an
    attribute), otherwise the default loss on :func:`loss_input`; ``on_ignored`` is told the names of the tensors
    with gradients that the default loss left out (by default a :class:`UserWarning` names them).
    """
    if loss_fn is not None:
        return loss_fn(output) if target is None else loss_fn(output, target)
    explicit = _explicit_loss(output)
    if explicit is not None:
        return explicit
    prediction, ignored = loss_input(output)
    if ignored:
        (on_ignored or _warn_ignored)(ignored)
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


def _ignored_note(ignored: list[str]) -> str:
    return (
        f"the default loss trains on the model's logits and leaves out {', '.join(ignored)}, which also carry "
        "gradients: trials measure a step in which those heads get no gradient. Pass loss_fn(output, target) (it "
        "receives the whole output) or step_fn(model, batch) -> loss to train on them too"
    )


def _warn_ignored(ignored: list[str]) -> None:
    warnings.warn(_ignored_note(ignored), UserWarning, stacklevel=2)


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

    noted: set[tuple[str, ...]] = set()

    def note_once(ignored: list[str]) -> None:
        # once per step (one search, estimate or prediction), not once per trial step
        if tuple(ignored) not in noted:
            noted.add(tuple(ignored))
            warnings.warn(_ignored_note(ignored), UserWarning, stacklevel=4)

    loss_phase = "loss" if loss_fn is None else "loss_fn"

    def default_step(model: nn.Module, batch: Any) -> torch.Tensor:
        output = forward(model, batch)
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        enter_phase(loss_phase)
        return compute_loss(output, target, loss_fn, on_ignored=note_once)

    default_step.batchfinder_phase = "forward"  # type: ignore[attr-defined]
    default_step.batchfinder_loss_source = (  # type: ignore[attr-defined]
        "loss_fn" if loss_fn is not None else "the model's own loss (the 'loss' of its output)"
    )
    return default_step


def forward(model: nn.Module, batch: Any) -> Any:
    """The model's output for ``batch``, called the way the sample is shaped (see the module documentation): the
    forward pass of the default step, and the inference step of ``find_batch_size(..., train=False)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def check_train(train: Any, optimizer: Any, loss_fn: Any) -> None:
    """Refuse what inference (``train=False``) does not run: an optimizer or a loss; ``train`` must be a bool."""
    if not isinstance(train, bool):
        raise TypeError(f"train must be True (size training) or False (size inference), not {train!r}")
    if train:
        return
    if optimizer is not None:
        raise ValueError("train=False sizes inference, which runs no optimizer: leave optimizer out")
    if loss_fn is not None:
        raise ValueError(
            "train=False sizes inference, which computes no loss: leave loss_fn out (pass step_fn(model, batch) -> "
            "output for a forward pass of your own)"
        )
