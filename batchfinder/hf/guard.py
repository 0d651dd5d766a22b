"""The runtime guard in a Hugging Face ``Trainer``: :func:`install_oom_guard`.

The Trainer runs forward, loss and backward in ``training_step`` and the optimizer step outside it, so the guard
wraps ``training_step``: a batch whose step runs out of memory is redone in micro-batches of half the size (and
half again while it still does), each through the Trainer's own ``training_step``, with each micro-batch's loss (a
mean) weighted by its share of the batch's labelled items (labels other than -100 for token labels, samples
otherwise), so that they add up to the whole batch's mean. The optimizer and scheduler steps, which the Trainer takes after ``training_step``, run once per
batch, as without the guard, so no step is lost or repeated.

Limits: ``gradient_accumulation_steps`` must be 1 (gradients of the earlier batches of an accumulation would be
lost with the failed one's; let the guard split the batch instead), and one process (several ranks are refused, as
by :class:`~batchfinder.OOMGuard`). BatchNorm statistics and losses over the whole batch change meaning when split.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..devices.base import DeviceBackend
from ..guard import HalvingRetry, batch_length, release_after_oom, slice_batch
from ..training.host import host_side_loading

__all__ = ["TrainerGuard", "install_oom_guard"]

logger = logging.getLogger(__name__)


class TrainerGuard(HalvingRetry):
    """A guarded ``training_step`` of one Trainer (see the module documentation); ``remove()`` puts the Trainer's
    own back. ``splits`` counts the halvings, ``micro_batch_size`` is the size in use (None: whole batches)."""

    def __init__(self, trainer: Any, micro_batch_size: int | None, grow_after: int | None, device: DeviceBackend | None):
        super().__init__(micro_batch_size, grow_after)
        self.trainer = trainer
        self.original = trainer.training_step
        self.device = device

    def remove(self) -> None:
        """Give the Trainer its own ``training_step`` back."""
        vars(self.trainer).pop("training_step", None)

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's ``training_step`` on the whole batch, in micro-batches when it runs out of memory."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise RuntimeError("install_oom_guard runs on one process: a retry on one rank alone would leave the "
                               "others waiting in the gradients' all-reduce")
        total = batch_length(inputs)
        loss = self.retry_halving(
            lambda size: self._accumulate(model, inputs, num_items_in_batch, total, size), total,
            lambda: release_after_oom(model, self.device), lambda: None, "batchfinder install_oom_guard",
        )
        self.after_clean_step(total)
        return loss

    def _accumulate(self, model: torch.nn.Module, inputs: Any, num_items: Any, total: int, size: int) -> torch.Tensor:
        if size >= total:
            return self.original(model, inputs, num_items)
        trainer = self.trainer
        compute_loss = trainer.compute_loss
        items = _labelled_items(inputs, total)
        accumulated: torch.Tensor | float = 0.0
        try:
            for start in range(0, total, size):
                count = min(size, total - start)
                with host_side_loading():
                    micro = slice_batch(inputs, start, start + count)
                # Each micro-batch's loss is its mean; weighted by its share of the batch's labelled items, the
                # micro-batches add up to the whole batch's mean (the item count of the whole batch is not passed on).
                trainer.compute_loss = _weighted(compute_loss, _labelled_items(micro, count) / items)
                accumulated = accumulated + self.original(model, micro, None)
                del micro
        finally:
            vars(trainer).pop("compute_loss", None)
        return accumulated  # type: ignore[return-value]


def _labelled_items(inputs: Any, samples: int) -> int:
    """The items a mean loss averages over: labels other than -100 (the ignored index) where the batch has
    ``labels``, otherwise its samples."""
    labels = inputs.get("labels") if hasattr(inputs, "get") else None
    if isinstance(labels, torch.Tensor) and labels.dim() > 1:
        with host_side_loading():
            return max(1, int(labels.ne(-100).sum()))
    return samples


def _weighted(compute_loss: Any, weight: float) -> Any:
    def weighted(*args: Any, **kwargs: Any) -> Any:
        result = compute_loss(*args, **kwargs)
        if isinstance(result, tuple):
            return (result[0] * weight, *result[1:])
        return result * weight

    return weighted


def install_oom_guard(
    trainer: Any, *, micro_batch_size: int | None = None, grow_after: int | None = None, device: DeviceBackend | None = None
) -> TrainerGuard:
    """Guard ``trainer``'s training steps against running out of memory (see the module documentation).

    Args:
        trainer: a ``transformers.Trainer`` with ``gradient_accumulation_steps=1``.
        micro_batch_size: the largest micro-batch from the start (None: whole batches until one runs out of memory).
        grow_after: double the micro-batch size again after this many steps without an out-of-memory error.
        device: a :class:`~batchfinder.SimulatedGPU` the training runs under (its cache is emptied on recovery), or
            None for the model's own device.

    Returns:
        The :class:`TrainerGuard` (``splits``, ``micro_batch_size``, ``remove()``). Raises ``ValueError`` for
        ``gradient_accumulation_steps`` above 1 or a bad size, before any step.
    """
    if not hasattr(trainer, "training_step") or not hasattr(trainer, "args"):
        raise TypeError(f"install_oom_guard needs a transformers.Trainer, not {type(trainer).__name__}")
    if trainer.args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"gradient_accumulation_steps={trainer.args.gradient_accumulation_steps}: the guard needs 1 (the "
            "gradients of the earlier batches of an accumulation would be lost with a failed one); set it to 1 and let "
            "the guard split batches that do not fit"
        )
    if "training_step" in vars(trainer):
        raise ValueError("the Trainer's training_step is already replaced (a guard installed twice?)")
    guard = TrainerGuard(trainer, micro_batch_size, grow_after, device)
    trainer.training_step = guard.training_step
    return guard
