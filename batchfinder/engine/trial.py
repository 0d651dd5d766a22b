"""Trials: real training steps at one batch size, measured, with recovery from running out of memory.

A trial builds a real batch of the requested size, moves it to the device, and runs ``steps_per_trial`` (at least
2, because Adam-style optimizers allocate their state lazily at the first step) full steps: forward, loss,
backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``. It records the peak memory and the time per step.

An out-of-memory error ends the trial as "does not fit". Recovery happens *after* the ``except`` block, once the
traceback (which keeps the failed step's tensors alive) is gone: the user's state is restored, garbage collected,
the device synchronised, its cache emptied and its peak statistics reset, and the memory level is compared with
the level before the trial (a difference is recorded as ``leaked_bytes``). Any other exception propagates with its
own type and traceback after the user's state is restored, with a note that says where it happened and what to
check (:mod:`batchfinder.engine.error_context`).

:class:`TrialSession` owns the user's state for the length of a search: it snapshots it on entry, keeps the model
resident on the device, checks once that the model accepts the batch, and restores everything on exit, also when
the search fails or is interrupted.

Front ends with their own training loop (the Lightning callback) pass ``train_step`` (one complete step: forward,
backward, optimizer step(s), zero grad, as their loop does it), ``eval_step`` with ``eval_source`` (each trial then
also runs evaluation steps at the same batch size, in eval mode under ``torch.no_grad()``, with the optimizer state
and gradients still held as they are during validation inside training), ``extra_optimizers`` (further optimizers
whose state is snapshotted, restored and charged) and ``reserved_bytes`` (memory a wrapper such as DDP holds for the
whole of training, allocated on the device for the session) and ``extra_state`` (further state the front end's
framework keeps, captured and restored with the rest: see :mod:`batchfinder.training.state`). ``run(size, phase="eval")``
measures evaluation alone.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..devices.base import DeviceBackend, DeviceBatches, flush_autograd, swapped_data
from ..errors import exception_first_line
from ..memory.recording import RECORDED_SIZES, record_trial
from ..memory.replay import AllocationLog
from ..result import Trial
from ..search.checks import MIN_STEPS_PER_TRIAL
from ..training.batching import BatchSource, describe_batch
from ..training.host import host_side_loading
from ..training.optimizers import OptimizerSpec, lacks_state
from ..training.precision import (
    StepPrecision,
    autocast_dtype,
    cast_floating,
    cast_optimizer_state,
    check_precision,
    cuda_autocast_policies,
    parameter_dtype,
)
from ..training.environment import torch_import_side_effects_contained
from ..training.state import SnapshotFactory, TrainingState, deferred_interrupts
from ..training.steps import PhaseTracker, StepFn, check_loss, run_training_step, step_phase
from ..units import format_bytes
from .error_context import model_does_not_fit, note_error
from .oom import is_ambiguous_oom_error, is_fatal_device_error, is_oom_error

__all__ = ["TrialSession", "TrainStepFn", "EvalStepFn"]

logger = logging.getLogger(__name__)

_REENTRANT_NO_GRAD = "None of the inputs have requires_grad=True"
"""What PyTorch's reentrant checkpoint warns when the checkpointed part will get no gradients."""

_MAX_EXTRA_STEPS = 8
"""Steps a trial adds, at most, while an optimizer's steps are being skipped and its state does not exist yet."""


TrainStepFn = Callable[[nn.Module, Any, int], None]
"""``train_step(model, device_batch, step_index)``: one complete training step, optimizer step and zero grad included;
under gradient accumulation ``train_step(model, device_batch, micro_index, accumulation=k)``: one micro-batch, the
optimizer stepping after every ``k``-th (as the front end's loop does with ``k`` accumulation steps)."""
EvalStepFn = Callable[[nn.Module, Any], None]
"""``eval_step(model, device_batch)``: one evaluation step (called in eval mode under ``torch.no_grad()``)."""

class TrialSession:
    """Runs trials on one model, dataset and device, and leaves the user's state as it found it.

    Use as a context manager; :meth:`run` runs one trial.
    """

    def __init__(
        self,
        model: nn.Module,
        source: BatchSource,
        step: StepFn | None,
        optimizer: OptimizerSpec | None,
        device: DeviceBackend,
        *,
        steps_per_trial: int = MIN_STEPS_PER_TRIAL,
        train_step: TrainStepFn | None = None,
        eval_step: EvalStepFn | None = None,
        eval_source: BatchSource | None = None,
        eval_steps: int = 1,
        validate: bool = True,
        extra_optimizers: Sequence[torch.optim.Optimizer] = (),
        reserved_bytes: Sequence[int] = (),
        extra_state: Sequence[SnapshotFactory] = (),
        precision: str = "32-true",
        record_on_entry: bool = False,
        inference: bool = False,
    ) -> None:
        """``step``/``optimizer`` drive the built-in training step; ``train_step`` replaces it (then ``step`` may be
        None); with neither the session only evaluates (``eval_step`` and ``eval_source`` required). ``precision``
        (:mod:`batchfinder.training.precision`) applies to the built-in step: autocast and a fresh ``GradScaler`` per trial for
        the mixed precisions; for ``"16-true"``/``"bf16-true"`` the model's floating parameters and buffers, and the
        batches' floating tensors, are cast for the length of the session. ``record_on_entry``: the model check on
        entry is the recorded trial of :meth:`record_allocations` where one can be made (one real step less for a
        guided search). ``inference``: evaluation steps run under ``torch.inference_mode()`` instead of
        ``torch.no_grad()``. See the module documentation for the other keywords."""
        self.model = model
        self.source = source
        self.step = step
        self.optimizer = optimizer
        self.device = device
        self.steps_per_trial = steps_per_trial
        self.train_step = train_step
        self.eval_step = eval_step
        self.eval_source = eval_source if eval_source is not None else (source if eval_step is not None else None)
        self.eval_steps = eval_steps
        self.validate = validate
        self.extra_optimizers = list(extra_optimizers)
        self.reserved_bytes = [int(n) for n in reserved_bytes if n > 0]
        self.extra_state = list(extra_state)
        self.precision = check_precision(precision)
        self.record_on_entry = record_on_entry
        self.inference = inference
        self._entry_log: AllocationLog | None = None
        self._entry_recording_failed = False
        self._param_dtype = parameter_dtype(self.precision)
        self._cast: contextlib.ExitStack | None = None
        self.notes: list[str] = []
        """What the session noticed about the model that the result should say (e.g. a checkpointed part that
        computes no gradients)."""
        if not self.trains and eval_step is None:
            raise ValueError("a TrialSession needs a training step (step and optimizer, or train_step) or an eval_step")
        self._state: TrainingState | None = None
        self._resident: Any = None
        self._reserved: list[torch.Tensor] = []
        self._entry_allocated = 0

    @property
    def trains(self) -> bool:
        """True when trials run training steps (False: an evaluation-only session)."""
        return self.train_step is not None or (self.step is not None and self.optimizer is not None)

    # -- lifetime ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "TrialSession":
        self.device.check_model(self.model)
        self._entry_allocated = self.device.memory_allocated()
        bound = [self.optimizer.bound] if self.optimizer is not None and self.optimizer.bound is not None else []
        self._state = TrainingState.capture(self.model, [*bound, *self.extra_optimizers], extras=self.extra_state)
        try:
            self._state.clear_gradients()
            self._cast = contextlib.ExitStack()
            self._cast.enter_context(torch_import_side_effects_contained())  # nothing left on disk or in os.environ
            if autocast_dtype(self.precision) is not None and self.device.torch_device.type != "cuda":
                self._cast.enter_context(cuda_autocast_policies())  # registered once for every trial of the session
            if self._param_dtype is not None:
                dtype = self._param_dtype
                self._cast.enter_context(
                    swapped_data(
                        self.model, lambda data: data.to(dtype), only=lambda tensor: tensor.is_floating_point(),
                        keep_on_host=self.device.holds,  # float32 originals must not stay on the device
                    )
                )
                # The existing optimizer state is cast with the parameters it belongs to (and back on exit).
                self._cast.enter_context(cast_optimizer_state(self._optimizers(None), dtype))
            self._enter_resident()
            self._probe()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._reserved = []
        with deferred_interrupts():
            try:
                if self._resident is not None:
                    resident, self._resident = self._resident, None
                    resident.__exit__(None, None, None)
                if self._cast is not None:
                    cast, self._cast = self._cast, None
                    cast.close()
            finally:
                if self._state is not None:
                    self._state.restore(final=True)
        # Short cycles of the trials go now; a full collection (0.05-0.8 s in a large process) only when something
        # the session put on the device is still held.
        gc.collect(0)
        if self.device.memory_allocated() > self._entry_allocated:
            gc.collect()
        if self.device.memory_allocated() > self._entry_allocated:
            flush_autograd(self.device)  # a backward pass interrupted (Ctrl-C, an error) leaves its graph there

    def _enter_resident(self) -> None:
        bound = self.optimizer.bound if self.optimizer is not None else None
        resident = contextlib.ExitStack()
        try:
            resident.enter_context(self.device.resident(self.model, bound))
            for extra in self.extra_optimizers:
                resident.enter_context(self.device.resident(self.model, extra))
            self._reserved = [self.device.to_device(torch.empty(n, dtype=torch.uint8)) for n in self.reserved_bytes]
        except torch.OutOfMemoryError as exc:
            self._reserved = []
            resident.close()
            del exc
            held = [*([bound] if bound is not None else []), *self.extra_optimizers]
            raise model_does_not_fit(self.model, self.device, self.reserved_bytes, held) from None
        except BaseException:  # e.g. a memory_limit refused: what was put on the device goes back
            self._reserved = []
            resident.close()
            raise
        self._resident = resident

    def _probe(self) -> None:
        """Check that the model takes the batch: one forward/backward at a tiny batch outside memory accounting, or
        with ``record_on_entry`` the recorded trial where one can be made."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not self._recorded_on_entry():
                with host_side_loading():
                    self._probe_unaccounted()
        for warning in caught:
            if _REENTRANT_NO_GRAD in str(warning.message):
                note = (
                    "reentrant activation checkpointing (use_reentrant=True) got inputs that do not require grad: "
                    "the checkpointed part computes no gradients and its parameters are not trained, so trials "
                    "measure a lighter step than training it would be. Use use_reentrant=False, or make the "
                    "checkpointed inputs require grad"
                )
                if note not in self.notes:
                    self.notes.append(note)
                    logger.warning("%s", note)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    def _recorded_on_entry(self) -> bool:
        """With ``record_on_entry``: make the recorded trial, which runs the model on real batches and so checks it
        as the probe would. False where none can be made or it failed (the plain probe then says what is wrong)."""
        if not (self.record_on_entry and self._can_record(RECORDED_SIZES)):
            return False
        try:
            self._entry_log = self._record(RECORDED_SIZES)
        except Exception as exc:  # the plain probe that follows reports what the model cannot do, with its message
            logger.info(
                "recording a trial on entry failed (%s: %s); checking the model with one plain step",
                type(exc).__name__, exception_first_line(exc),
            )
            self._entry_recording_failed = True
            return False
        return True

    def _probe_unaccounted(self) -> None:
        size = min(2, self.source.length)
        state = self._require_state()
        tracker = PhaseTracker()
        host_batch: Any = None
        try:
            with tracker.active():
                tracker.enter("collate")
                host_batch = self._host(self.source.batch(size))
                tracker.enter("moving the batch to the device")
                batch = self.device.to_device(host_batch)
                self.model.train()
                if self.train_step is not None:
                    tracker.enter("training step", 0)
                    self.train_step(self.model, batch, 0)
                elif self.step is not None and self.optimizer is not None:
                    tracker.enter(step_phase(self.step), 0)
                    with StepPrecision(self.precision, self.device.torch_device.type).autocast():  # as trials run it
                        loss = self.step(self.model, batch)
                    check_loss(loss, self.step)
                    tracker.enter("backward")
                    loss.backward()
                    del loss
                    tracker.enter("creating the optimizer")
                    self.optimizer.create()
                if self.eval_step is not None and self.eval_source is not None:
                    tracker.enter("collate")
                    host_batch = self._host(self.eval_source.batch(min(2, self.eval_source.length)))
                    tracker.enter("moving the batch to the device")
                    batch = self.device.to_device(host_batch)
                    self.model.eval()
                    tracker.enter("evaluation step")
                    with torch.no_grad():
                        self.eval_step(self.model, batch)
        except Exception as exc:
            if is_oom_error(exc) and not is_ambiguous_oom_error(exc):
                return  # even a tiny batch does not fit: the search reports it with figures
            if is_ambiguous_oom_error(exc):
                raise ValueError(
                    f"cuDNN refused the model at a batch of {size} ({exception_first_line(exc)}): at so small a batch "
                    "this means an unsupported layer configuration (dtype, layout, kernel size or padding), not a "
                    "lack of memory. Check the layer's settings, or set torch.backends.cudnn.enabled = False."
                ) from exc
            # The user's exception, with its own type, says where it happened and what to check.
            built = f": {describe_batch(host_batch)}" if host_batch is not None else ""
            note_error(exc, tracker, f"while checking the model on a batch of {size} built from the dataset{built}", probe=True)
            raise
        finally:
            state.restore(final=False)

    def _host(self, batch: Any) -> Any:
        """A host batch as the trial feeds it: for ``"16-true"``/``"bf16-true"`` with its floating tensors cast."""
        return batch if self._param_dtype is None else cast_floating(batch, self._param_dtype)

    def _require_state(self) -> TrainingState:
        if self._state is None:
            raise RuntimeError("TrialSession must be used as a context manager")
        return self._state

    # -- trials --------------------------------------------------------------------------------------------------
    def run(
        self,
        batch_size: int,
        *,
        phase: str = "train",
        steps: int | None = None,
        host_batches: Sequence[Any] | Callable[[], Sequence[Any] | None] | None = None,
        accumulation: int = 1,
    ) -> Trial:
        """Run one trial at ``batch_size`` and return how it went; restores the user's state afterwards.

        ``phase="train"`` (default): ``steps_per_trial`` training steps at ``batch_size`` and, when the session has an
        eval step, ``eval_steps`` evaluation steps at the same size (at most the evaluation data's length); the trial
        fits only if both do. ``phase="eval"``: evaluation steps at ``batch_size``; a session that trains first runs
        one training step at a batch of 2, so that optimizer state and gradients are held as during validation inside
        training. Its time per step is then the evaluation step's. ``steps`` overrides ``steps_per_trial`` (or
        ``eval_steps``) for one trial (the confirmation run). ``host_batches`` gives one host batch per training
        step (or, for ``phase="eval"``, per evaluation step) instead of one batch of ``batch_size`` for every step:
        each moves to the device before the previous one is dropped, as in a loop, with the allocator's cache kept;
        or a callable that returns them (None: one batch of ``batch_size``), called inside the trial. An
        out-of-memory error while a batch is built (a ``collate_fn`` that moves it to the GPU) or moved to the device
        means the size does not fit, as one in the steps does.
        ``accumulation`` > 1 (training only): each step is that many micro-batches of ``batch_size`` with the gradients
        kept between them, then the optimizer step (:mod:`batchfinder.engine.accumulation`).
        """
        state = self._require_state()
        tracker = PhaseTracker()
        where = f"in the {'evaluation ' if phase == 'eval' else ''}trial at batch size {batch_size}"
        if phase not in ("train", "eval"):
            raise ValueError(f"phase must be 'train' or 'eval', not {phase!r}")
        if phase == "train" and not self.trains:
            raise ValueError("this session only evaluates: use run(batch_size, phase='eval')")
        if phase == "eval" and (self.eval_step is None or self.eval_source is None):
            raise ValueError("this session has no eval step to measure")
        # The level before the batch is built: a collate_fn that moves the batch to the GPU charges it to the trial.
        baseline = self.device.start_measurement()
        durations: list[float] = []
        eval_durations: list[float] = []
        error: str | None = None
        host_batch: Any = None
        eval_host: Any = None
        train_steps = 1
        try:
            tracker.enter("collate")
            batches = self._host_batches(batch_size, phase, steps, host_batches)
            host_batch, eval_host, train_steps, per_step, eval_steps, eval_per_step = batches
            del batches
            with tracker.active():
                self._steps(
                    host_batch, durations, train_steps=train_steps, eval_host=eval_host, eval_durations=eval_durations,
                    per_step=per_step, tracker=tracker, eval_steps=eval_steps, eval_per_step=eval_per_step,
                    accumulation=accumulation,
                )
        except Exception as exc:  # recovery happens below, outside this block
            # Out of memory anywhere, the data path included (a collate_fn that moves the batch to the GPU, the
            # transfer), means the size does not fit.
            if not is_oom_error(exc) or is_fatal_device_error(exc):
                note_error(exc, tracker, where, steps=train_steps, batch_size=batch_size)
                raise
            error = exception_first_line(exc)
        state.restore(final=False)
        del host_batch, eval_host
        if phase == "eval":
            durations = eval_durations
        peak, peak_reserved = self.device.read_peaks()
        error = error if error is not None else self.device.over_limit(peak_reserved)
        leaked = self._release(baseline)
        if leaked:
            logger.warning("batch size %d left %s allocated after recovery", batch_size, format_bytes(leaked))
        timed = durations[1:] or durations
        return Trial(
            batch_size=batch_size,
            fits=error is None,
            peak_bytes=peak,
            seconds_per_step=(sum(timed) / len(timed)) if error is None and timed else None,
            steps=len(durations),
            baseline_bytes=baseline,
            leaked_bytes=leaked,
            error=error,
            peak_reserved_bytes=peak_reserved,
            micro_batches=accumulation if phase == "train" else 1,
        )

    def _host_batches(
        self, batch_size: int, phase: str, steps: int | None, given: Sequence[Any] | Callable[[], Any] | None
    ) -> tuple[Any, Any, int, bool, int | None, bool]:
        """The host batches of a trial: (the training batch or one per step, the evaluation batch or one per step,
        the training steps, whether each training step has its own batch, the evaluation steps (None: the
        session's), whether each evaluation step has its own batch)."""
        given = given() if callable(given) else given
        if given is not None and not given:
            raise ValueError("host_batches is empty: give one batch per step")
        if phase == "eval":
            host = self._host(self.source.batch(min(2, self.source.length))) if self.trains else None
            if given is None:
                eval_host: Any = self._host(self.eval_source.batch(batch_size))  # type: ignore[union-attr]
                eval_steps = steps or self.eval_steps
                if self.inference:  # a loop's batches: each step's moves to the device before the last one goes
                    eval_host = [eval_host] * eval_steps
            else:
                eval_host = [self._host(b) for b in given]
                eval_steps = len(eval_host)
            return host, eval_host, 1, False, eval_steps, given is not None or self.inference
        host = self._host(self.source.batch(batch_size)) if given is None else [self._host(b) for b in given]
        eval_host = None
        if self.validate and self.eval_step is not None and self.eval_source is not None:
            eval_host = self._host(self.eval_source.batch(min(batch_size, self.eval_source.length)))
        train_steps = self.steps_per_trial if steps is None else steps
        return host, eval_host, len(host) if given is not None else train_steps, given is not None, None, False

    def record_allocations(self, sizes: tuple[int, int] = RECORDED_SIZES) -> AllocationLog | None:
        """Run one training trial with every allocator call logged, its first step at batch size ``sizes[0]`` and
        the later ones at ``sizes[1]``, and fit the log (:class:`~batchfinder.memory.replay.AllocationLog`): replayed at
        any batch size it gives, to the byte, what a trial on the simulated GPU measures there.

        The steps are real and run on the CPU, charged to a ledger of their own (the device's accounting is not
        touched); the user's state is restored afterwards. A trial at two or three samples costs a fraction of a
        fake-tensor trace for small and mid-sized models. Returns None where the log cannot stand for the trials:
        the device is not simulated, the session has its own ``train_step`` (no phases to mark), evaluation steps
        run in every trial, the data set has fewer samples than ``sizes[1]``, or the precision is ``"16-mixed"``
        (whose gradient scaler may skip steps). Raises what the step raised.

        A session opened with ``record_on_entry`` made this recording as its model check: the first call at the
        default sizes returns it (None where it failed there).
        """
        if sizes == RECORDED_SIZES and (self._entry_log is not None or self._entry_recording_failed):
            log, self._entry_log, self._entry_recording_failed = self._entry_log, None, False
            return log
        return self._record(sizes) if self._can_record(sizes) else None

    def _can_record(self, sizes: tuple[int, int]) -> bool:
        """Whether :meth:`record_allocations` can make a log that stands for this session's trials."""
        return (
            self.device.accounting_is_exact
            and self.train_step is None
            and self.step is not None
            and self.optimizer is not None
            and not (self.validate and self.eval_step is not None)
            and self.source.length >= max(sizes)
            and self.precision != "16-mixed"  # a gradient scaler's skipped steps: the trial's steps vary
        )

    def _record(self, sizes: tuple[int, int]) -> AllocationLog:
        if self.step is None or self.optimizer is None:
            raise RuntimeError("recording needs the built-in training step (step and optimizer)")
        state = self._require_state()
        hosts = {size: self._host(self.source.batch(size)) for size in sizes}
        try:
            return record_trial(
                self.model, self.step, self.optimizer, hosts, sizes, steps_per_trial=self.steps_per_trial,
                precision=StepPrecision(self.precision, self.device.torch_device.type),
                workspace_bytes=self.device.workspace_bytes, extra_optimizers=self.extra_optimizers,
                reserved=self._reserved, kernels=self.device.kernels, compute_capability=self.device.compute_capability,
                cudnn_workspace=self.device.cudnn_workspace)
        finally:
            state.restore(final=False)

    def _release(self, baseline: int) -> int:
        """Free what the trial left behind; returns the bytes still held beyond ``baseline``.

        The failed step's tensors are normally freed by reference counting as soon as the exception is gone; a
        young-generation collection catches short cycles, and a full (slow) collection runs only when memory is
        still above the baseline after that. A backward pass that ran out of memory leaves its graph (the forward's
        activations) with the autograd engine until the next backward on that device: a trivial one then frees it.
        """
        gc.collect(0)
        if self.device.memory_allocated() > baseline:
            gc.collect()
        if self.device.memory_allocated() > baseline:
            flush_autograd(self.device)
        self.device.synchronize()
        self.device.empty_cache()
        self.device.reset_peak_memory_stats()
        return self.device.memory_allocated() - baseline

    def _optimizers(self, created: torch.optim.Optimizer | None) -> list[torch.optim.Optimizer]:
        bound = self.optimizer.bound if self.optimizer is not None else None
        return [o for o in (created, bound, *self.extra_optimizers) if o is not None]

    def _state_missing(self, created: torch.optim.Optimizer | None) -> bool:
        """True when an optimizer of the trial still has no state that its steps would create (they were skipped)."""
        return any(lacks_state(optimizer) for optimizer in self._optimizers(created))

    def _warn_if_state_missing(self, created: torch.optim.Optimizer | None, steps: int) -> None:
        if self._state_missing(created):
            logger.warning(
                "after %d training steps an optimizer still has no state (were the steps skipped, e.g. by a gradient "
                "scaler finding inf gradients?): the trial does not include the optimizer state's memory", steps
            )

    def _steps(
        self,
        host_batch: Any,
        durations: list[float],
        *,
        train_steps: int | None = None,
        eval_host: Any = None,
        eval_durations: list[float] | None = None,
        per_step: bool = False,
        tracker: PhaseTracker | None = None,
        eval_steps: int | None = None,
        eval_per_step: bool = False,
        accumulation: int = 1,
    ) -> None:
        steps = self.steps_per_trial if train_steps is None else train_steps
        tracker = tracker if tracker is not None else PhaseTracker()
        with self.device.measuring():
            optimizer = None
            if host_batch is not None and self.train_step is not None:
                self.model.train()
                index = 0
                tracker.enter("moving the batch to the device", 0)
                batches = DeviceBatches(self.device, host_batch, per_step)
                accumulating = {"accumulation": accumulation} if accumulation > 1 else {}
                while index < steps or (index < steps + _MAX_EXTRA_STEPS and self._state_missing(None)):
                    tracker.enter("moving the batch to the device", index)
                    batch = batches.get(index)
                    tracker.enter("training step")
                    start = time.perf_counter()
                    for micro in range(accumulation):  # the micro-batches of one optimizer step, each moved anew
                        micro_batch = batches.again() if micro else batch
                        self.train_step(self.model, micro_batch, index * accumulation + micro, **accumulating)
                        del micro_batch
                    self.device.synchronize()
                    durations.append(time.perf_counter() - start)
                    index += 1
                    del batch
                self._warn_if_state_missing(None, index)
                del batches
            elif host_batch is not None and self.step is not None and self.optimizer is not None:
                tracker.enter("creating the optimizer")
                optimizer = self.optimizer.create()
                precision = StepPrecision(self.precision, self.device.torch_device.type)
                self.model.train()
                index = 0
                tracker.enter("moving the batch to the device", 0)
                batches = DeviceBatches(self.device, host_batch, per_step)
                while index < steps or (index < steps + _MAX_EXTRA_STEPS and self._state_missing(optimizer)):
                    tracker.enter("moving the batch to the device", index)
                    batch = batches.get(index)
                    start = time.perf_counter()
                    run_training_step(
                        self.model, batch, self.step, optimizer, precision=precision, micro_batches=accumulation,
                        next_batch=batches.again,
                    )
                    self.device.synchronize()
                    durations.append(time.perf_counter() - start)
                    index += 1
                    del batch
                self._warn_if_state_missing(optimizer, index)
                del batches
            if eval_host is not None and self.eval_step is not None:
                # The training batch is gone, the optimizer (and its state) is not: as during validation in training.
                tracker.step_index = None
                self.model.eval()
                output: Any = None
                with torch.inference_mode() if self.inference else torch.no_grad():
                    tracker.enter("moving the batch to the device")
                    eval_batches = DeviceBatches(self.device, eval_host, eval_per_step)
                    for index in range(self.eval_steps if eval_steps is None else eval_steps):
                        tracker.enter("moving the batch to the device")
                        batch = eval_batches.get(index)
                        tracker.enter("evaluation step")
                        start = time.perf_counter()
                        # the previous output is still held while this one is computed, as a caller's loop holds it
                        output = self.eval_step(self.model, batch)
                        self.device.synchronize()
                        if eval_durations is not None:
                            eval_durations.append(time.perf_counter() - start)
                        del batch
                    del eval_batches, output
            del optimizer

