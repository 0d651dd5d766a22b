"""Text reports: the per-trial progress line and the trial table."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from .units import format_bytes

if TYPE_CHECKING:
    from .result import Trial

__all__ = ["ProgressPrinter", "format_trial", "trial_table"]


def format_trial(index: int, trial: Trial) -> str:
    """One line describing a finished trial."""
    if trial.fits:
        speed = f"{trial.seconds_per_step * 1000:8.1f} ms/step" if trial.seconds_per_step is not None else ""
        return f"trial {index:>2}: batch {trial.batch_size:>7}  fits      peak {format_bytes(trial.peak_bytes):>11}  {speed}"
    return f"trial {index:>2}: batch {trial.batch_size:>7}  OOM       peak {format_bytes(trial.peak_bytes):>11}  (out of memory)"


class ProgressPrinter:
    """A ``progress`` callback that writes one line per trial to a stream (standard error by default), after a
    ``heading`` line (what is searched, where) when one is given: the evaluation search's trials then read as
    their own list, not as the training search starting again."""

    def __init__(self, stream: TextIO | None = None, heading: str | None = None) -> None:
        self.stream = stream
        self.heading = heading
        self.count = 0

    def begin(self, heading: str) -> None:
        """Start a new list of trials under ``heading`` (the engine calls it at the start of each search, so that a
        printer passed as ``progress=`` heads the training and the evaluation search's trials alike)."""
        self.heading = heading
        self.count = 0

    def __call__(self, trial: Trial) -> None:
        self.count += 1
        stream = self.stream if self.stream is not None else sys.stderr
        if self.count == 1 and self.heading:
            stream.write(self.heading + "\n")
        stream.write(format_trial(self.count, trial) + "\n")
        stream.flush()


def _rate(samples_per_second: float | None) -> str:
    """Samples per second with the figures that say something: whole numbers from 10 on, two significant
    figures below (a slow trial reads 0.42, not 0)."""
    if samples_per_second is None:
        return "-"
    return f"{samples_per_second:,.0f}" if samples_per_second >= 10 else f"{samples_per_second:.2g}"


def trial_table(trials: Sequence[Trial]) -> str:
    """A table of trials: batch size, fits, peak allocated and reserved memory, time per step, samples per second."""
    header = (
        f"{'#':>3}  {'batch size':>10}  {'fits':>4}  {'peak memory':>12}  {'reserved':>12}  {'time/step':>10}  "
        f"{'samples/s':>10}"
    )
    lines = [header, "-" * len(header)]
    for index, trial in enumerate(trials, 1):
        seconds = f"{trial.seconds_per_step * 1000:.1f} ms" if trial.seconds_per_step is not None else "-"
        rate = _rate(trial.samples_per_second)
        lines.append(
            f"{index:>3}  {trial.batch_size:>10,}  {'yes' if trial.fits else 'OOM':>4}  "
            f"{format_bytes(trial.peak_bytes):>12}  {format_bytes(trial.peak_reserved_bytes):>12}  {seconds:>10}  "
            f"{rate:>10}"
        )
    return "\n".join(lines)
