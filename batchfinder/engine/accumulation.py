"""Gradient accumulation measured as it will run: the plan toward ``target_batch_size`` (or the accumulation the
user's training already uses) is tried with real accumulation, and lowered until it fits.

A trial of the search zeroes the gradients after every step, so it never measures what accumulation adds: the
second micro-batch's forward pass runs while the first one's gradients are still held, and its backward pass adds
into them. For a model with a large dense gradient (an embedding table) that can be the difference between fitting
and not: the recommended size fits on its own and its second micro-batch runs out of memory.

:func:`check_accumulation` plans (:func:`~batchfinder.search.accumulation.plan_accumulation`), then runs the plan's
micro-batch size with the gradients kept between micro-batches, followed by the optimizer step and
``zero_grad``: with ``confirm_steps`` the whole plan (every micro-batch of ``confirm_steps`` optimizer steps, the
allocator's cache kept), otherwise ``steps_per_trial`` optimizer steps of two micro-batches (from the second
micro-batch on, each holds the same). A plan that runs out of memory is planned again with a micro-batch lowered by
the safety factor, until one fits.

Trials run on the model without its ``DistributedDataParallel`` wrapper, so the gradients accumulate in each
parameter's ``.grad`` as they do under DDP's ``no_sync()`` (which a training loop uses for every micro-batch but
the last), while the wrapper's gradient buckets stay charged for the whole session
(:mod:`batchfinder.engine.distributed`).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

from ..errors import SearchIncompleteError
from ..result import SearchResult, Trial
from ..search.accumulation import AccumulationPlan, plan_accumulation
from ..search.checks import MIN_STEPS_PER_TRIAL
from ..search.strategies import recommend_batch_size
from ..units import format_bytes
from .distributed import RankAgreement
from .trial import TrialSession

__all__ = ["check_accumulation", "MEASURED_MICRO_BATCHES"]

logger = logging.getLogger(__name__)

MEASURED_MICRO_BATCHES = 2
"""Micro-batches per optimizer step in a check without ``confirm_steps``: the second one is the first to run with
the gradients held, and every later one holds the same."""


class AccumulationOptions(Protocol):
    """The search options the check reads (:class:`~batchfinder.engine.options.SearchOptions` has them)."""

    target_batch_size: int | None
    confirm_steps: int
    steps_per_trial: int
    safety: float
    multiple_of: int


def _plan(options: AccumulationOptions, micro_cap: int, world_size: int, fixed_steps: int) -> AccumulationPlan:
    """The plan with micro-batches of at most ``micro_cap``: toward the target per rank, or ``fixed_steps``
    micro-batches of ``micro_cap`` when there is no target."""
    if options.target_batch_size is None:
        return AccumulationPlan(micro_cap * fixed_steps, micro_cap, fixed_steps)
    return plan_accumulation(math.ceil(options.target_batch_size / world_size), micro_cap, options.multiple_of)


def check_accumulation(
    session: TrialSession,
    result: SearchResult,
    options: AccumulationOptions,
    agreement: RankAgreement | None,
    accumulation_steps: int = 1,
) -> None:
    """Plan gradient accumulation and measure it, recording the plan in ``result``.

    With ``options.target_batch_size``, the plan reaches it with micro-batches of at most the recommended size;
    without it, ``accumulation_steps`` (the accumulation the user's training already runs with) micro-batches of the
    recommended size. A plan of one micro-batch needs no trial (the search and the confirmation measured it). A plan
    of several is tried with the gradients kept between micro-batches (see the module documentation) and, while it
    runs out of memory, planned again with the micro-batch lowered by the safety factor; without a target the
    recommendation (``result.batch_size``) is lowered with it. Raises
    :class:`~batchfinder.SearchIncompleteError` when even micro-batches of 1 run out of memory.
    """
    plan = _plan(options, result.batch_size, result.world_size, accumulation_steps)
    failures: list[Trial] = []
    while plan.accumulation_steps > 1:
        trial = _measure(session, plan, options)
        if agreement is not None:
            trial, _peak = agreement.agree_trial(trial, f"the accumulation check at micro-batch {plan.micro_batch_size}")
        result.accumulation_trials.append(trial)
        if trial.fits:
            break
        failures.append(trial)
        lower = recommend_batch_size(plan.micro_batch_size, options.safety, options.multiple_of)
        if lower >= plan.micro_batch_size:
            lower = plan.micro_batch_size - 1
        if lower < 1:
            raise SearchIncompleteError(
                f"gradient accumulation runs out of memory even with micro-batches of {plan.micro_batch_size} "
                f"({trial.error}): the gradients held between micro-batches leave no room for a batch. Use a larger "
                "GPU, mixed precision, or an optimizer with less state"
            )
        plan = _plan(options, lower, result.world_size, accumulation_steps)
    if failures:
        first = failures[0]
        request = f", asking for {format_bytes(first.requested_bytes)} more" if first.requested_bytes else ""
        note = (
            f"micro-batch {first.batch_size} ran out of memory with gradient accumulation (the earlier micro-batches' "
            f"gradients held while the next one runs{request}), so micro-batch {plan.micro_batch_size} x "
            f"{plan.accumulation_steps}"
        )
        logger.warning("%s", note)
        session.notes.append(note)
    if options.target_batch_size is not None:
        result.target_batch_size = options.target_batch_size
    elif plan.micro_batch_size < result.batch_size:
        result.batch_size = plan.micro_batch_size  # the user's own accumulation: the size to train with is lower
    result.micro_batch_size = plan.micro_batch_size
    result.accumulation_steps = plan.accumulation_steps


def _measure(session: TrialSession, plan: AccumulationPlan, options: AccumulationOptions) -> Trial:
    """One trial of ``plan``: the whole plan over ``confirm_steps`` optimizer steps when confirming, otherwise two
    micro-batches per step over ``steps_per_trial`` steps."""
    if options.confirm_steps:
        steps = max(options.confirm_steps, MIN_STEPS_PER_TRIAL)
        micro_batches = plan.accumulation_steps
    else:
        steps = options.steps_per_trial
        micro_batches = min(plan.accumulation_steps, MEASURED_MICRO_BATCHES)
    logger.info(
        "trying gradient accumulation: %d optimizer steps of %d micro-batches of %d, gradients kept between them",
        steps, micro_batches, plan.micro_batch_size,
    )
    return session.run(plan.micro_batch_size, steps=steps, accumulation=micro_batches)
