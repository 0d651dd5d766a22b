"""How to search: :class:`SearchOptions`, the settings every front end shares, built one way by all of them.

A front end's search arguments carry the options' names and defaults (``tests/engine/test_options.py`` checks the
three signatures against the fields); it builds the options with :meth:`SearchOptions.from_arguments`, which takes
those arguments by name and validates them, so that a bad value is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..report import ProgressPrinter
from ..result import Trial
from ..search.accumulation import validate_target_batch_size
from ..search.checks import (
    MIN_STEPS_PER_TRIAL,
    check_positive_int,
    check_safety,
    check_steps_per_trial,
    check_time_budget,
)
from .modes import check_mode

__all__ = ["SearchOptions", "ProgressLike", "progress_callback"]

ProgressLike = bool | Callable[[Trial], None] | None
"""The ``progress`` argument: True for a line per trial on standard error, or a callable taking each ``Trial``."""


@dataclass(frozen=True)
class SearchOptions:
    """How to search: the arguments every front end shares (see :func:`~batchfinder.find_batch_size` for each)."""

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
    train: bool = True
    """False: size inference instead of training: trials run forward passes only, in eval mode under
    ``torch.inference_mode()``, with no optimizer, each output kept until the next batch's is computed."""
    confirm_steps: int = MIN_STEPS_PER_TRIAL
    """After the search, this many steps at the recommended size in one trial (0: none). On a caching allocator
    "fits" is not monotone in the batch size (segments pack differently), so the recommended size, below the largest
    that fits, is tried as well."""

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], **overrides: Any) -> "SearchOptions":
        """The options named in a front end's ``arguments`` (its ``locals()``: every field of the same name; other
        entries are the front end's own), with ``overrides`` on top, validated."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise TypeError(f"not search options: {sorted(unknown)}")
        options = cls(**{name: arguments[name] for name in fields if name in arguments}, **overrides)
        options.validate()
        return options

    def replace(self, **changes: Any) -> "SearchOptions":
        """These options with ``changes`` (validated)."""
        options = dataclasses.replace(self, **changes)
        options.validate()
        return options

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
        if not isinstance(self.train, bool):
            raise TypeError(f"train must be True (size training) or False (size inference), not {self.train!r}")
        if not self.train and self.target_batch_size is not None:
            raise ValueError("target_batch_size plans gradient accumulation for training: leave it out with train=False")
        if self.distributed is not None and not isinstance(self.distributed, bool):
            raise TypeError(f"distributed must be True, False or None (automatic), not {type(self.distributed).__name__}")


def progress_callback(progress: ProgressLike, heading: str | None = None) -> Callable[[Trial], None] | None:
    """The ``progress`` argument as a callback (``True``: one line per trial on standard error, after ``heading``)."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return ProgressPrinter(heading=heading)
    if callable(progress):
        return progress
    raise TypeError(f"progress must be a bool or a callable taking a Trial, not {type(progress).__name__}")
