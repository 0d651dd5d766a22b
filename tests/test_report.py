"""Text reports (batchfinder.report): the progress lines and the trial table."""

from __future__ import annotations

import io

from batchfinder.report import ProgressPrinter, trial_table
from batchfinder.result import Trial


def _trial(size: int, seconds: float | None, fits: bool = True) -> Trial:
    return Trial(batch_size=size, fits=fits, peak_bytes=2**20, seconds_per_step=seconds, steps=2)


def test_samples_per_second_of_a_slow_trial_is_a_meaningful_figure_not_zero():
    table = trial_table([_trial(4, 9.5), _trial(64, 0.5), _trial(8, 200.0)])
    rows = table.splitlines()[2:]
    assert rows[0].split()[-1] == "0.42" and rows[1].split()[-1] == "128" and rows[2].split()[-1] == "0.04"


def test_progress_lines_come_after_their_heading_once():
    stream = io.StringIO()
    printer = ProgressPrinter(stream, heading="searching evaluation batch sizes on SimulatedGPU(64.00 MiB) (mode binsearch):")
    printer(_trial(16, 0.1))
    printer(_trial(32, None, fits=False))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("searching evaluation batch sizes") and len(lines) == 3
    assert lines[1].startswith("trial  1:") and lines[2].startswith("trial  2:")
    printer.begin("searching training batch sizes again:")  # a printer reused for the next search starts over
    printer(_trial(64, 0.1))
    assert stream.getvalue().splitlines()[3:] == ["searching training batch sizes again:", printer_line(_trial(64, 0.1))]


def printer_line(trial: Trial) -> str:
    from batchfinder.report import format_trial

    return format_trial(1, trial)
