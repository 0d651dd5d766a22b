"""The search engine behind every front end: :func:`find_batch_size` and :func:`try_batch_size`.

>>> import torch, batchfinder as bf
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
>>> data = torch.utils.data.TensorDataset(torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,)))
>>> result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"))   # doctest: +SKIP
>>> result.max_batch_size, result.batch_size, result.stop_reason                  # doctest: +SKIP

The engine validates every argument before touching anything, opens a :class:`~batchfinder.trial.TrialSession`
(which snapshots and later restores the user's state), and asks a search strategy which batch size to try next
until the strategy, the trial budget or the time budget ends the search.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .accumulation import plan_accumulation, validate_target_batch_size
from .batching import BatchSource
from .devices import DeviceBackend, DeviceLike, resolve_device
from .distributed import RankAgreement, ddp_bucket_bytes, local_batch_norm, resolve_agreement, unwrap_ddp
from .errors import NoBatchSizeFitsError, SearchIncompleteError
from .optimizers import OptimizerLike, resolve_optimizer
from .report import ProgressPrinter, trial_table
from .search import BisectingSearch, SearchBounds, SearchStrategy, StopReason
from .steps import LossFn, StepFn, make_step
from .trial import Trial, TrialSession
from .validation import MIN_STEPS_PER_TRIAL, check_model, check_positive_int, check_steps_per_trial
from .units import format_bytes

__all__ = [
    "SearchResult",
    "find_batch_size",
    "try_batch_size",
    "recommend_batch_size",
    "STRATEGIES",
    "open_session",
    "run_search",
]

logger = logging.getLogger("batchfinder")

ProgressLike = bool | Callable[[Trial], None] | None

StrategyFactory = Callable[[SearchBounds, "SearchContext"], SearchStrategy]


@dataclass(frozen=True)
class SearchContext:
    """What a strategy factory may use besides the bounds (model, data, device, how a trial steps)."""

    model: nn.Module
    source: BatchSource
    device: DeviceBackend
    optimizer: Any
    step: StepFn
    steps_per_trial: int = MIN_STEPS_PER_TRIAL


STRATEGIES: dict[str, StrategyFactory] = {
    "binsearch": lambda bounds, _context: BisectingSearch(bounds, "binsearch"),
    "power": lambda bounds, _context: BisectingSearch(bounds, "power"),
}
"""Search modes by name; other modules register more (e.g. ``"guided"``)."""


def recommend_batch_size(max_batch_size: int, safety: float = 0.8, multiple_of: int = 1) -> int:
    """``floor(safety * max_batch_size)`` rounded down to a multiple of ``multiple_of``, at least 1."""
    scaled = math.floor(safety * max_batch_size + 1e-9)
    return max(scaled // multiple_of * multiple_of, 1)


@dataclass
class SearchResult:
    """What a search found, how, and why it stopped."""

    max_batch_size: int
    """Largest batch size whose trial ran without running out of memory."""
    batch_size: int
    """Recommended batch size: ``floor(safety * max_batch_size)``, rounded down to ``multiple_of``, at least 1."""
    trials: list[Trial]
    """Every trial, in the order it ran."""
    stop_reason: StopReason
    safety: float = 0.8
    multiple_of: int = 1
    mode: str = "binsearch"
    device: str = ""
    capacity_bytes: int | None = None
    seconds: float = 0.0
    """Wall time of the whole search."""
    smallest_failure: int | None = None
    """Smallest batch size that ran out of memory (None when none did)."""
    extra: dict[str, Any] = field(default_factory=dict)
    target_batch_size: int | None = None
    """The effective batch size asked for with ``target_batch_size`` (None when none was)."""
    micro_batch_size: int | None = None
    """Batch size of each forward/backward pass: ``batch_size``, or with a target the planned micro-batch (<= it)."""
    accumulation_steps: int = 1
    """Micro-batches to accumulate per optimizer step (Lightning's ``accumulate_grad_batches``)."""
    world_size: int = 1
    """Ranks that ran every trial and agreed on each outcome (1 without ``torch.distributed``)."""
    eval_max_batch_size: int | None = None
    """Largest evaluation batch size that fitted, when an evaluation batch size was searched as well."""
    eval_batch_size: int | None = None
    """Recommended evaluation batch size (``floor(safety * eval_max_batch_size)``), when searched."""
    eval_trials: list[Trial] = field(default_factory=list)
    """The evaluation-only trials of that search."""

    def __post_init__(self) -> None:
        if self.micro_batch_size is None:
            self.micro_batch_size = self.batch_size

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step over all ranks: ``micro_batch_size * accumulation_steps * world_size``."""
        return (self.micro_batch_size or self.batch_size) * self.accumulation_steps * self.world_size

    @property
    def accumulate_grad_batches(self) -> int:
        """Same as :attr:`accumulation_steps`, under Lightning's name."""
        return self.accumulation_steps

    @property
    def num_trials(self) -> int:
        return len(self.trials)

    @property
    def num_steps(self) -> int:
        """Training steps executed across all trials."""
        return sum(t.steps for t in self.trials)

    @property
    def num_ooms(self) -> int:
        """Trials that ran out of memory."""
        return sum(not t.fits for t in self.trials)

    def trial_for(self, batch_size: int) -> Trial | None:
        """The (last) trial at ``batch_size``, if one ran."""
        for trial in reversed(self.trials):
            if trial.batch_size == batch_size:
                return trial
        return None

    def explain(self) -> str:
        """The recommendation's arithmetic, e.g. ``largest that fits: 14076; x0.8 = 11260``."""
        scaled = math.floor(self.safety * self.max_batch_size + 1e-9)
        text = f"largest that fits: {self.max_batch_size}; x{self.safety:g} = {scaled}"
        if self.multiple_of > 1:
            text += f"; rounded down to a multiple of {self.multiple_of} = {self.batch_size}"
        elif scaled != self.batch_size:
            text += f"; at least 1 = {self.batch_size}"
        return text

    def why_stopped(self) -> str:
        """Why the search ended, with the smallest size that ran out of memory when there is one."""
        text = f"stopped: {self.stop_reason.value}"
        if self.smallest_failure is not None:
            text += f"; smallest that ran out of memory: {self.smallest_failure}"
        return text

    def table(self) -> str:
        """The trial table as text."""
        return trial_table(self.trials)

    def plot(self, path: Any) -> Any:
        """Write a PNG of the search to ``path``: each trial's peak against batch size (out-of-memory trials
        marked), the predicted curve when the search had one, the capacity, the largest and the recommended size.
        Needs matplotlib (``pip install batchfinder[plot]``); see :func:`batchfinder.plot.plot_search`."""
        from .plot import plot_search

        return plot_search(self, path)

    def __str__(self) -> str:
        capacity = f", capacity {format_bytes(self.capacity_bytes)}" if self.capacity_bytes else ""
        return (
            f"batch size search on {self.device}{capacity}, mode {self.mode}: {self.num_trials} trials, "
            f"{self.num_steps} steps, {self.num_ooms} out of memory, {self.seconds:.1f} s\n"
            f"{self.table()}\n"
            f"recommended batch size: {self.batch_size}\n"
            f"  {self.explain()}\n"
            f"  {self.why_stopped()}"
        ) + self._extras()

    def _extras(self) -> str:
        lines = []
        if self.world_size > 1:
            lines.append(f"  agreed by {self.world_size} ranks: a size fits only if it fitted on every rank")
        if self.target_batch_size is not None:
            waste = self.effective_batch_size - self.target_batch_size
            lines.append(
                f"gradient accumulation for target batch size {self.target_batch_size}: micro-batch "
                f"{self.micro_batch_size} x {self.accumulation_steps}"
                + (f" x {self.world_size} ranks" if self.world_size > 1 else "")
                + f" = {self.effective_batch_size}"
                + (f" ({waste} over the target)" if waste else "")
            )
        if self.eval_max_batch_size is not None:
            lines.append(
                f"evaluation batch size: {self.eval_batch_size} (largest that fits: {self.eval_max_batch_size}, "
                f"{len(self.eval_trials)} evaluation trials)"
            )
        return "".join("\n" + line for line in lines)


# -- validation -------------------------------------------------------------------------------------------------------
def _validate_search(
    mode: Any, init_batch_size: Any, max_batch_size: Any, safety: Any, multiple_of: Any, max_trials: Any, time_budget: Any
) -> None:
    if mode not in STRATEGIES:
        raise ValueError(f"mode={mode!r} is not a search mode; choose one of {sorted(STRATEGIES)}")
    check_positive_int("init_batch_size", init_batch_size)
    check_positive_int("max_batch_size", max_batch_size, allow_none=True)
    if max_batch_size is not None and init_batch_size > max_batch_size:
        raise ValueError(f"init_batch_size={init_batch_size} is larger than max_batch_size={max_batch_size}")
    if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not 0 < safety <= 1:
        raise ValueError(f"safety={safety!r} must be a number in (0, 1], e.g. 0.8 to keep 20% headroom")
    check_positive_int("multiple_of", multiple_of)
    check_positive_int("max_trials", max_trials, allow_none=True)
    if time_budget is not None and (
        isinstance(time_budget, bool) or not isinstance(time_budget, (int, float)) or time_budget <= 0
    ):
        raise ValueError(f"time_budget={time_budget!r} must be a positive number of seconds (or None)")


def _progress_callback(progress: ProgressLike) -> Callable[[Trial], None] | None:
    if progress is None or progress is False:
        return None
    if progress is True:
        return ProgressPrinter()
    if callable(progress):
        return progress
    raise TypeError(f"progress must be a bool or a callable taking a Trial, not {type(progress).__name__}")


def _open_session(
    model: nn.Module,
    dataset: Any,
    optimizer: OptimizerLike,
    loss_fn: LossFn | None,
    step_fn: StepFn | None,
    device: DeviceLike,
    steps_per_trial: int,
    memory_limit: int | str | None,
) -> tuple[TrialSession, SearchContext]:
    model, ddp = unwrap_ddp(model)  # trials run on the unwrapped module: DDP's collectives could hang on an OOM
    check_model(model)
    check_steps_per_trial(steps_per_trial)
    step = make_step(loss_fn, step_fn)
    spec = resolve_optimizer(optimizer, model)
    backend = resolve_device(device, memory_limit=memory_limit)
    source = BatchSource(dataset)
    # A real GPU already holds DDP's gradient buckets (allocated when the wrapper was built); elsewhere charge them.
    reserved = ddp_bucket_bytes(ddp) if ddp is not None and backend.torch_device.type != "cuda" else []
    session = TrialSession(model, source, step, spec, backend, steps_per_trial=steps_per_trial, reserved_bytes=reserved)
    return session, SearchContext(model, source, backend, spec, step, steps_per_trial)


@contextlib.contextmanager
def open_session(session: TrialSession, agreement: RankAgreement | None = None) -> Iterator[TrialSession]:
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
                agreement.check(False, "the search's set-up (snapshot, model on the device, probe)")
            raise
        try:
            if agreement is not None:
                agreement.check(True, "the search's set-up (snapshot, model on the device, probe)")
            yield session
        finally:
            session.__exit__(None, None, None)


_BUDGET_STOPS = (StopReason.MAX_TRIALS, StopReason.TIME_BUDGET)


def run_search(
    session: TrialSession,
    context: SearchContext,
    *,
    mode: str = "binsearch",
    init_batch_size: int = 16,
    max_batch_size: int | None = None,
    safety: float = 0.8,
    multiple_of: int = 1,
    max_trials: int | None = None,
    time_budget: float | None = None,
    progress: ProgressLike = False,
    target_batch_size: int | None = None,
    agreement: RankAgreement | None = None,
    phase: str = "train",
    length: int | None = None,
    started: float | None = None,
) -> SearchResult:
    """The search loop every front end shares, on a session that is already open (see :func:`open_session`).

    Arguments as for :func:`find_batch_size` (validated by the caller). ``phase="eval"`` searches an evaluation
    batch size with evaluation-only trials (``session.run(size, phase="eval")``) up to ``length`` (default: the
    training data's length). With an ``agreement`` every rank runs each trial at the same size and a trial fits
    only if it fitted on every rank.
    """
    report = _progress_callback(progress)
    started = time.perf_counter() if started is None else started
    length = context.source.length if length is None else length
    if max_batch_size is not None and max_batch_size < length:
        bounds = SearchBounds(min(init_batch_size, max_batch_size), max_batch_size, StopReason.MAX_BATCH_SIZE)
    else:
        bounds = SearchBounds(min(init_batch_size, length), length, StopReason.DATASET_LENGTH)
    if phase == "eval" and mode not in ("binsearch", "power"):
        logger.info("evaluation batch sizes are searched with binsearch (mode %s models training memory)", mode)
        mode = "binsearch"
    strategy = STRATEGIES[mode](bounds, context)
    trials: list[Trial] = []
    logger.info(
        "searching %s batch sizes on %s (mode %s, up to %d%s)",
        "evaluation" if phase == "eval" else "training",
        context.device.name,
        mode,
        bounds.cap,
        f", {agreement.world_size} ranks agreeing" if agreement is not None else "",
    )
    while True:
        size = strategy.propose()
        stop: StopReason | None = None
        if size is not None:
            if max_trials is not None and len(trials) >= max_trials:
                stop = StopReason.MAX_TRIALS
            elif time_budget is not None and trials and time.perf_counter() - started >= time_budget:
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
        peak = trial.peak_bytes
        if agreement is not None:
            trial, peak = agreement.agree_trial(trial, f"the trial at batch size {size}")
        trials.append(trial)
        strategy.record(size, trial.fits, peak)
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
    stop_reason = strategy.stop_reason or StopReason.BRACKET_CLOSED
    batch_size = recommend_batch_size(strategy.largest_fit, safety, multiple_of)
    world_size = agreement.world_size if agreement is not None else 1
    plan = (
        plan_accumulation(math.ceil(target_batch_size / world_size), batch_size, multiple_of)
        if target_batch_size is not None
        else None
    )
    return SearchResult(
        max_batch_size=strategy.largest_fit,
        batch_size=batch_size,
        trials=trials,
        stop_reason=stop_reason,
        safety=float(safety),
        multiple_of=multiple_of,
        mode=mode,
        device=context.device.name,
        capacity_bytes=context.device.capacity_bytes,
        seconds=time.perf_counter() - started,
        smallest_failure=strategy.smallest_failure,
        target_batch_size=target_batch_size,
        micro_batch_size=plan.micro_batch_size if plan is not None else batch_size,
        accumulation_steps=plan.accumulation_steps if plan is not None else 1,
        world_size=world_size,
        extra=dict(getattr(strategy, "extra", None) or {}),  # e.g. the guided strategy's predicted peaks
    )


def _nothing_fits(trials: list[Trial], device: DeviceBackend) -> NoBatchSizeFitsError:
    smallest = min(trials, key=lambda t: t.batch_size)
    request = smallest.requested_bytes or 0
    needed = smallest.peak_bytes + request
    capacity = device.capacity_bytes
    return NoBatchSizeFitsError(
        f"batch size {smallest.batch_size} does not fit on {device.name}: the trial needed at least "
        f"{format_bytes(needed)} (it reached {format_bytes(smallest.peak_bytes)}, of which "
        f"{format_bytes(smallest.baseline_bytes)} is the model and its existing state, then asked for "
        f"{format_bytes(request)} more) but the device has {format_bytes(capacity)}. Use a larger GPU, "
        "an optimizer with less state (SGD), mixed precision, or a smaller model.",
        needed_bytes=needed,
        capacity_bytes=capacity,
    )


# -- public functions -------------------------------------------------------------------------------------------
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
) -> SearchResult:
    """Find the largest batch size ``model`` can train with on ``device`` by running real training steps.

    Args:
        model: any ``nn.Module``; its weights, buffers, gradients, train/eval mode, the optimizer's state and the
            RNG states are exactly as before when this returns, raises or is interrupted.
        dataset: a map-style ``Dataset`` or a ``DataLoader``; samples are tensors, ``(input, target, ...)`` tuples or
            dicts of tensors (passed as ``model(**batch)``). Batch sizes never exceed ``len(dataset)``.
        optimizer: an optimizer class, a callable ``params -> optimizer``, or an optimizer bound to the model (its
            state is then part of the memory and is preserved). Default: Adam, which holds two states per parameter.
        loss_fn: ``loss_fn(output, target) -> loss`` instead of the default (cross-entropy / MSE / mean).
        step_fn: ``step_fn(model, batch) -> loss`` for full control of the forward pass (AMP, several inputs).
        device: ``"cuda"``, ``"cuda:N"``, a ``torch.device``, a :class:`~batchfinder.SimulatedGPU`, or
            ``"sim:16GiB"``. Default: the current CUDA GPU.
        mode: ``"binsearch"`` (double, then bisect to a resolution of 1) or ``"power"`` (last doubling that fits).
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
            ``micro_batch_size * accumulation_steps >= target_batch_size`` and the least waste
            (see :mod:`batchfinder.accumulation`). With several agreeing ranks the target is the global batch: each
            rank's micro-batches add up to ``ceil(target_batch_size / world_size)``.
        distributed: ``None`` (default): when ``torch.distributed`` is initialised with several ranks, every rank
            must call this; they run each trial at the same size and a size fits only if it fitted on every rank, so
            all ranks return the same result (see :mod:`batchfinder.distributed`). ``False``: this rank searches on
            its own. ``True``: require ``torch.distributed``. A ``DistributedDataParallel`` model is searched through
            its unwrapped module (no collective runs inside a trial) with its gradient buckets charged; sharded
            models (FSDP, DeepSpeed) are refused.

    Returns:
        A :class:`SearchResult`. Raises :class:`~batchfinder.NoBatchSizeFitsError` when batch size 1 does not fit,
        and :class:`~batchfinder.SearchIncompleteError` when a budget ends the search before any size fitted.
    """
    _validate_search(mode, init_batch_size, max_batch_size, safety, multiple_of, max_trials, time_budget)
    validate_target_batch_size(target_batch_size)
    _progress_callback(progress)
    agreement = resolve_agreement(distributed)
    session, context = _open_session(model, dataset, optimizer, loss_fn, step_fn, device, steps_per_trial, memory_limit)
    started = time.perf_counter()
    with open_session(session, agreement):
        return run_search(
            session,
            context,
            mode=mode,
            init_batch_size=init_batch_size,
            max_batch_size=max_batch_size,
            safety=safety,
            multiple_of=multiple_of,
            max_trials=max_trials,
            time_budget=time_budget,
            progress=progress,
            target_batch_size=target_batch_size,
            agreement=agreement,
            started=started,
        )


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
) -> Trial:
    """Run one trial: does ``batch_size`` fit? Same arguments and guarantees as :func:`find_batch_size`.

    ``batch_size`` may not exceed ``len(dataset)``. Returns the :class:`~batchfinder.trial.Trial`.
    """
    check_positive_int("batch_size", batch_size)
    session, context = _open_session(model, dataset, optimizer, loss_fn, step_fn, device, steps_per_trial, memory_limit)
    if batch_size > context.source.length:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({context.source.length} samples): "
            "a trial needs that many real samples"
        )
    with session:
        return session.run(batch_size)
