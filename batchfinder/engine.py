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

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .batching import BatchSource
from .devices import DeviceBackend, DeviceLike, resolve_device
from .errors import NoBatchSizeFitsError, SearchIncompleteError
from .optimizers import OptimizerLike, resolve_optimizer
from .report import ProgressPrinter, trial_table
from .search import BisectingSearch, SearchBounds, SearchStrategy, StopReason
from .steps import LossFn, StepFn, make_step
from .trial import MIN_STEPS_PER_TRIAL, Trial, TrialSession
from .units import format_bytes

__all__ = ["SearchResult", "find_batch_size", "try_batch_size", "recommend_batch_size", "STRATEGIES"]

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
        """The recommendation with its reasoning, e.g. ``largest that fits: 14076; x0.8 = 11260``."""
        scaled = math.floor(self.safety * self.max_batch_size + 1e-9)
        text = f"largest that fits: {self.max_batch_size}; x{self.safety:g} = {scaled}"
        if self.multiple_of > 1:
            text += f"; rounded down to a multiple of {self.multiple_of} = {self.batch_size}"
        elif scaled != self.batch_size:
            text += f"; at least 1 = {self.batch_size}"
        text += f" (stopped: {self.stop_reason.value}"
        if self.smallest_failure is not None:
            text += f"; smallest that ran out of memory: {self.smallest_failure}"
        return text + ")"

    def table(self) -> str:
        """The trial table as text."""
        return trial_table(self.trials)

    def __str__(self) -> str:
        capacity = f", capacity {format_bytes(self.capacity_bytes)}" if self.capacity_bytes else ""
        return (
            f"batch size search on {self.device}{capacity}, mode {self.mode}: {self.num_trials} trials, "
            f"{self.num_steps} steps, {self.num_ooms} out of memory, {self.seconds:.1f} s\n"
            f"{self.table()}\n"
            f"recommended batch size: {self.batch_size} ({self.explain()})"
        )


# -- validation -------------------------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1")


def _validate_common(model: Any, steps_per_trial: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    from torch.nn.parameter import UninitializedParameter

    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        raise ValueError("the model has uninitialised (lazy) parameters: run one forward pass before the search")
    _positive_int("steps_per_trial", steps_per_trial)
    if steps_per_trial < MIN_STEPS_PER_TRIAL:
        raise ValueError(
            f"steps_per_trial={steps_per_trial} must be at least {MIN_STEPS_PER_TRIAL}: optimizers such as Adam "
            "allocate their state at the first step, so one step under-measures memory"
        )


def _validate_search(
    mode: Any, init_batch_size: Any, max_batch_size: Any, safety: Any, multiple_of: Any, max_trials: Any, time_budget: Any
) -> None:
    if mode not in STRATEGIES:
        raise ValueError(f"mode={mode!r} is not a search mode; choose one of {sorted(STRATEGIES)}")
    _positive_int("init_batch_size", init_batch_size)
    _positive_int("max_batch_size", max_batch_size, allow_none=True)
    if max_batch_size is not None and init_batch_size > max_batch_size:
        raise ValueError(f"init_batch_size={init_batch_size} is larger than max_batch_size={max_batch_size}")
    if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not 0 < safety <= 1:
        raise ValueError(f"safety={safety!r} must be a number in (0, 1], e.g. 0.8 to keep 20% headroom")
    _positive_int("multiple_of", multiple_of)
    _positive_int("max_trials", max_trials, allow_none=True)
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
    _validate_common(model, steps_per_trial)
    step = make_step(loss_fn, step_fn)
    spec = resolve_optimizer(optimizer, model)
    backend = resolve_device(device, memory_limit=memory_limit)
    source = BatchSource(dataset)
    session = TrialSession(model, source, step, spec, backend, steps_per_trial=steps_per_trial)
    return session, SearchContext(model, source, backend, spec, step)


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
        time_budget: stop starting new trials after this many seconds.
        progress: True to print a line per trial to standard error, or a callable receiving each ``Trial``.
        memory_limit: on CUDA, make the GPU behave like one with this much memory (e.g. ``"16GiB"``).

    Returns:
        A :class:`SearchResult`. Raises :class:`~batchfinder.NoBatchSizeFitsError` when batch size 1 does not fit,
        and :class:`~batchfinder.SearchIncompleteError` when a budget ends the search before any size fitted.
    """
    _validate_search(mode, init_batch_size, max_batch_size, safety, multiple_of, max_trials, time_budget)
    report = _progress_callback(progress)
    session, context = _open_session(model, dataset, optimizer, loss_fn, step_fn, device, steps_per_trial, memory_limit)
    length = context.source.length
    if max_batch_size is not None and max_batch_size < length:
        bounds = SearchBounds(min(init_batch_size, max_batch_size), max_batch_size, StopReason.MAX_BATCH_SIZE)
    else:
        bounds = SearchBounds(min(init_batch_size, length), length, StopReason.DATASET_LENGTH)
    strategy = STRATEGIES[mode](bounds, context)
    started = time.perf_counter()
    trials: list[Trial] = []
    logger.info("searching batch sizes on %s (mode %s, up to %d)", context.device.name, mode, bounds.cap)
    with session:
        while True:
            size = strategy.propose()
            if size is None:
                break
            if max_trials is not None and len(trials) >= max_trials:
                strategy.stop(StopReason.MAX_TRIALS)
                break
            if time_budget is not None and time.perf_counter() - started >= time_budget:
                strategy.stop(StopReason.TIME_BUDGET)
                break
            trial = session.run(size)
            trials.append(trial)
            strategy.record(size, trial.fits, trial.peak_bytes)
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
    return SearchResult(
        max_batch_size=strategy.largest_fit,
        batch_size=recommend_batch_size(strategy.largest_fit, safety, multiple_of),
        trials=trials,
        stop_reason=stop_reason,
        safety=float(safety),
        multiple_of=multiple_of,
        mode=mode,
        device=context.device.name,
        capacity_bytes=context.device.capacity_bytes,
        seconds=time.perf_counter() - started,
        smallest_failure=strategy.smallest_failure,
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
    _positive_int("batch_size", batch_size)
    session, context = _open_session(model, dataset, optimizer, loss_fn, step_fn, device, steps_per_trial, memory_limit)
    if batch_size > context.source.length:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({context.source.length} samples): "
            "a trial needs that many real samples"
        )
    with session:
        return session.run(batch_size)
