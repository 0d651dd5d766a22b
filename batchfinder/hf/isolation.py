"""What a search changes on a Hugging Face ``Trainer`` and its model, kept and put back, and the result written in.

The engine's trial session restores the model's weights, buffers, gradients and train/eval flags, the optimizer's
state and the random generators. What is the Trainer's own is kept here:

* :func:`kept_attributes`: ``trainer.optimizer``, ``trainer.lr_scheduler`` (the search never creates a scheduler;
  a scheduler holds no device memory), the evaluation loaders the Trainer caches with persistent workers, and the
  signature columns it caches on first use.
* :func:`checkpointing`: when ``args`` ask for gradient (activation) checkpointing, ``train()`` turns it on before
  training; the search turns it on the same way for its trials, and afterwards puts back every module's
  checkpointing flags and function and removes the hooks that enabling added (the input-embedding hook that makes
  inputs require grad).
* :func:`apply_result`: the found sizes go into ``trainer.args`` (``per_device_train_batch_size``,
  ``gradient_accumulation_steps``, ``per_device_eval_batch_size``) and the Trainer's cached ``_train_batch_size``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..result import SearchResult

__all__ = ["kept_attributes", "checkpointing_asked", "checkpointing", "apply_result"]

logger = logging.getLogger(__name__)

_KEPT = ("optimizer", "lr_scheduler", "_eval_dataloaders", "_signature_columns")
_MISSING = object()


@contextlib.contextmanager
def kept_attributes(trainer: Any) -> Iterator[None]:
    """Put the Trainer's optimizer, scheduler and cached loaders and columns back as they were after the block."""
    live = vars(trainer)
    saved = {name: live.get(name, _MISSING) for name in _KEPT}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                live.pop(name, None)
            else:
                live[name] = value


# -- gradient checkpointing -----------------------------------------------------------------------------------------
def checkpointing_asked(args: Any) -> bool:
    """True when ``args`` ask ``train()`` to turn on gradient (activation) checkpointing."""
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False))


def _checkpointing_on(model: nn.Module) -> bool:
    return any(vars(module).get("gradient_checkpointing") is True for module in model.modules())


_FLAGS = ("gradient_checkpointing", "_gradient_checkpointing_func", "_require_grads_hooks", "_require_grads_hook")
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


@dataclasses.dataclass
class _CheckpointingState:
    """Each module's checkpointing attributes and the keys of its hook dictionaries."""

    flags: list[tuple[nn.Module, dict[str, Any]]]
    hooks: list[tuple[dict[Any, Any], set[Any]]]

    @classmethod
    def capture(cls, model: nn.Module) -> "_CheckpointingState":
        flags = [(m, {name: vars(m)[name] for name in _FLAGS if name in vars(m)}) for m in model.modules()]
        hooks = [
            (table, set(table))
            for m in model.modules()
            for name in _HOOK_DICTS
            if isinstance(table := vars(m).get(name), dict)
        ]
        return cls(flags, hooks)

    def restore(self) -> None:
        for table, keys in self.hooks:
            for key in [k for k in table if k not in keys]:
                del table[key]
        for module, saved in self.flags:
            live = vars(module)
            for name in _FLAGS:
                if name in saved:
                    live[name] = saved[name]
                else:
                    live.pop(name, None)


def _enable(model: nn.Module, args: Any) -> None:
    """Turn checkpointing on as ``Trainer.train()`` does (``activation_checkpointing_enable`` in current versions,
    ``gradient_checkpointing_enable`` in older ones), with the arguments' keyword arguments."""
    kwargs = dict(
        getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None)
        or {}
    )
    if hasattr(model, "activation_checkpointing_enable"):
        every = kwargs.pop("every_n_layers", 1)
        offload = kwargs.pop("offload", False)
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs or None, every_n_layers=every, offload=offload
        )
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"args ask for gradient checkpointing but {type(model).__name__} has no gradient_checkpointing_enable(); "
            "turn the argument off or use a model that supports it"
        )


@contextlib.contextmanager
def checkpointing(model: nn.Module, args: Any) -> Iterator[bool]:
    """Gradient checkpointing on for the block when ``args`` ask for it and the model does not have it on already;
    yields whether the block turned it on. The model's checkpointing state is put back afterwards."""
    if not checkpointing_asked(args) or _checkpointing_on(model):
        yield False
        return
    saved = _CheckpointingState.capture(model)
    try:
        _enable(model, args)
        logger.info("gradient checkpointing is on for the search, as the training arguments ask")
        yield True
    finally:
        saved.restore()


# -- writing the result ---------------------------------------------------------------------------------------------
def _set_argument(args: Any, name: str, value: int) -> None:
    """Set a training argument (``TrainingArguments`` are mutable; a frozen copy is written through)."""
    try:
        setattr(args, name, value)
    except (dataclasses.FrozenInstanceError, AttributeError):
        object.__setattr__(args, name, value)


def _accelerate_accumulates(trainer: Any) -> bool:
    """True when the Trainer's accelerator counts accumulation steps (transformers versions that passed
    ``gradient_accumulation_steps`` to Accelerate); current versions accumulate in the Trainer and keep 1 there."""
    steps = getattr(getattr(trainer, "accelerator", None), "gradient_accumulation_steps", None)
    if steps is None:
        return False
    if steps != 1:
        return True
    try:
        import transformers

        source = inspect.getsource(transformers.Trainer.create_accelerator_and_postprocess)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return '["num_steps"] = 1' not in source


def apply_result(trainer: Any, result: SearchResult, *, accumulate: bool) -> dict[str, int]:
    """Write the found sizes into ``trainer.args`` and the Trainer's cached batch size; returns what was written.

    The micro-batch goes to ``per_device_train_batch_size``; with ``accumulate`` the accumulation steps go to
    ``gradient_accumulation_steps`` (and to the accelerator where it counts them); an evaluation size, when one was
    searched, to ``per_device_eval_batch_size`` (evaluation loaders cached with the old size are dropped).
    """
    args = trainer.args
    if not result.train:  # an evaluation-only search (train=False)
        _set_argument(args, "per_device_eval_batch_size", result.batch_size)
        vars(trainer).pop("_eval_dataloaders", None)
        logger.info("training arguments set: per_device_eval_batch_size=%d", result.batch_size)
        return {"per_device_eval_batch_size": result.batch_size}
    written = {"per_device_train_batch_size": result.micro_batch_size if accumulate else result.batch_size}
    if accumulate:
        written["gradient_accumulation_steps"] = result.accumulation_steps
    if result.eval_batch_size is not None:
        written["per_device_eval_batch_size"] = result.eval_batch_size
    accelerate_accumulates = accumulate and _accelerate_accumulates(trainer)
    for name, value in written.items():
        _set_argument(args, name, value)
    trainer._train_batch_size = args.train_batch_size
    if accelerate_accumulates:
        trainer.accelerator.gradient_accumulation_steps = result.accumulation_steps
    if "per_device_eval_batch_size" in written and vars(trainer).pop("_eval_dataloaders", None):
        logger.info("dropped the evaluation loaders the Trainer cached with the old evaluation batch size")
    logger.info("training arguments set: %s", ", ".join(f"{k}={v}" for k, v in written.items()))
    return written
