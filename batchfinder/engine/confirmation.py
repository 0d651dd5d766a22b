"""The confirmation run: after a search, training steps at the recommended batch size with the allocator's cache
kept, the recommendation lowered by the safety factor again while they run out of memory.

On a real GPU (and on the simulated one) a smaller size does not always fit when a larger one did: memory that the
steps leave cached and fragmented, and for data whose samples vary in size, batches in the loader's order, show
only over several steps. :func:`confirm` runs them and records the outcome in the search result.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ..errors import SearchIncompleteError
from ..result import SearchResult, Trial
from ..search.checks import MIN_STEPS_PER_TRIAL
from ..search.strategies import SearchStrategy, recommend_batch_size
from ..training.batching import TrainingBatches
from .distributed import RankAgreement
from .trial import TrialSession

__all__ = ["confirm"]

logger = logging.getLogger(__name__)


class ConfirmationOptions(Protocol):
    """The search options a confirmation reads (:class:`~batchfinder.engine.options.SearchOptions` has them)."""

    confirm_steps: int
    steps_per_trial: int
    safety: float
    multiple_of: int


_CONFIRMATION_ATTEMPTS = 3


def _confirmation_batches(source: TrainingBatches, batch_size: int, steps: int) -> list[Any] | None:
    """For data whose sample sizes vary: the first ``steps`` batches in the order the user's loader yields them,
    then the worst-case batch (the largest samples), one per step. None for fixed-size data (every batch is alike:
    the confirmation repeats one)."""
    if not source.varies:
        return None
    return [*source.loader_batches(batch_size, steps), source.batch(batch_size)]


def confirm(
    session: TrialSession,
    source: TrainingBatches,
    result: SearchResult,
    options: ConfirmationOptions,
    agreement: RankAgreement | None,
    strategy: SearchStrategy,
    *,
    phase: str = "train",
) -> None:
    """Run ``options.confirm_steps`` steps at the recommended size in one trial, the allocator's cache kept between
    them, so that memory the steps leave cached and fragmented shows (for variable-size data: batches in the
    loader's order, then the worst-case batch); when it runs out of memory, lower the recommendation by the safety
    factor again and confirm that (up to three times), saying so in the result.

    After ``mode="guided"`` confirmed its prediction to the byte on the simulated GPU (stop reason ``"prediction
    confirmed"``), a confirmation of fixed-size data with as many steps as a trial is the recorded trial replayed at
    the recommended size: the same figures as running it, without the steps. ``phase="eval"`` confirms an inference
    search the same way, with inference steps."""
    size = result.batch_size
    steps = max(options.confirm_steps, MIN_STEPS_PER_TRIAL)
    replays = phase == "train" and not source.varies and steps == options.steps_per_trial
    for _ in range(_CONFIRMATION_ATTEMPTS):
        trial = _replayed_trial(strategy, size, steps, result) if replays else None
        if trial is None:
            # Built inside the trial: running out of memory while collating them is running out of memory at this size.
            batches = (lambda: _confirmation_batches(source, size, options.confirm_steps)) if source.varies else None
            trial = session.run(size, phase=phase, steps=steps, host_batches=batches)
            del batches
        if agreement is not None:
            trial, _peak = agreement.agree_trial(trial, f"the confirmation at batch size {size}")
        result.confirmations.append(trial)
        if trial.fits:
            if size != result.batch_size:
                result.micro_batch_size = size  # (the engine plans accumulation again from the lowered size)
                logger.warning(
                    "batch size %d ran out of memory when confirmed (%s); recommending %d",
                    result.batch_size, result.confirmations[0].error, size,
                )
                result.batch_size = size
            return
        smaller = recommend_batch_size(size, options.safety, options.multiple_of)
        if smaller >= size:
            break
        size = smaller
    raise SearchIncompleteError(
        f"the recommended batch size {result.batch_size} and {len(result.confirmations) - 1} smaller one(s) ran out of "
        f"memory when confirmed over {options.confirm_steps} steps: memory grows from step to step (a leak, or "
        "fragmentation); look at the trial table and the confirmations"
    )


def _replayed_trial(strategy: SearchStrategy, size: int, steps: int, result: SearchResult) -> Trial | None:
    """The trial at ``size`` as the strategy's confirmed prediction replays it (None where it cannot: a strategy that
    does not predict, or a prediction that was not confirmed)."""
    outcome = strategy.replay_trial(size)
    if outcome is None:
        return None
    fits, peak, peak_reserved, phase = outcome
    return Trial(
        batch_size=size,
        fits=fits,
        peak_bytes=peak,
        seconds_per_step=None,
        steps=steps if fits else 0,
        baseline_bytes=result.trials[0].baseline_bytes if result.trials else 0,
        error=None if fits else f"out of memory in the replay, in the {phase}",
        peak_reserved_bytes=peak_reserved,
        replayed=True,
    )
