"""How a trial runs a LightningModule's steps: the way Lightning's loops run them, without the loops.

:class:`LightningSteps` gives the engine a training step (``training_step`` inside the module's ``optimizer_step``
with Lightning's closure, ``optimizer_zero_grad``, ``backward`` through the precision plugin; or, under manual
optimization, ``training_step`` alone), a loss step (for ``mode="guided"``'s estimator) and an evaluation step
(``validation_step``/``test_step``/``predict_step`` once per evaluation dataloader). No loop, callback or logger
runs (see :mod:`batchfinder.lightning.isolation`), so Lightning's progress counters never move.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..devices.base import DeviceBackend
from .framework import is_param_in_hook_signature, pl
from .sources import PerLoader

__all__ = ["LightningSteps", "loss_of"]


def loss_of(output: Any) -> torch.Tensor | None:
    """The loss in what ``training_step`` returned: a tensor, a dict with ``"loss"``, or None."""
    if output is None or isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        loss = output.get("loss")
        if loss is None:
            raise ValueError("training_step returned a dict without a 'loss' key (automatic optimization needs one)")
        return loss
    raise TypeError(f"training_step returned {type(output).__name__}: automatic optimization needs a loss tensor, a "
                    "dict with 'loss', or None")


def _step_args(hook: Callable[..., Any], batch: Any, batch_idx: int, dataloader_idx: int | None) -> list[Any]:
    args = [batch]
    if is_param_in_hook_signature(hook, "batch_idx", min_args=2):
        args.append(batch_idx)
        if dataloader_idx is not None:
            args.append(dataloader_idx)
    return args


class LightningSteps:
    """A LightningModule's training and evaluation steps as trial steps, the way Lightning's loops run them."""

    def __init__(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        device: DeviceBackend,
        eval_hook: str,
        eval_loaders: int = 1,
    ) -> None:
        self.trainer = trainer
        self.module = module
        self.device = device
        self.precision = trainer.precision_plugin
        self.eval_hook = eval_hook
        self.eval_loaders = eval_loaders

    # training ---------------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The precision plugin's backward (loss scaling, ``backward`` hook) without the strategy's DDP preparation."""
        loss = self.precision.pre_backward(loss, self.module)
        self.precision.backward(loss, self.module, optimizer, *args, **kwargs)
        return self.precision.post_backward(loss, self.module)

    def forward(self, batch: Any, batch_idx: int) -> Any:
        module = self.module
        with self.precision.train_step_context():
            return module.training_step(*_step_args(module.training_step, batch, batch_idx, None))

    def train_step(self, model: nn.Module, batch: Any, index: int, accumulation: int = 1) -> None:
        """One training step as Lightning's loop runs it (automatic or manual optimization).

        With ``accumulation`` > 1 (``accumulate_grad_batches``), ``index`` counts micro-batches and the step is
        Lightning's for that batch index: the gradients are zeroed after the forward pass of the first micro-batch of
        each window only, and the optimizer steps (``optimizer_step`` with the closure) at the last one; the others
        run the closure alone, so their gradients add up. (Lightning's DDP strategy skips the gradient all-reduce
        there with ``no_sync``; trials run on the unwrapped module, which accumulates into ``.grad`` the same way.)
        """
        module = self.module
        batch = module.on_after_batch_transfer(batch, 0)
        if not module.automatic_optimization:
            self.forward(batch, index)
            return
        epoch = self.trainer.current_epoch
        optimizer = self.trainer.optimizers[0]
        lightning_optimizer = module.optimizers(use_pl_optimizer=True)
        if isinstance(lightning_optimizer, list):
            lightning_optimizer = lightning_optimizer[0]
        zeroes = index % accumulation == 0  # the first micro-batch of a window (always without accumulation)

        def closure() -> torch.Tensor | None:
            loss = loss_of(self.forward(batch, index))
            if zeroes:
                module.optimizer_zero_grad(epoch, index, optimizer)  # Lightning zeroes after the forward pass
            if loss is None:
                return None
            return self.backward(loss, optimizer)

        if (index + 1) % accumulation == 0:
            module.optimizer_step(epoch, index, lightning_optimizer, closure)
        else:
            closure()

    def loss_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training step's loss (for search modes that model memory from a forward pass)."""
        loss = loss_of(self.forward(self.module.on_after_batch_transfer(batch, 0), 0))
        if loss is None:
            raise ValueError("training_step returned None (manual optimization?): no loss to measure")
        return loss

    # evaluation -------------------------------------------------------------------------------------------------
    def eval_step(self, model: nn.Module, batches: Any) -> None:
        """One step of ``validation_step``/``test_step``/``predict_step`` per evaluation dataloader, in turn."""
        module = self.module
        hook = getattr(module, self.eval_hook)
        context = {
            "validation_step": self.precision.val_step_context,
            "test_step": self.precision.test_step_context,
            "predict_step": self.precision.predict_step_context,
        }[self.eval_hook]
        items = batches.batches if isinstance(batches, PerLoader) else [batches]
        for index, host_batch in enumerate(items):
            batch = module.on_after_batch_transfer(self.device.to_device(host_batch), index)
            with context():
                output = hook(*_step_args(hook, batch, 0, index if self.eval_loaders > 1 else None))
            del batch, output
