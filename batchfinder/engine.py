"""The one search entry every front end calls: :func:`search`, and the function front end over it.

>>> import torch, batchfinder as bf
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
>>> data = torch.utils.data.TensorDataset(torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,)))
>>> result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"))   # doctest: +SKIP
>>> result.max_batch_size, result.batch_size, result.stop_reason                  # doctest: +SKIP

A front end (:func:`find_batch_size`, the Lightning callback, the command line) gathers the user's pieces into a
:class:`Workload` (the model, where batches come from, how a trial steps) and the search settings into
:class:`SearchOptions`, and calls :func:`search`, which

1. checks the options and the model,
2. opens a :class:`~batchfinder.trial.TrialSession` (which snapshots and later restores the user's state, keeps the
   model resident on the device and checks once that the model takes a batch),
3. agrees with the other ranks when ``torch.distributed`` runs several (:mod:`batchfinder.distributed`),
4. runs the training search (and, when asked, a search of a separate evaluation batch size), asking the search mode
   (:mod:`batchfinder.modes`) which size to try next until it, the trial budget or the time budget ends the search,
5. plans gradient accumulation toward ``target_batch_size`` once, and returns the :class:`SearchResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .accumulation import plan_accumulation, validate_target_batch_size
from .batching import BatchSource
from .device_choice import resolve_device
from .devices import DeviceBackend, DeviceLike
from .confirmation import confirm
from .distributed import RankAgreement, ddp_bucket_bytes, local_batch_norm, resolve_agreement, unwrap_ddp
from .errors import NoBatchSizeFitsError, SearchIncompleteError
from .modes import EVALUATION_MODES, MODES, SearchContext, check_mode
from .optimizers import OptimizerLike, OptimizerSpec, resolve_optimizer
from .precision import check_precision
from .report import ProgressPrinter
from .result import SearchResult, Trial
from .sample_sizes import DEFAULT_SCAN_BUDGET, FIXED_CHECK_SECONDS, SampleSize, check_scan_budget
from .search import SearchBounds, SearchStrategy, StopReason, recommend_batch_size
from .state import SnapshotFactory
from .steps import LossFn, StepFn, make_step
from .trial import EvalStepFn, TrainStepFn, TrialSession
from .units import format_bytes
from .validation import (
    MIN_STEPS_PER_TRIAL,
    check_materialised,
    check_model,
    check_positive_int,
    check_safety,
    check_steps_per_trial,
    check_time_budget,
)

__all__ = ["SearchOptions", "Workload", "search", "find_batch_size", "try_batch_size"]

logger = logging.getLogger(__name__)

ProgressLike = bool | Callable[[Trial], None] | None


@dataclass(frozen=True)
class SearchOptions:
    """How to search: the arguments every front end shares (see :func:`find_batch_size` for each)."""

    mode: str = "binsearch"
    init_batch_size: int = 16
    max_batch_size: int | None = None
    safety: float = 0.8
    multiple_of: int = 1
    steps_per_trial: int = MIN_STEPS_PER_TRIAL
    max_trials: int | None = None
    time_budget: float | None = None
    progress: ProgressLike = False
    target_batch_size: int | None = None
    """The effective batch size over all ranks (micro-batch x accumulation steps x ranks)."""
    distributed: bool | None = None
    confirm_steps: int = MIN_STEPS_PER_TRIAL
    """After the search, this many steps at the recommended size in one trial (0: none). On a caching allocator
    "fits" is not monotone in the batch size (segments pack differently), so the recommended size, below the largest
    that fits, is tried as well."""

    def validate(self) -> None:
        """Raise a ValueError/TypeError naming the first bad option and what would be valid."""
        check_mode(self.mode)
        check_positive_int("init_batch_size", self.init_batch_size)
        check_positive_int("max_batch_size", self.max_batch_size, allow_none=True)
        if self.max_batch_size is not None and self.init_batch_size > self.max_batch_size:
            raise ValueError(f"init_batch_size={self.init_batch_size} is larger than max_batch_size={self.max_batch_size}")
        check_safety(self.safety)
        check_positive_int("multiple_of", self.multiple_of)
        check_steps_per_trial(self.steps_per_trial)
        check_positive_int("max_trials", self.max_trials, allow_none=True)
        check_time_budget(self.time_budget)
        progress_callback(self.progress)
        validate_target_batch_size(self.target_batch_size)
        if isinstance(self.confirm_steps, bool) or not isinstance(self.confirm_steps, int) or self.confirm_steps < 0:
            raise ValueError(f"confirm_steps={self.confirm_steps!r} must be a whole number of steps, 0 for none")
        if self.distributed is not None and not isinstance(self.distributed, bool):
            raise TypeError(f"distributed must be True, False or None (automatic), not {type(self.distributed).__name__}")


@dataclass
class Workload:
    """What a search's trials run, gathered by a front end.

    ``source`` builds training batches (``None`` for an evaluation-only search). ``step``/``optimizer`` drive the
    built-in training step; ``train_step`` replaces it with a front end's own (e.g. Lightning's optimisation step).
    ``eval_step``/``eval_source`` add evaluation: inside every training trial when ``validate`` is true, and as a
    search of its own when ``search_evaluation`` is true (or when the workload does not train).
    ``extra_optimizers``, ``extra_state`` and ``ddp`` are kept, restored and charged as the session describes.
    """

    model: nn.Module
    source: Any
    step: StepFn | None
    optimizer: OptimizerSpec | None
    train_step: TrainStepFn | None = None
    eval_step: EvalStepFn | None = None
    eval_source: Any = None
    validate: bool = False
    search_evaluation: bool = False
    extra_optimizers: Sequence[Any] = ()
    extra_state: Sequence[SnapshotFactory] = ()
    ddp: nn.parallel.DistributedDataParallel | None = None
    """The DDP wrapper around ``model``, when there is one (its gradient buckets are charged)."""
    precision: str = "32-true"
    """The built-in step's precision (:mod:`batchfinder.precision`); a front end's own ``train_step`` runs in its
    framework's precision instead."""
    notes: list[str] = field(default_factory=list)
    """What the front end did that the result should say (e.g. searched a compiled model's original module)."""

    @property
    def trains(self) -> bool:
        """True when trials run training steps."""
        return self.source is not None and (self.train_step is not None or (self.step is not None and self.optimizer is not None))


def progress_callback(progress: ProgressLike) -> Callable[[Trial], None] | None:
    """The ``progress`` argument as a callback (``True``: one line per trial on standard error)."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return ProgressPrinter()
    if callable(progress):
        return progress
    raise TypeError(f"progress must be a bool or a callable taking a Trial, not {type(progress).__name__}")


# -- the one entry point --------------------------------------------------------------------------------------------
def search(workload: Workload, device: DeviceBackend, options: SearchOptions) -> SearchResult:
    """Search the batch size of ``workload`` on ``device``: the entry point every front end calls.

    Returns the training search's :class:`SearchResult` (its :attr:`~SearchResult.evaluation` holds the evaluation
    search when ``workload.search_evaluation``), or, for a workload that does not train, the evaluation search's.
    Raises :class:`~batchfinder.NoBatchSizeFitsError` when batch size 1 does not fit and
    :class:`~batchfinder.SearchIncompleteError` when a budget ends the search before any size fitted. The user's
    state is restored in every case.
    """
    started = time.perf_counter()
    options.validate()
    check_model(workload.model)
    check_materialised(workload.model)
    session = _session(workload, device, options)
    training = workload.trains
    source = workload.source if training else workload.eval_source
    check_precision(workload.precision)
    device.check_precision(workload.precision)
    context = SearchContext(
        workload.model, source, device, workload.optimizer, workload.step, options.steps_per_trial, workload.precision,
        record=session.record_allocations if training else None,
    )
    agreement = resolve_agreement(options.distributed)
    try:
        with _open(session, agreement):
            phase = "train" if training else "eval"
            result, strategy = _run(session, context, options, agreement, phase=phase, length=source.length)
            if _looked_further(source, time.perf_counter() - started, agreement):
                session.notes.append(
                    f"a sample of other shapes than the rest turned up after the search ({source.scan.describe()}): "
                    "the search ran again on the largest samples"
                )
                result, strategy = _run(session, context, options, agreement, phase=phase, length=source.length)
            if training and workload.search_evaluation and workload.eval_source is not None:
                eval_options = _evaluation_options(options, min(result.max_batch_size, workload.eval_source.length))
                result.evaluation, _ = _run(
                    session, context, eval_options, agreement, phase="eval", length=workload.eval_source.length
                )
                result.evaluation.data_scan = getattr(workload.eval_source, "scan", None)
            if training and options.confirm_steps:
                confirm(session, source, result, options, agreement, strategy)
    finally:
        if agreement is not None:
            agreement.close()
    if training and options.target_batch_size is not None:
        plan = plan_accumulation(
            math.ceil(options.target_batch_size / result.world_size), result.batch_size, options.multiple_of
        )
        result.target_batch_size = options.target_batch_size
        result.micro_batch_size = plan.micro_batch_size
        result.accumulation_steps = plan.accumulation_steps
    result.data_scan = getattr(source, "scan", None)
    result.precision = workload.precision
    result.notes = [*workload.notes, *session.notes]
    result.seconds = time.perf_counter() - started
    return result


def _looked_further(source: Any, elapsed: float, agreement: RankAgreement | None) -> bool:
    """The deferred check of fixed-size data (:meth:`~batchfinder.batching.BatchSource.look_further`), given a
    quarter of the time the search took (at most ``FIXED_CHECK_SECONDS``): True when a sample of other shapes turned
    up, so that the search must run again on the largest samples."""
    further = getattr(source, "look_further", None)
    if further is None:
        return False
    found = bool(further(min(FIXED_CHECK_SECONDS, elapsed / 4)))
    if agreement is not None and agreement.any(found) and not found:
        source.rescan()  # another rank found one: every rank searches the same largest samples
        found = True
    if found:
        logger.warning(
            "a sample of other shapes than the rest turned up after the search (%s): searching again on the largest "
            "samples", source.scan.describe(),
        )
    return found


def _evaluation_options(options: SearchOptions, init_batch_size: int) -> SearchOptions:
    mode = options.mode if options.mode in EVALUATION_MODES else "binsearch"
    if mode != options.mode:
        logger.info("evaluation batch sizes are searched with binsearch (mode %s models training memory)", options.mode)
    return SearchOptions(**{**options.__dict__, "mode": mode, "init_batch_size": max(init_batch_size, 1)})


def _session(workload: Workload, device: DeviceBackend, options: SearchOptions) -> TrialSession:
    # A real GPU already holds DDP's gradient buckets (allocated when the wrapper was built); a simulated one is told.
    charge_buckets = workload.ddp is not None and device.simulated
    return TrialSession(
        workload.model,
        workload.source if workload.trains else workload.eval_source,
        workload.step,
        workload.optimizer,
        device,
        steps_per_trial=options.steps_per_trial,
        train_step=workload.train_step,
        eval_step=workload.eval_step,
        eval_source=workload.eval_source,
        validate=workload.validate or not workload.trains,
        extra_optimizers=workload.extra_optimizers,
        reserved_bytes=ddp_bucket_bytes(workload.ddp) if charge_buckets and workload.ddp is not None else (),
        extra_state=workload.extra_state,
        precision=workload.precision,
        record_on_entry=options.mode == "guided" and workload.trains,
    )


_SETUP = "the search's set-up (snapshot, model on the device, probe)"


@contextlib.contextmanager
def _open(session: TrialSession, agreement: RankAgreement | None) -> Iterator[TrialSession]:
    """Enter ``session`` (snapshot, resident model, probe) for the length of the block, and restore on exit.

    With an ``agreement`` every rank learns whether every other rank got in, so that a rank whose model does not fit
    (or whose probe fails) does not leave the others waiting in the first trial's collective. ``SyncBatchNorm``
    layers normalise locally while the session is open (their forward is a collective).
    """
    with local_batch_norm(session.model):
        try:
            session.__enter__()
        except Exception:
            if agreement is not None:
                agreement.check(False, _SETUP)
            raise
        try:
            if agreement is not None:
                agreement.check(True, _SETUP)
            yield session
        finally:
            session.__exit__(None, None, None)


_BUDGET_STOPS = (StopReason.MAX_TRIALS, StopReason.TIME_BUDGET)


def _run(
    session: TrialSession,
    context: SearchContext,
    options: SearchOptions,
    agreement: RankAgreement | None,
    *,
    phase: str,
    length: int,
) -> tuple[SearchResult, SearchStrategy]:
    """One search loop (training or evaluation batch sizes) on an open session; the result and the strategy."""
    report = progress_callback(options.progress)
    started = time.perf_counter()
    cap = options.max_batch_size
    if cap is not None and cap < length:
        bounds = SearchBounds(min(options.init_batch_size, cap), cap, StopReason.MAX_BATCH_SIZE)
    else:
        bounds = SearchBounds(min(options.init_batch_size, length), length, StopReason.DATASET_LENGTH)
    strategy = MODES[options.mode](bounds, context)
    trials: list[Trial] = []
    logger.info(
        "searching %s batch sizes on %s (mode %s, up to %d%s)",
        "evaluation" if phase == "eval" else "training",
        context.device.name,
        options.mode,
        bounds.cap,
        f", {agreement.world_size} ranks agreeing" if agreement is not None else "",
    )
    while True:
        size = strategy.propose()
        stop: StopReason | None = None
        if size is not None:
            if options.max_trials is not None and len(trials) >= options.max_trials:
                stop = StopReason.MAX_TRIALS
            elif options.time_budget is not None and trials and time.perf_counter() - started >= options.time_budget:
                stop = StopReason.TIME_BUDGET
        if agreement is not None:
            size, agreed_stop = agreement.agree_next(size, stop, _BUDGET_STOPS)
            stop = agreed_stop if isinstance(agreed_stop, StopReason) else None
        if size is None:
            break
        if stop is not None:
            strategy.stop(stop)
            break
        try:
            trial = session.run(size, phase=phase)
        except Exception:
            if agreement is not None:
                agreement.agree_outcome(False, 0, True, f"the trial at batch size {size}")
            raise
        peak = trial.peak_reserved_bytes  # what the allocator fails on (allocated bytes where nothing is cached)
        if agreement is not None:
            trial, peak = agreement.agree_trial(trial, f"the trial at batch size {size}")
        trials.append(trial)
        strategy.record(size, trial.fits, peak, peak_allocated=trial.peak_bytes)
        logger.info("batch size %d: %s", size, "fits" if trial.fits else "out of memory")
        if report is not None:
            report(trial)
    if strategy.largest_fit == 0:
        if strategy.stop_reason == StopReason.NOTHING_FITS:
            raise _nothing_fits(trials, context.device)
        raise SearchIncompleteError(
            f"the search stopped ({strategy.stop_reason}) after {len(trials)} trial(s) before any batch size fitted; "
            "raise max_trials / time_budget or lower init_batch_size"
        )
    result = SearchResult(
        max_batch_size=strategy.largest_fit,
        batch_size=recommend_batch_size(strategy.largest_fit, options.safety, options.multiple_of),
        trials=trials,
        stop_reason=strategy.stop_reason or StopReason.BRACKET_CLOSED,
        safety=float(options.safety),
        multiple_of=options.multiple_of,
        mode=options.mode,
        device=context.device.name,
        capacity_bytes=context.device.capacity_bytes,
        seconds=time.perf_counter() - started,
        smallest_failure=strategy.smallest_failure,
        predicted_peaks=strategy.predicted_peaks,
        predicted_max_batch_size=strategy.predicted_max,
        prediction_status=strategy.prediction_status,
        prediction_method=strategy.prediction_method,
        world_size=agreement.world_size if agreement is not None else 1,
    )
    return result, strategy


def _nothing_fits(trials: list[Trial], device: DeviceBackend) -> NoBatchSizeFitsError:
    smallest = min(trials, key=lambda t: t.batch_size)
    request = smallest.requested_bytes or 0
    needed = max(smallest.peak_reserved_bytes, smallest.peak_bytes) + request  # what the allocator held, and asked
    capacity = device.capacity_bytes
    report = device.memory_report()
    return NoBatchSizeFitsError(
        f"batch size {smallest.batch_size} does not fit on {device.name}: the trial needed at least "
        f"{format_bytes(needed)} (it reached {format_bytes(max(smallest.peak_reserved_bytes, smallest.peak_bytes))}, of which "
        f"{format_bytes(smallest.baseline_bytes)} is the model and its existing state, then asked for "
        f"{format_bytes(request)} more) but the device has {format_bytes(capacity)}"
        + (f" ({report})" if report else "")
        + ". Use a larger GPU, an optimizer with less state (SGD), mixed precision, or a smaller model.",
        needed_bytes=needed,
        capacity_bytes=capacity,
    )


# -- the function front end -----------------------------------------------------------------------------------------
def _function_workload(
    model: nn.Module,
    dataset: Any,
    optimizer: OptimizerLike,
    loss_fn: LossFn | None,
    step_fn: StepFn | None,
    sample_size: SampleSize | None,
    scan_budget: float,
    precision: str,
    defer_fixed_check: bool = True,
) -> Workload:
    """The user's pieces as a :class:`Workload`, each checked before anything runs (``defer_fixed_check``: see
    :class:`~batchfinder.batching.BatchSource`; a search looks further after it ran)."""
    check_model(model)
    check_scan_budget(scan_budget)
    check_precision(precision)
    model, notes = _uncompiled(model)
    module, ddp = unwrap_ddp(model)  # trials run on the unwrapped module: DDP's collectives could hang on an OOM
    check_materialised(module)
    step = make_step(loss_fn, step_fn)
    spec = resolve_optimizer(optimizer, module)
    source = BatchSource(dataset, sample_size=sample_size, scan_budget=scan_budget, defer_fixed_check=defer_fixed_check)
    return Workload(module, source, step, spec, ddp=ddp, precision=precision, notes=notes)


def _uncompiled(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A ``torch.compile``'d model's original module (searched instead: the compiled one would recompile at every
    batch size, and its kernels run outside the memory accounting), with the note the result gives."""
    original = getattr(model, "_orig_mod", None)
    if not isinstance(original, nn.Module) or type(model).__name__ != "OptimizedModule":
        return model, []
    note = (
        "torch.compile: the original (uncompiled) module was searched, once per size, instead of recompiling at "
        "every size; compiled kernels fuse operations and usually hold less activation memory, so the size found "
        "is on the safe side for the compiled model (compile once more after changing the batch size, or mark the "
        "batch dimension dynamic)"
    )
    logger.info("%s", note)
    return original, [note]


def find_batch_size(
    model: nn.Module,
    dataset: Any,
    *,
    optimizer: OptimizerLike = None,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
    device: DeviceLike = None,
    mode: str = "binsearch",
    init_batch_size: int = 16,
    max_batch_size: int | None = None,
    safety: float = 0.8,
    multiple_of: int = 1,
    steps_per_trial: int = MIN_STEPS_PER_TRIAL,
    max_trials: int | None = None,
    time_budget: float | None = None,
    progress: ProgressLike = False,
    memory_limit: int | str | None = None,
    target_batch_size: int | None = None,
    distributed: bool | None = None,
    confirm_steps: int = MIN_STEPS_PER_TRIAL,
    sample_size: SampleSize | None = None,
    scan_budget: float = DEFAULT_SCAN_BUDGET,
    precision: str = "32-true",
) -> SearchResult:
    """Find the largest batch size ``model`` can train with on ``device`` by running real training steps.

    Args:
        model: any ``nn.Module``; its weights, buffers, gradients, train/eval mode, the optimizer's state and the
            RNG states are exactly as before when this returns, raises or is interrupted. A model on the ``meta``
            device is refused (materialise it first; :func:`~batchfinder.estimate_memory` accepts it).
        dataset: a map-style ``Dataset`` or a ``DataLoader``; samples are tensors, ``(input, target, ...)`` tuples or
            dicts of tensors (passed as ``model(**batch)``). Batch sizes never exceed ``len(dataset)``.
        optimizer: an optimizer class, a callable ``params -> optimizer``, or an optimizer bound to the model (its
            state is then part of the memory and is preserved). Default: Adam, which holds two states per parameter.
        loss_fn: ``loss_fn(output, target) -> loss`` instead of the default (cross-entropy / MSE / mean).
        step_fn: ``step_fn(model, batch) -> loss`` for full control of the forward pass (AMP, several inputs).
        device: ``"cuda"``, ``"cuda:N"``, a ``torch.device``, a :class:`~batchfinder.SimulatedGPU`, or
            ``"sim:16GiB"``. Default: the current CUDA GPU.
        mode: ``"binsearch"`` (double, then bisect to a resolution of 1), ``"power"`` (last doubling that fits) or
            ``"guided"`` (jump to the size the memory prediction gives, then verify it with real trials: on the
            simulated GPU usually one trial, whose peaks confirm the prediction to the byte).
        init_batch_size: first size tried (default 16); when it does not fit the search walks down.
        max_batch_size: never try more than this.
        safety: the recommendation is ``floor(safety * max_batch_size)`` (default 0.8).
        multiple_of: round the recommendation down to a multiple of this.
        steps_per_trial: training steps per trial, at least 2.
        max_trials: stop after this many trials and return the best size tried so far.
        time_budget: start no new trial after this many seconds (the first trial always runs; a running trial is
            not interrupted).
        progress: True to print a line per trial to standard error, or a callable receiving each ``Trial``.
        memory_limit: on CUDA, make the GPU behave like one with this much memory (e.g. ``"16GiB"``).
        target_batch_size: the effective batch size to reach with gradient accumulation: the result then also holds
            ``micro_batch_size`` (at most the recommended size) and ``accumulation_steps`` with
            ``micro_batch_size * accumulation_steps * world_size >= target_batch_size`` and the least waste
            (see :mod:`batchfinder.accumulation`). With several agreeing ranks the target is the global batch.
        distributed: ``None`` (default): when ``torch.distributed`` is initialised with several ranks, every rank
            must call this; they run each trial at the same size and a size fits only if it fitted on every rank, so
            all ranks return the same result (see :mod:`batchfinder.distributed`). ``False``: this rank searches on
            its own. ``True``: require ``torch.distributed``. A ``DistributedDataParallel`` model is searched through
            its unwrapped module (no collective runs inside a trial) with its gradient buckets charged; sharded
            models (FSDP, DeepSpeed) are refused.
        confirm_steps: after the search, run this many steps (default 2) at the recommended size in one trial, with
            the device's cache kept between them (so that what steps leave cached and fragmented shows); if it runs
            out of memory the recommendation is lowered by the safety factor again and confirmed
            (``result.confirmations``). On a caching allocator a smaller size does not always fit when a larger one
            does, so the recommended size is tried rather than assumed. When sample sizes vary the steps run on the
            first ``confirm_steps`` batches in the order your loader yields them (its sampler's order; shuffled
            without a loader), then on the worst-case batch. 0 turns this off.
        sample_size: how large each sample is, when sizes vary: a callable ``index -> number`` or a sequence with
            one number per sample (e.g. a list of lengths). Default: the number of elements of a sample's tensors.
            When sizes vary, a trial of size B runs on the B largest samples (collated with the loader's
            ``collate_fn``), which bounds every batch of B a shuffled epoch can draw.
        scan_budget: seconds the scan for the largest samples may take (default 10). Fixed-size data is recognised
            from 64 samples and not scanned; a partial scan is reported in ``result.data_scan`` and warned about.
        precision: ``"32-true"`` (default), ``"16-mixed"`` (forward under autocast to float16, loss scaled by a
            ``GradScaler``), ``"bf16-mixed"`` (autocast to bfloat16), ``"16-true"``/``"bf16-true"`` (parameters and
            floating inputs in half precision for the search; your model is cast back). On a simulated GPU mixed
            precision follows CUDA's autocast policies (:mod:`batchfinder.precision`), not the CPU's.

    Returns:
        A :class:`~batchfinder.SearchResult`. Raises :class:`~batchfinder.NoBatchSizeFitsError` when batch size 1
        does not fit, and :class:`~batchfinder.SearchIncompleteError` when a budget ends the search before any size
        fitted.
    """
    options = SearchOptions(
        mode=mode,
        init_batch_size=init_batch_size,
        max_batch_size=max_batch_size,
        safety=safety,
        multiple_of=multiple_of,
        steps_per_trial=steps_per_trial,
        max_trials=max_trials,
        time_budget=time_budget,
        progress=progress,
        target_batch_size=target_batch_size,
        distributed=distributed,
        confirm_steps=confirm_steps,
    )
    options.validate()
    workload = _function_workload(model, dataset, optimizer, loss_fn, step_fn, sample_size, scan_budget, precision)
    return search(workload, resolve_device(device, memory_limit=memory_limit, model=workload.model), options)


def try_batch_size(
    model: nn.Module,
    dataset: Any,
    batch_size: int,
    *,
    optimizer: OptimizerLike = None,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
    device: DeviceLike = None,
    steps_per_trial: int = MIN_STEPS_PER_TRIAL,
    memory_limit: int | str | None = None,
    sample_size: SampleSize | None = None,
    scan_budget: float = DEFAULT_SCAN_BUDGET,
    precision: str = "32-true",
) -> Trial:
    """Run one trial: does ``batch_size`` fit? Same arguments and guarantees as :func:`find_batch_size`.

    ``batch_size`` may not exceed ``len(dataset)``. When sample sizes vary the trial runs on the ``batch_size``
    largest samples (the worst case of every batch of that size); ``trial.data_scan`` says what was scanned.
    Returns the :class:`~batchfinder.Trial`.
    """
    check_positive_int("batch_size", batch_size)
    check_steps_per_trial(steps_per_trial)
    workload = _function_workload(
        model, dataset, optimizer, loss_fn, step_fn, sample_size, scan_budget, precision, defer_fixed_check=False
    )
    if batch_size > workload.source.length:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({workload.source.length} samples): "
            "a trial needs that many real samples"
        )
    backend = resolve_device(device, memory_limit=memory_limit, model=workload.model)
    backend.check_precision(precision)
    session = _session(workload, backend, SearchOptions(steps_per_trial=steps_per_trial))
    with session:
        trial = session.run(batch_size)
    return dataclasses.replace(trial, data_scan=workload.source.scan)
