"""A runtime guard for your own training loop: a step that runs out of memory is redone in smaller micro-batches,
without a restart.

>>> guard = bf.OOMGuard(model, optimizer)                 # doctest: +SKIP
>>> for batch in loader:                                  # doctest: +SKIP
...     loss = guard.step(batch)                          # one optimizer step on the whole batch
...     scheduler.step()

:meth:`OOMGuard.step` zeroes the gradients, splits the batch into micro-batches of at most
:attr:`~OOMGuard.micro_batch_size` samples (the whole batch while that is ``None``), runs forward and backward on each
with the gradients accumulated, each micro-batch's loss weighted by its share of the batch, and then takes one
optimizer step. When a micro-batch runs out of memory the guard recovers *after* the ``except`` block (the failed
step's tensors are gone with the traceback: gradients dropped, garbage collected, the device synchronised and its
cache emptied), halves the micro-batch size and redoes the same batch from the start. So no sample, optimizer step
or scheduler step is lost or repeated, and the update equals the unsplit batch's up to floating-point order for a
loss that is a mean over the batch (``loss_reduction="sum"`` for a sum). The smaller size is kept; with
``grow_after=N`` it doubles again after N steps without an out-of-memory error.

Known limitations:

* Layers whose output depends on the whole batch see micro-batches: BatchNorm's statistics (and its running
  estimates) are computed per micro-batch, so a split step differs from the unsplit one there; losses that are not a
  mean or a sum over samples (contrastive losses over the batch) change meaning when split.
* Under DDP (a ``DistributedDataParallel`` model, several ranks) every micro-batch runs under ``no_sync``, the
  ranks agree over the CPU (gloo) whether every one got through, and only then are the gradients all-reduced
  (averaged, as DDP does): an out-of-memory error on one rank makes every rank redo the batch with half its
  micro-batch size, and no rank waits in a collective another never enters. The gradients are all-reduced after the
  backward passes rather than overlapped with them, which costs some of DDP's speed. Other wrappers with several
  ranks (FSDP, DeepSpeed) are refused.
* An out-of-memory error in ``optimizer.step()`` itself does not depend on the batch and is raised as it is.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from .devices.base import DeviceBackend
from .engine.distributed import RankAgreement
from .engine.oom import is_fatal_device_error, is_oom_error
from .errors import exception_first_line
from .result import SearchResult
from .training.batching import plain_containers
from .training.host import host_side_loading
from .training.precision import StepPrecision, check_precision
from .training.steps import LossFn, StepFn, check_loss, make_step

__all__ = ["OOMGuard", "HalvingRetry", "batch_length", "slice_batch", "release_after_oom", "unsplittable_note"]

logger = logging.getLogger(__name__)

_REDUCTIONS = ("mean", "sum")


T = TypeVar("T")


class HalvingRetry:
    """The micro-batch size of a guarded step and the retry that halves it: shared by :class:`OOMGuard` and the
    Hugging Face Trainer's guard (:mod:`batchfinder.hf.guard`).

    ``micro_batch_size`` is the size in use (None: whole batches), ``splits`` counts the halvings and
    ``retried_steps`` the steps redone; with ``grow_after`` the size doubles again after that many clean steps."""

    def __init__(self, micro_batch_size: int | None, grow_after: int | None) -> None:
        for name, value in (("micro_batch_size", micro_batch_size), ("grow_after", grow_after)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a whole number of at least 1, or None")
        self.micro_batch_size = micro_batch_size
        self.grow_after = grow_after
        self.splits = 0
        self.retried_steps = 0
        self._clean_steps = 0

    def retry_halving(
        self, attempt: Callable[[int], T], total: int, release: Callable[[], None], on_error: Callable[[], None],
        where: str,
    ) -> T:
        """``attempt(micro_batch_size)`` on a batch of ``total`` samples until it does not run out of memory: after
        each out-of-memory error, outside the ``except`` block, ``release()`` and the size halves (an error at 1 is
        raised with a note). Any other error calls ``on_error()`` and propagates with its own type."""
        while True:
            size = total if self.micro_batch_size is None else min(self.micro_batch_size, total)
            error: str | None = None
            try:
                return_value = attempt(size)
            except Exception as exc:  # recovery happens below, outside this block
                if not is_oom_error(exc) or is_fatal_device_error(exc):
                    on_error()
                    raise
                error = exception_first_line(exc)
            if error is None:
                break
            release()
            if size == 1:
                failure = torch.OutOfMemoryError(error)
                failure.add_note(unsplittable_note(where))
                raise failure
            self.micro_batch_size = max(1, size // 2)
            self.splits += 1
            self.retried_steps += 1
            self._clean_steps = 0
            logger.warning(
                "out of memory at a micro-batch of %d samples (%s): redoing the step in micro-batches of %d",
                size, error, self.micro_batch_size,
            )
        return return_value

    def after_clean_step(self, total: int) -> None:
        """Count a step without an out-of-memory error; with ``grow_after`` double the size after that many."""
        if self.grow_after is None or self.micro_batch_size is None:
            return
        self._clean_steps += 1
        if self._clean_steps >= self.grow_after and self.micro_batch_size < total:
            self.micro_batch_size = min(total, self.micro_batch_size * 2)
            self._clean_steps = 0
            logger.info("no out-of-memory error for %d steps: micro-batches of %d again", self.grow_after, self.micro_batch_size)


class OOMGuard(HalvingRetry):
    """Run training steps that survive running out of memory: an out-of-memory micro-batch halves the micro-batch
    size and the same batch is redone (see the module documentation).

    Args:
        model: the model being trained (on the GPU, or on the CPU with a :class:`~batchfinder.SimulatedGPU`).
        optimizer: the optimizer over the model's parameters; it must own only parameters of ``model``.
        loss_fn: ``loss_fn(output, target) -> loss`` instead of the default loss (as for
            :func:`~batchfinder.find_batch_size`).
        step_fn: ``step_fn(model, micro_batch) -> loss`` for full control of the forward pass.
        micro_batch_size: the largest micro-batch to run (None: the whole batch until a step runs out of memory).
        precision: ``"32-true"`` (default), ``"16-mixed"`` (autocast to float16 with one ``GradScaler`` for the
            guard's life), ``"bf16-mixed"``; the true precisions are the model's own dtype here.
        device: where micro-batches go and what recovery empties: a :class:`~batchfinder.SimulatedGPU` (or another
            device backend), or None for the device of the model's parameters.
        loss_reduction: ``"mean"`` (default): the loss of a batch is the mean over its samples, so each
            micro-batch's loss is weighted by its share of the batch; ``"sum"``: the micro-batches' losses add up.
        grow_after: double the micro-batch size again (up to the whole batch) after this many steps without an
            out-of-memory error; None (default) keeps the smaller size for the rest of the run.

    Attributes ``splits`` (the number of times the micro-batch size was halved) and ``retried_steps`` count what the
    guard did.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn | None = None,
        step_fn: StepFn | None = None,
        micro_batch_size: int | None = None,
        precision: str = "32-true",
        device: DeviceBackend | None = None,
        *,
        loss_reduction: str = "mean",
        grow_after: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer bound to the model, not {type(optimizer).__name__}")
        _check_owns(model, optimizer)
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r} must be one of {list(_REDUCTIONS)}")
        if device is not None and not isinstance(device, DeviceBackend):
            raise TypeError(
                f"device must be a SimulatedGPU (or another batchfinder device backend) or None for the model's "
                f"own device, not {type(device).__name__}"
            )
        precision = check_precision(precision)
        if precision in ("16-true", "bf16-true"):
            raise ValueError(
                f"precision={precision!r}: a true precision is the model's own dtype here; cast the model and pass "
                "precision='32-true'"
            )
        HalvingRetry.__init__(self, micro_batch_size, grow_after)
        self.model = model
        self.optimizer = optimizer
        self.step_fn = make_step(loss_fn, step_fn)
        self.device = device
        self.loss_reduction = loss_reduction
        self._agreement: RankAgreement | None = None
        self._precision = StepPrecision(precision, self._device_type())

    @classmethod
    def from_result(cls, result: SearchResult, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> "OOMGuard":
        """A guard whose micro-batches start at a search result's micro-batch size (its recommended size without
        a target batch size), with the result's precision; ``options`` as for :class:`OOMGuard`."""
        options.setdefault("precision", result.precision if result.precision in ("32-true", "16-mixed", "bf16-mixed") else "32-true")
        size = result.micro_batch_size if result.micro_batch_size is not None else result.batch_size
        return cls(model, optimizer, micro_batch_size=size, **options)

    # -- one step -------------------------------------------------------------------------------------------------
    def step(self, batch: Any) -> torch.Tensor:
        """One optimizer step on the whole ``batch``, in micro-batches; returns the batch's loss (detached).

        ``batch`` is a tensor, a tuple/list ``(input, target, ...)`` or a dict, every tensor of it with the batch
        in its first dimension. Raises ``torch.OutOfMemoryError`` (with a note) when even a micro-batch of one
        sample does not fit, and any other error of the step with its own type; the gradients are dropped then.
        """
        agreement = self._rank_agreement()
        batch = plain_containers(batch)
        total = batch_length(batch)
        attempt = (lambda size: self._accumulate(batch, total, size)) if agreement is None else (
            lambda size: self._agreed_attempt(agreement, batch, total, size)
        )
        loss = self.retry_halving(
            attempt, total, self._recover, lambda: self.optimizer.zero_grad(set_to_none=True), "batchfinder.OOMGuard"
        )
        self._precision.step(self.optimizer)
        self.after_clean_step(total)
        return loss

    def _accumulate(self, batch: Any, total: int, size: int) -> torch.Tensor:
        """Forward and backward on each micro-batch, gradients accumulated; the batch's loss."""
        self.optimizer.zero_grad(set_to_none=True)
        accumulated = torch.zeros(())
        for start in range(0, total, size):
            count = min(size, total - start)
            with host_side_loading():  # slicing the host batch is not device memory (a simulated GPU would charge it)
                part = slice_batch(batch, start, start + count)
            micro = self._to_device(part)
            del part
            weight = count / total if self.loss_reduction == "mean" else 1.0
            with self._no_sync():  # under DDP the gradients are all-reduced once the ranks agree (_agreed_attempt)
                with self._precision.autocast():
                    loss = self.step_fn(self.model, micro)
                check_loss(loss)
                self._precision.backward(loss * weight)
            accumulated += loss.detach().float().cpu() * weight
            del loss, micro
        return accumulated

    # -- several ranks ----------------------------------------------------------------------------------------------
    def _rank_agreement(self) -> RankAgreement | None:
        """The agreement with the other ranks under DDP (None on one process); refuses several ranks without DDP."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        if torch.distributed.get_world_size() == 1:
            return None
        if not isinstance(self.model, nn.parallel.DistributedDataParallel):
            raise RuntimeError(
                "OOMGuard with several ranks needs the model wrapped in DistributedDataParallel (the guard then "
                "all-reduces the gradients once every rank got through the batch); other wrappers are not supported"
            )
        if self._agreement is None:
            self._agreement = RankAgreement(self.model.process_group)
        return self._agreement

    def _no_sync(self) -> Any:
        if isinstance(self.model, nn.parallel.DistributedDataParallel) and self._agreement is not None:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _agreed_attempt(self, agreement: RankAgreement, batch: Any, total: int, size: int) -> torch.Tensor:
        """One attempt on every rank: every micro-batch under ``no_sync`` (no collective while a rank may run out of
        memory), then the ranks agree on the outcome over the CPU; only when every rank got through are the
        gradients all-reduced (averaged, as DDP does). An out-of-memory error on any rank makes every rank retry
        with half its micro-batch size; any other error on one rank stops the others with ``RankFailedError``."""
        loss: torch.Tensor | None = None
        error: BaseException | None = None
        out_of_memory: str | None = None
        try:
            loss = self._accumulate(batch, total, size)
        except BaseException as exc:  # agreed on below, outside this block (Ctrl-C too: the others must not wait)
            if isinstance(exc, Exception) and is_oom_error(exc) and not is_fatal_device_error(exc):
                out_of_memory = exception_first_line(exc)
            else:
                error = exc
        if error is not None:
            agreement.report_failure(error)  # the other ranks raise RankFailedError at the exchange they wait in
            raise error
        fits, _, ranks = agreement.agree_outcome(out_of_memory is None, 0, f"a guarded step at micro-batches of {size}")
        if not fits:
            raise torch.OutOfMemoryError(out_of_memory or f"out of memory on rank(s) {ranks}")
        group = self.model.process_group
        world = torch.distributed.get_world_size(group)
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                if parameter.grad is None:  # every rank all-reduces every gradient, in the same order
                    parameter.grad = torch.zeros_like(parameter)
                torch.distributed.all_reduce(parameter.grad, group=group)
                parameter.grad.div_(world)
        assert loss is not None
        return loss

    # -- device -----------------------------------------------------------------------------------------------------
    def _device_type(self) -> str:
        if self.device is not None:
            return self.device.torch_device.type
        parameter = next(self.model.parameters(), None)
        return parameter.device.type if parameter is not None else "cpu"

    def _to_device(self, micro: Any) -> Any:
        if self.device is not None:
            return self.device.to_device(micro)
        parameter = next(self.model.parameters(), None)
        if parameter is None:
            return micro
        return torch.utils._pytree.tree_map(
            lambda value: value.to(parameter.device, non_blocking=True) if isinstance(value, torch.Tensor) else value,
            micro,
        )

    def _recover(self) -> None:
        """What a failed micro-batch left: gradients dropped, short cycles collected, the device's cache emptied."""
        self.optimizer.zero_grad(set_to_none=True)
        release_after_oom(self.model, self.device)


def release_after_oom(model: nn.Module, device: DeviceBackend | None) -> None:
    """After an out-of-memory step, outside the ``except`` block: the model's gradients dropped, short cycles
    collected, the device (``device``, or CUDA when the model is there) synchronised and its cache emptied."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device is not None:
        device.synchronize()
        device.empty_cache()
        return
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def unsplittable_note(where: str) -> str:
    """The note an out-of-memory error gains when a micro-batch of one sample does not fit."""
    return (
        f"{where}: a micro-batch of 1 sample does not fit, so the step cannot be split further; the model, its "
        "gradients and the optimizer state alone are too large for the device"
    )


def _check_owns(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    parameters = {id(p) for p in model.parameters()}
    if not owned or not owned <= parameters:
        foreign = len(owned - parameters)
        raise ValueError(
            f"the optimizer does not own the model's parameters ({foreign} of its {len(owned)} parameters are not the "
            "model's): build it from model.parameters() of the model you pass"
        )


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for value in batch.values() for t in _tensors(value)]
    if isinstance(batch, (list, tuple)):
        return [t for value in batch for t in _tensors(value)]
    return []


def batch_length(batch: Any) -> int:
    """The batch's length (the first dimension of its tensors); ValueError when the batch cannot be split."""
    tensors = _tensors(batch)
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("the batch holds no tensor with a batch dimension: OOMGuard splits a batch along dimension 0")
    length = tensors[0].shape[0]
    _check_splittable(batch, length, "batch")
    return int(length)


def _check_splittable(value: Any, length: int, where: str) -> None:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != length:
            raise ValueError(
                f"{where} has shape {list(value.shape)}, not a batch of {length} in its first dimension: OOMGuard "
                "cannot split it (give every tensor of the batch its samples in dimension 0)"
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_splittable(item, length, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_splittable(item, length, f"{where}[{index}]")
    elif not isinstance(value, (str, bytes, int, float, bool, type(None))):
        raise ValueError(f"{where} is a {type(value).__name__}, which OOMGuard cannot split along the batch")


def slice_batch(value: Any, start: int, stop: int) -> Any:
    """Samples ``start`` to ``stop`` of a batch (every tensor sliced along dimension 0; containers kept)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, Mapping):
        return {key: slice_batch(item, start, stop) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(slice_batch(item, start, stop) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(slice_batch(item, start, stop) for item in value)
    return value

