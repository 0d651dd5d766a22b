"""Gradient accumulation planning: the largest safe micro-batch, repeated to reach a target batch size.

Pure arithmetic, no torch: given the safe batch size a search recommended and the effective batch size the user
wants (``target_batch_size``, e.g. the batch size a learning rate was tuned for), choose a micro-batch size and a
number of accumulation steps such that

* the micro-batch is never larger than the safe size (so it fits, with the search's headroom),
* ``micro_batch_size * accumulation_steps >= target_batch_size`` (the target is reached), and
* the *waste* ``micro_batch_size * accumulation_steps - target_batch_size`` is as small as possible.

>>> plan_accumulation(100, 48)
AccumulationPlan(target_batch_size=100, micro_batch_size=25, accumulation_steps=4)
>>> plan_accumulation(97, 48).effective_batch_size
99
>>> plan_accumulation(64, 80)                          # the target itself fits: no accumulation
AccumulationPlan(target_batch_size=64, micro_batch_size=64, accumulation_steps=1)

Waste could always be driven to zero with micro-batches of 1 and ``target`` steps, which would be very slow; so the
candidates are the plans whose micro-batch is at least half the safe size (from the fewest steps that reach the
target, ``ceil(target / safe)``, up to about twice that), and among those with equal waste the one with fewer steps
(larger micro-batches, better throughput) wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import check_positive_int

__all__ = ["AccumulationPlan", "plan_accumulation", "validate_target_batch_size"]


@dataclass(frozen=True)
class AccumulationPlan:
    """A micro-batch size and how many micro-batches to accumulate per optimizer step."""

    target_batch_size: int
    """The effective batch size asked for."""
    micro_batch_size: int
    """Batch size of each forward/backward pass (never above the safe size)."""
    accumulation_steps: int
    """Micro-batches whose gradients are accumulated before each optimizer step (1: no accumulation)."""

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step: ``micro_batch_size * accumulation_steps`` (at least the target)."""
        return self.micro_batch_size * self.accumulation_steps

    @property
    def waste(self) -> int:
        """Samples per optimizer step beyond the target."""
        return self.effective_batch_size - self.target_batch_size

    def describe(self) -> str:
        """E.g. ``micro-batch 25 x 4 accumulation steps = 100 (target 100)``."""
        text = (
            f"micro-batch {self.micro_batch_size} x {self.accumulation_steps} accumulation "
            f"step{'s' if self.accumulation_steps != 1 else ''} = {self.effective_batch_size} "
            f"(target {self.target_batch_size}"
        )
        return text + (f", {self.waste} over)" if self.waste else ")")


def validate_target_batch_size(target_batch_size: object) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``target_batch_size`` is None or a whole number of at least 1."""
    check_positive_int("target_batch_size", target_batch_size, allow_none=True)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_accumulation(target_batch_size: int, max_micro_batch_size: int, multiple_of: int = 1) -> AccumulationPlan:
    """Plan micro-batches of at most ``max_micro_batch_size`` that add up to at least ``target_batch_size``.

    Args:
        target_batch_size: the effective batch size to reach (at least 1).
        max_micro_batch_size: the largest micro-batch allowed, normally the safe batch size a search recommended.
        multiple_of: micro-batch sizes are multiples of this (ignored when the safe size is smaller than it).

    Returns:
        The plan with the least waste among those with a micro-batch of at least half the safe size; ties go to
        fewer accumulation steps.
    """
    validate_target_batch_size(target_batch_size)
    check_positive_int("max_micro_batch_size", max_micro_batch_size)
    check_positive_int("multiple_of", multiple_of)
    if max_micro_batch_size < multiple_of:
        multiple_of = 1
    if target_batch_size <= max_micro_batch_size:
        micro = min(_round_up(target_batch_size, multiple_of), max_micro_batch_size // multiple_of * multiple_of)
        if micro >= target_batch_size:
            return AccumulationPlan(target_batch_size, micro, 1)
    fewest = -(-target_batch_size // max_micro_batch_size)
    smallest_micro = max(-(-max_micro_batch_size // 2), 1)
    best: AccumulationPlan | None = None
    steps = fewest
    while True:
        micro = _round_up(-(-target_batch_size // steps), multiple_of)
        if micro > max_micro_batch_size:  # rounding to multiple_of pushed it over: more steps needed
            steps += 1
            continue
        if best is not None and micro < smallest_micro:
            break
        plan = AccumulationPlan(target_batch_size, micro, steps)
        if best is None or plan.waste < best.waste:
            best = plan
        if best.waste == 0 or micro <= multiple_of:
            break
        steps += 1
    return best
