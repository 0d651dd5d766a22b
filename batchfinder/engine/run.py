"""The one search entry every front end calls: :func:`search`, and :func:`run_trial` for a single trial.

A front end (:func:`~batchfinder.find_batch_size`, the Lightning callback, the Hugging Face front end, the command
line) gathers the user's pieces into a :class:`~batchfinder.engine.workload.Workload` (the model, where batches come
from, how a trial steps) and the search settings into :class:`~batchfinder.engine.options.SearchOptions`, and calls
:func:`search`, which

1. opens the agreement with the other ranks when ``torch.distributed`` runs several
   (:func:`~batchfinder.engine.ranks.agreeing_ranks`; a front end opens it earlier, before it checks its arguments
   and scans the data, and the engine then shares it), so that a failure on one rank anywhere reaches the others,
2. checks the options and the model,
3. opens a :class:`~batchfinder.engine.trial.TrialSession` (which snapshots and later restores the user's state,
   keeps the model resident on the device and checks once that the model takes a batch; for a mode that
   :attr:`~batchfinder.engine.modes.SearchMode.records_on_entry`, that check is the recorded trial), after which
   the ranks agree that every one got this far,
4. runs the training search (and, when asked, a search of a separate evaluation batch size), asking the mode's
   strategy (:mod:`batchfinder.engine.modes`) which size to try next until it, the trial budget or the time budget
   ends the search,
5. confirms the recommended size (:mod:`batchfinder.engine.confirmation`), plans gradient accumulation toward
   ``target_batch_size`` and measures the plan with the gradients kept between micro-batches
   (:mod:`batchfinder.engine.accumulation`), and returns the :class:`~batchfinder.result.SearchResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..devices.base import DeviceBackend
from ..errors import NoBatchSizeFitsError, SearchIncompleteError
from ..report import ProgressPrinter
from ..result import SearchResult, Trial
from ..search.strategies import (
    SearchBounds,
    SearchStrategy,
    StopReason,
    recommend_batch_size,
)
from ..training.batching import TrainingBatches
from ..training.precision import check_precision
from ..training.sample_sizes import FIXED_CHECK_SECONDS
from ..training.validation import check_materialised, check_model
from ..units import format_bytes
from .accumulation import check_accumulation
from .confirmation import confirm
from .distributed import (
    RankAgreement,
    agreeing_ranks,
    check_reducer_untouched,
    ddp_bucket_bytes,
    local_batch_norm,
)
from .modes import SearchContext, mode_named
from .options import SearchOptions, progress_callback
from .error_context import note_search_progress
from .sharded import ShardedTrialSession, is_sharded
from .trial import TrialSession
from .workload import Workload

__all__ = ["search", "run_trial"]

logger = logging.getLogger(__name__)


# -- the one entry point --------------------------------------------------------------------------------------------
def search(workload: Workload, device: DeviceBackend, options: SearchOptions) -> SearchResult:
    """Search the batch size of ``workload`` on ``device``: the entry point every front end calls.

    Returns the training search's :class:`SearchResult` (its :attr:`~SearchResult.evaluation` holds the evaluation
    search when ``workload.search_evaluation``), or, for a workload that does not train, the evaluation search's.
    Raises :class:`~batchfinder.NoBatchSizeFitsError` when batch size 1 does not fit and
    :class:`~batchfinder.SearchIncompleteError` when a budget ends the search before any size fitted. The user's
    state is restored in every case.
    """
    # A failure from here on reaches the other ranks; a warning of the user's code is shown once per call.
    with agreeing_ranks(options.distributed) as agreement, each_warning_once(), gradients_enabled():
        return _search(workload, device, options, agreement)


def _search(
    workload: Workload, device: DeviceBackend, options: SearchOptions, agreement: RankAgreement | None
) -> SearchResult:
    started = time.perf_counter()
    kernels_before = device.kernel_counts()
    options.validate()
    check_model(workload.model)
    check_materialised(workload.model)
    session = _session(workload, device, options)
    training = workload.trains
    source = workload.searched_source
    full = training or workload.inference  # a search of its own data: looks further, confirms
    check_precision(workload.precision)
    device.check_precision(workload.precision)
    context = SearchContext(
        workload.model, source, device, workload.optimizer, workload.step, options.steps_per_trial, workload.precision,
        record=session.record_allocations if training else None,
    )
    if agreement is not None:
        context = dataclasses.replace(context, smallest_over_ranks=agreement.smallest)
    with _open(session, agreement):
        phase = "train" if training else "eval"
        if not training:  # the guided mode models training memory
            searched = _evaluation_options(options, options.init_batch_size)
            if searched.mode != options.mode:
                session.notes.append(f"mode={options.mode!r} predicts training memory: inference sizes were bisected")
            options = searched
        result, strategy = _run(session, context, options, agreement, phase=phase, length=source.length)
        if full and _looked_further(source, time.perf_counter() - started, agreement):
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
            result.evaluation.data_scan = workload.eval_source.scan
        try:
            if full and options.confirm_steps:
                confirm(session, source, result, options, agreement, strategy, phase=phase)
            if training:  # the plan toward target_batch_size (or the user's own accumulation), run as it will run
                check_accumulation(session, result, options, agreement, workload.accumulation_steps)
        except Exception as exc:
            note_search_progress(exc, result.trials)
            raise
    result.data_scan = source.scan
    result.precision = workload.precision
    result.train = training
    result.notes = [*workload.notes, *session.notes]
    result.kernels = device.kernel_notes(kernels_before)
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def each_warning_once() -> Iterator[None]:
    """Show each warning raised in the block once, when it ends (also when it raises): the user's forward pass runs in
    the model check and in every trial, and a warning it raises is one thing to say per call, not one per step. A
    warning is the same when its category, message and place are."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        seen: set[tuple[Any, ...]] = set()
        for warning in caught:
            key = (warning.category, str(warning.message), warning.filename, warning.lineno)
            if key not in seen:
                seen.add(key)
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


@contextlib.contextmanager
def gradients_enabled() -> Iterator[None]:
    """Gradients on for the block, also when the caller is inside ``torch.no_grad()`` or ``torch.inference_mode()``
    (an evaluation block, a notebook cell): trials train, and training needs them. The caller's mode is back after
    the block."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        yield
        return
    logger.info("called under torch.no_grad() or torch.inference_mode(): the trials run with gradients enabled")
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _looked_further(source: TrainingBatches, elapsed: float, agreement: RankAgreement | None) -> bool:
    """The deferred check of fixed-size data (:meth:`~batchfinder.training.batching.BatchSource.look_further`), given a
    quarter of the time the search took (at most ``FIXED_CHECK_SECONDS``): True when a sample of other shapes turned
    up, so that the search must run again on the largest samples."""
    found = bool(source.look_further(min(FIXED_CHECK_SECONDS, elapsed / 4)))
    if agreement is not None and agreement.any(found, "the check for samples of other shapes") and not found:
        source.rescan()  # another rank found one: every rank searches the same largest samples
        found = True
    if found:
        logger.warning(
            "a sample of other shapes than the rest turned up after the search (%s): searching again on the largest "
            "samples", source.scan.describe(),
        )
    return found


def _evaluation_options(options: SearchOptions, init_batch_size: int) -> SearchOptions:
    mode = options.mode if mode_named(options.mode).searches_evaluation else "binsearch"
    if mode != options.mode:
        logger.info("evaluation batch sizes are searched with binsearch (mode %s models training memory)", options.mode)
    return options.replace(mode=mode, init_batch_size=max(init_batch_size, 1))


def _session(workload: Workload, device: DeviceBackend, options: SearchOptions) -> TrialSession:
    """The trial session of ``workload`` on ``device`` (not yet entered)."""
    if workload.ddp is not None:
        check_reducer_untouched(workload.ddp)
    # A real GPU already holds DDP's gradient buckets (the reducer allocates them when the wrapper is built); a
    # simulated one is told, and so is every device for a wrapper not built yet (the one HF's train() will build).
    charge_buckets = workload.ddp is not None and (device.simulated or not getattr(workload.ddp, "holds_buckets", True))
    sharded = is_sharded(workload.model)
    if sharded and mode_named(options.mode).records_on_entry:
        raise ValueError(
            f"mode={options.mode!r} predicts from a recorded trial or a trace of one rank's step, which does not model "
            "a sharded model's step yet: search it with mode='binsearch' (the default) or mode='power'"
        )
    session_class = ShardedTrialSession if sharded else TrialSession
    return session_class(
        workload.model,
        workload.searched_source,
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
        inference=workload.inference,
        eval_steps=options.steps_per_trial if workload.inference else 1,
        record_on_entry=mode_named(options.mode).records_on_entry and workload.trains,
    )


_SETUP = "the search's set-up (snapshot, model on the device, probe)"


@contextlib.contextmanager
def _open(session: TrialSession, agreement: RankAgreement | None) -> Iterator[TrialSession]:
    """Enter ``session`` (snapshot, resident model, probe) for the length of the block, and restore on exit.

    With an ``agreement`` every rank learns here whether every other rank got this far: a rank whose arguments, data
    scan, model or probe failed has reported it instead (:func:`~batchfinder.engine.ranks.agreeing_ranks`), so the
    others raise :class:`~batchfinder.RankFailedError` here rather than wait in the first trial's collective.
    ``SyncBatchNorm`` layers normalise locally while the session is open (their forward is a collective).
    """
    with local_batch_norm(session.model), session:
        if agreement is not None:
            agreement.check(_SETUP)
        yield session


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
    heading = (
        f"searching {'evaluation' if phase == 'eval' else 'training'} batch sizes on {context.device.name} "
        f"(mode {options.mode}):"
    )
    report = progress_callback(options.progress, heading)
    if isinstance(report, ProgressPrinter):
        report.begin(heading)  # also a printer the user passed: each search's trials under their own heading
    started = time.perf_counter()
    cap = options.max_batch_size
    if cap is not None and cap < length:
        bounds = SearchBounds(min(options.init_batch_size, cap), cap, StopReason.MAX_BATCH_SIZE)
    else:
        bounds = SearchBounds(min(options.init_batch_size, length), length, StopReason.DATASET_LENGTH)
    strategy = mode_named(options.mode).strategy(bounds, context)
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
        except Exception as exc:  # (any failure reaches the other ranks through agreeing_ranks, Ctrl-C included)
            note_search_progress(exc, trials, size)
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
            raise _nothing_fits(trials, context.device, optimizer=context.optimizer is not None)
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


def _nothing_fits(trials: list[Trial], device: DeviceBackend, *, optimizer: bool = True) -> NoBatchSizeFitsError:
    smallest = min(trials, key=lambda t: t.batch_size)
    request = smallest.requested_bytes or 0
    needed = max(smallest.peak_reserved_bytes, smallest.peak_bytes) + request  # what the allocator held, and asked
    capacity = device.capacity_bytes
    report = device.memory_report()
    other = re.match(r"rank \d+ ran out of memory", smallest.error or "")
    if other:  # this rank was stopped by another (a sharded trial): say so, then what this rank had reached
        return NoBatchSizeFitsError(
            f"batch size {smallest.batch_size} does not fit on every rank: {other.group(0)}; on this rank "
            f"({device.name}, {format_bytes(capacity)}) the trial had reached "
            f"{format_bytes(max(smallest.peak_reserved_bytes, smallest.peak_bytes))} when it stopped. Use larger GPUs, "
            f"{'an optimizer with less state (SGD), ' if optimizer else ''}mixed precision, more ranks, or a smaller "
            "model.",
            needed_bytes=needed,
            capacity_bytes=capacity,
        )
    return NoBatchSizeFitsError(
        f"batch size {smallest.batch_size} does not fit on {device.name}: the trial needed at least "
        f"{format_bytes(needed)} (it reached {format_bytes(max(smallest.peak_reserved_bytes, smallest.peak_bytes))}, of which "
        f"{format_bytes(smallest.baseline_bytes)} is the model and its existing state, then asked for "
        f"{format_bytes(request)} more) but the device has {format_bytes(capacity)}"
        + (f" ({report})" if report else "")
        + f". Use a larger GPU, {'an optimizer with less state (SGD), ' if optimizer else ''}mixed precision, or a smaller "
        "model.",
        needed_bytes=needed,
        capacity_bytes=capacity,
    )


def run_trial(workload: Workload, device: DeviceBackend, options: SearchOptions, batch_size: int) -> Trial:
    """One trial of ``workload`` at ``batch_size`` on ``device``, in a session of its own (the user's state restored
    afterwards); the trial carries the data scan. ``batch_size`` may not exceed the number of samples."""
    source = workload.searched_source
    if batch_size > source.length:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({source.length} samples): "
            "a trial needs that many real samples"
        )
    check_precision(workload.precision)
    device.check_precision(workload.precision)
    # The ranks of a sharded model try the size together (its trials gather parameters from every rank), and it fits
    # only where it fitted on every rank.
    sharded = is_sharded(workload.model)
    ranks = agreeing_ranks(None) if sharded else contextlib.nullcontext(None)
    with ranks as agreement, each_warning_once(), gradients_enabled():
        with _session(workload, device, options) as session:
            trial = session.run(batch_size, phase="train" if workload.trains else "eval")
        if agreement is not None:
            trial, _ = agreement.agree_trial(trial, f"the trial at batch size {batch_size}")
    return dataclasses.replace(trial, data_scan=source.scan)
