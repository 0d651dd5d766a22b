"""``BatchFinder(on_oom="split")``: the runtime guard in Lightning's training loop, without a restart.

Lightning runs ``training_step`` and then, in its optimizer closure, ``backward`` on the returned loss, clips, steps
the optimizer and zeroes the gradients. A step that runs out of memory in either would end ``fit``. The guard, for
the length of ``fit``, replaces the module's ``training_step`` with one that runs the user's ``training_step`` on
micro-batches of the batch and the backward pass of each (each loss weighted by its share of the batch), so that an
out-of-memory error there is recovered from outside the ``except`` block and the same batch is redone with half the
micro-batch size; it returns the batch's loss, keeps the gradients aside while Lightning zeroes the gradients before
its backward, and the module's ``backward`` puts them back instead of running a backward pass on that loss. Lightning's own optimizer step, gradient clipping, schedulers, logging and step counts then run once
per batch, as without the guard: no batch, step or scheduler step is lost or repeated.

What Lightning's loop does not allow, and the guard therefore refuses before ``fit`` starts: manual optimization (the
step decides its own backward), ``accumulate_grad_batches`` above 1 (the earlier batches' gradients would be lost with
a failed one), ``precision="16-mixed"`` (the gradient scaler scales the loss inside Lightning's backward), and
strategies over several devices. Values the step logs (``self.log``) are logged once per micro-batch, the last one
winning for ``on_step`` values. BatchNorm statistics and losses over the whole batch change meaning when split.
"""

from __future__ import annotations

from typing import Any

import torch

from ..devices.base import DeviceBackend
from ..guard import HalvingRetry, batch_length, release_after_oom, slice_batch

__all__ = ["LightningGuard", "GuardHooks", "ON_OOM", "check_guardable", "check_on_oom"]

ON_OOM = (None, "split")
"""The values of ``BatchFinder(on_oom=...)``."""


def check_guardable(trainer: Any, module: Any) -> None:
    """Refuse, before ``fit`` starts, what the guard cannot run (see the module documentation)."""
    if not module.automatic_optimization:
        raise ValueError("on_oom='split' needs automatic optimization: under manual optimization the step runs its "
                         "own backward")
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(f"on_oom='split' needs accumulate_grad_batches=1, not {trainer.accumulate_grad_batches}: "
                         "the earlier batches' gradients would be lost with a failed one")
    if "16-mixed" in str(trainer.precision) and "bf16" not in str(trainer.precision):
        raise ValueError("on_oom='split' does not support precision='16-mixed' (its gradient scaler scales the loss "
                         "inside Lightning's backward); use 'bf16-mixed' or '32-true'")
    if trainer.world_size > 1:
        raise ValueError("on_oom='split' runs on one device: with several, a retry on one alone would leave the "
                         "others waiting in the gradients' all-reduce")


class LightningGuard(HalvingRetry):
    """The guarded ``training_step`` and ``backward`` of one LightningModule (see the module documentation)."""

    def __init__(self, module: Any, device: DeviceBackend | None, grow_after: int | None = None) -> None:
        super().__init__(None, grow_after)
        self.module = module
        self.device = device
        self._gradients: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def install(self) -> None:
        """Replace the module's ``training_step`` and ``backward`` (instance attributes, removed by :meth:`remove`)."""
        self._training_step = self.module.training_step
        self._backward = self.module.backward
        self.module.training_step = self.training_step
        self.module.backward = self.backward

    def remove(self) -> None:
        """Give the module its own ``training_step`` and ``backward`` back."""
        for name in ("training_step", "backward"):
            vars(self.module).pop(name, None)

    def training_step(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """The user's ``training_step`` over micro-batches of ``batch``, each with its backward pass."""
        total = batch_length(batch)
        # Lightning zeroes the last step's gradients between training_step and backward (accumulate_grad_batches=1):
        # they go now, before the micro-batches' backward passes add to them
        self.module.zero_grad(set_to_none=True)
        loss = self.retry_halving(
            lambda size: self._accumulate(batch, total, size, args, kwargs), total,
            lambda: release_after_oom(self.module, self.device), lambda: self.module.zero_grad(set_to_none=True),
            "BatchFinder(on_oom='split')",
        )
        self.after_clean_step(total)
        # Lightning zeroes the gradients between training_step and backward: they wait here until backward
        self._gradients = [(p, p.grad) for p in self.module.parameters() if p.grad is not None]
        for parameter, _ in self._gradients:
            parameter.grad = None
        return loss.detach().requires_grad_()  # Lightning's closure needs a loss; backward puts the gradients back

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """For a loss the guard already ran backward for: its gradients back; the module's own ``backward`` otherwise."""
        if self._gradients is None:
            self._backward(loss, *args, **kwargs)
            return
        gradients, self._gradients = self._gradients, None
        for parameter, gradient in gradients:
            parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient

    def _accumulate(self, batch: Any, total: int, size: int, args: tuple, kwargs: dict) -> torch.Tensor:
        accumulated: torch.Tensor | None = None
        for start in range(0, total, size):
            count = min(size, total - start)
            output = self._training_step(slice_batch(batch, start, start + count), *args, **kwargs)
            loss = output["loss"] if isinstance(output, dict) else output
            if not isinstance(loss, torch.Tensor):
                raise TypeError("on_oom='split' needs training_step to return the loss (a tensor, or a dict with 'loss')")
            weighted = loss * (count / total)
            weighted.backward()
            accumulated = weighted.detach() if accumulated is None else accumulated + weighted.detach()
            del output, loss, weighted
        assert accumulated is not None
        return accumulated


def check_on_oom(on_oom: Any) -> str | None:
    """The ``on_oom`` argument, checked."""
    if on_oom not in ON_OOM:
        raise ValueError(f"on_oom={on_oom!r} must be None (no guard) or 'split'")
    return on_oom


class GuardHooks:
    """The hooks of ``BatchFinder(on_oom="split")``: the guard is checked and installed when training starts (before
    the first batch) and removed when it ends or fails. Mixed into :class:`~batchfinder.lightning.BatchFinder`."""

    on_oom: str | None = None
    guard: LightningGuard | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.on_oom is None:
            return
        check_guardable(trainer, pl_module)
        device = self._resolve_device(trainer)  # type: ignore[attr-defined]
        self.guard = LightningGuard(pl_module, device if device.simulated else None)
        self.guard.install()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.guard is not None:
            self.guard.remove()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.guard is not None:
            self.guard.remove()
