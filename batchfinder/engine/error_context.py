"""Where an error of the user's code happened, said on the exception itself.

An exception raised by the user's code inside a trial (the dataset, ``collate_fn``, the model, ``loss_fn``,
``step_fn``, the optimizer) keeps its type and message and gains one note of batchfinder's
(:func:`batchfinder.errors.set_note`): the trial's batch size, the phase of the step it was raised in (tracked by
:class:`~batchfinder.training.steps.PhaseTracker`), what to check, and, added by the search, the trials that ran
before it (kept on the exception as ``batchfinder_trials``). :func:`model_does_not_fit` explains the one failure
that is the model's own size, before any batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..devices.base import DeviceBackend
from ..errors import NoBatchSizeFitsError, batchfinder_note, set_note
from ..memory.accounting import round_allocation, tensor_storages
from ..result import Trial
from ..training.optimizers import state_tensors
from ..training.steps import PhaseTracker
from ..units import format_bytes

__all__ = ["note_error", "note_search_progress", "model_does_not_fit"]


_PHASES: dict[str, tuple[str, str]] = {
    "collate": (
        "building the batch from the dataset (its __getitem__, or the DataLoader's collate_fn)",
        "Check the dataset's samples and the collate_fn.",
    ),
    "moving the batch to the device": (
        "moving the batch to the device",
        "Check that the batch holds tensors (or containers of them) that can move to the device.",
    ),
    "forward": (
        "the model's forward pass",
        "Check that the dataset's samples match the model's input, or pass step_fn(model, batch) -> loss.",
    ),
    "loss": (
        "the default loss",
        "Pass loss_fn(output, target), which receives the model's output as the model returns it, or "
        "step_fn(model, batch) -> loss.",
    ),
    "loss_fn": (
        "loss_fn",
        "Check loss_fn: it receives the model's output as the model returns it and the batch's target, and must "
        "return a scalar tensor.",
    ),
    "step_fn": ("step_fn", "Check step_fn(model, batch): it must return a scalar loss tensor."),
    "creating the optimizer": (
        "creating the optimizer from the optimizer argument",
        "Check optimizer: an optimizer class (torch.optim.AdamW), a callable params -> optimizer, or an optimizer "
        "over the model's parameters.",
    ),
    "backward": ("the backward pass", ""),
    "optimizer step": ("the optimizer's step()", "Check the optimizer argument and its hyperparameters."),
    "zero_grad": ("zero_grad()", ""),
    "training step": ("the training step", ""),
    "evaluation step": ("the evaluation step", ""),
}
"""Each phase of :class:`~batchfinder.training.steps.PhaseTracker` as a user reads it, and what to check there."""


def note_error(
    exc: BaseException,
    tracker: PhaseTracker,
    where: str,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    probe: bool = False,
) -> None:
    """Give the user's exception the note that says where it happened (``where``: which trial or check) and what to
    check, and the attributes ``batchfinder_batch_size``/``batchfinder_phase``; its type and message stay. Outside
    the ``probe`` (the model check at a batch of 2, which passed) a forward pass that raises is no sign of a dataset
    that does not match the model, so no advice about the dataset is given."""
    phase = tracker.phase
    if phase is None:
        return
    if batch_size is not None:
        with contextlib.suppress(AttributeError, TypeError):
            exc.batchfinder_batch_size = batch_size  # type: ignore[attr-defined]
    words, advice = _PHASES.get(phase, (phase, ""))
    if phase == "forward" and not probe:
        advice = "The model ran at smaller batch sizes: what raised depends on the batch's size or its samples."
    in_step = ""
    if tracker.step_index is not None and steps is not None and phase not in ("collate", "creating the optimizer"):
        in_step = f" (training step {tracker.step_index + 1} of {steps})"
    with contextlib.suppress(AttributeError, TypeError):
        exc.batchfinder_phase = phase  # type: ignore[attr-defined]
    set_note(exc, f"batchfinder: raised {where}{in_step}, in {words}." + (f" {advice}" if advice else ""))


def note_search_progress(exc: BaseException, trials: Sequence[Trial], batch_size: int | None = None) -> None:
    """Add to the note of an exception raised by a search's trial the trials before it, and keep them on the
    exception: ``exc.batchfinder_trials`` (a list of :class:`~batchfinder.Trial`) and ``exc.batchfinder_batch_size``
    (the size whose trial raised)."""
    with contextlib.suppress(AttributeError, TypeError):
        exc.batchfinder_trials = list(trials)  # type: ignore[attr-defined]
        if batch_size is not None:
            exc.batchfinder_batch_size = batch_size  # type: ignore[attr-defined]
    fitted = sorted(t.batch_size for t in trials if t.fits)
    failed = sorted(t.batch_size for t in trials if not t.fits)
    if not trials:
        progress = "It was the search's first trial."
    else:
        parts = [f"{_listed(fitted)} fitted (largest {fitted[-1]})" if fitted else "none fitted"]
        if failed:
            parts.append(f"{_listed(failed)} ran out of memory")
        progress = f"Trials before it: {'; '.join(parts)}; they are in this exception's batchfinder_trials."
    note = batchfinder_note(exc)
    set_note(exc, f"{note}\n{progress}" if note else f"batchfinder: {progress}")


def _listed(sizes: Sequence[int]) -> str:
    words = [str(size) for size in sizes]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def model_does_not_fit(
    model: nn.Module, device: DeviceBackend, reserved_bytes: Sequence[int], optimizers: list[torch.optim.Optimizer]
) -> NoBatchSizeFitsError:
    """The error for a model whose resident part (parameters, buffers, existing optimizer state, a wrapper's
    ``reserved_bytes``) exceeds ``device``, with what it needs: each storage rounded up as the CUDA allocator does."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for optimizer in optimizers for t in state_tensors(optimizer)]
    storages = {id(s): s for s in tensor_storages(tensors)}
    sizes = [s.nbytes() for s in storages.values()] + list(reserved_bytes)
    held = sum(round_allocation(size) for size in sizes)
    needed = device.reservation_for(sizes)
    parts = "parameters and buffers" + (" and optimizer state" if optimizers else "")
    if reserved_bytes:
        parts += f" and the {format_bytes(sum(reserved_bytes))} a parallel wrapper reserves"
    capacity = device.capacity_bytes
    in_segments = f" ({format_bytes(held)} of tensors in the allocator's segments)" if needed != held else ""
    return NoBatchSizeFitsError(
        f"the model alone does not fit on {device.name}: its {parts} need {format_bytes(needed)}{in_segments}, "
        f"but the device has {format_bytes(capacity)}, before any batch. Use a larger GPU, a smaller model, or keep the "
        "optimizer's state off the device (create the optimizer after the search).",
        needed_bytes=needed,
        capacity_bytes=capacity,
    )
