"""What a search returns: :class:`Trial` (one batch size, measured) and :class:`SearchResult` (the whole search).

Plain, typed data: nothing here runs a trial. :meth:`SearchResult.as_dict` is the one place that turns a result
into JSON-ready values (the command line and the benchmarks use it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .report import trial_table
from .search.strategies import StopReason, scaled_batch_size
from .training.sample_sizes import DataScan
from .units import format_bytes, parse_bytes

__all__ = ["Trial", "SearchResult"]

_REQUEST = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB|bytes)")


@dataclass(frozen=True)
class Trial:
    """The outcome of training steps at one batch size."""

    batch_size: int
    fits: bool
    """True when every step ran without running out of memory."""
    peak_bytes: int
    """Peak allocated device memory during the trial (for a failed trial, the peak reached before the failure), as
    ``torch.cuda.max_memory_allocated`` counts it."""
    seconds_per_step: float | None
    """Wall time per step (mean over the steps after the first, which allocates optimizer state); None if it failed."""
    steps: int
    """Steps completed."""
    baseline_bytes: int = 0
    """Device memory held before the trial (model, buffers, existing optimizer state)."""
    leaked_bytes: int = 0
    """Memory still held after recovery beyond the baseline (0 when recovery was complete)."""
    error: str | None = None
    """The first line of the out-of-memory message when the trial did not fit."""
    peak_reserved_bytes: int = 0
    """Peak memory the device's allocator held during the trial (allocated plus cached blocks and the unused parts
    of its segments), as ``torch.cuda.max_memory_reserved`` counts it; a real GPU runs out of memory on this."""
    data_scan: DataScan | None = None
    """From :func:`~batchfinder.try_batch_size`: what was learned about the sizes of the samples (None in a
    search's trials: the search result has it)."""
    replayed: bool = False
    """True when the figures come from replaying a recorded trial through the simulated GPU's allocator model, not
    from running steps (a confirmation after ``mode="guided"`` confirmed its prediction to the byte)."""
    micro_batches: int = 1
    """Micro-batches of ``batch_size`` per optimizer step, the gradients kept between them (1: no accumulation);
    ``steps`` and ``seconds_per_step`` count optimizer steps."""

    @property
    def samples_per_second(self) -> float | None:
        """Training throughput of the trial, when it fitted."""
        if not self.fits or not self.seconds_per_step:
            return None
        return self.batch_size * self.micro_batches / self.seconds_per_step

    @property
    def requested_bytes(self) -> int | None:
        """Size of the allocation that failed, read from the out-of-memory message when it says."""
        match = _REQUEST.search(self.error or "")
        if match is None:
            return None
        if float(match.group(1)) == 0:
            return 0
        return parse_bytes(f"{match.group(1)} {'B' if match.group(2) == 'bytes' else match.group(2)}", argument="error")

    def as_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-ready values."""
        return {
            "batch_size": self.batch_size,
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "seconds_per_step": self.seconds_per_step,
            "steps": self.steps,
            "baseline_bytes": self.baseline_bytes,
            "leaked_bytes": self.leaked_bytes,
            "error": self.error,
            "replayed": self.replayed,
            "micro_batches": self.micro_batches,
            **({"data_scan": self.data_scan.as_dict()} if self.data_scan is not None else {}),
        }


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
    """Why the search ended (bracket closed, dataset length, ``max_batch_size``, a budget, ...)."""
    safety: float = 0.8
    multiple_of: int = 1
    mode: str = "binsearch"
    device: str = ""
    """The device searched on, as reports name it."""
    capacity_bytes: int | None = None
    """Memory the device offers (None when unknown)."""
    seconds: float = 0.0
    """Wall time of the whole search."""
    smallest_failure: int | None = None
    """Smallest batch size that ran out of memory (None when none did); with the stop reason ``"prediction
    confirmed"``, the size the confirmed prediction says runs out of memory (not tried)."""
    predicted_peaks: dict[int, int] = field(default_factory=dict)
    """``mode="guided"``: every predicted peak the search computed, by batch size (empty in other modes); a size
    predicted not to fit has the peak it would need without a limit (above the capacity)."""
    predicted_max_batch_size: int | None = None
    """``mode="guided"``: the largest size the prediction alone put within the limit (None in other modes)."""
    prediction_status: str | None = None
    """``mode="guided"``: ``"exact"``, ``"recalibrated"`` (a trial surprised the model) or ``"unavailable"`` (the
    model could not be traced); None in other modes."""
    prediction_method: str | None = None
    """``mode="guided"``: how the predicted peaks were computed: ``"one trace, replayed at each size"``, or ``"a
    trace per size: <why>"`` when the model's memory is not an affine function of the batch size."""
    target_batch_size: int | None = None
    """The effective batch size asked for with ``target_batch_size`` (None when none was)."""
    micro_batch_size: int = 0
    """Batch size of each forward/backward pass: ``batch_size``, or with a target the planned micro-batch (<= it)."""
    accumulation_steps: int = 1
    """Micro-batches to accumulate per optimizer step (Lightning's ``accumulate_grad_batches``)."""
    world_size: int = 1
    """Ranks that ran every trial and agreed on each outcome (1 without ``torch.distributed``)."""
    evaluation: SearchResult | None = None
    """The search of a separate evaluation batch size (evaluation-only trials), when one ran."""
    confirmations: list[Trial] = field(default_factory=list)
    """With ``confirm_steps``: the confirmation runs at the recommended size (several when one ran out of memory and
    the recommendation was lowered); the last one fitted."""
    accumulation_trials: list[Trial] = field(default_factory=list)
    """With gradient accumulation (``target_batch_size``, or a front end's own accumulation): the trials of the plan
    with the gradients kept between micro-batches (several when one ran out of memory and the plan was lowered);
    the last one fitted."""
    data_scan: DataScan | None = None
    """What was learned about the sizes of the training samples: fixed-size, or how many were scanned and the largest
    (trials then ran on the largest samples)."""
    precision: str = "32-true"
    """The precision the trials trained in (``precision=``; for the Lightning callback the trainer's, such as
    ``"bf16-mixed"``; for the Hugging Face front end the Trainer's ``fp16``/``bf16``)."""
    train: bool = True
    """False for a search of inference batch sizes (``train=False``, or an evaluation-only search): trials ran
    forward passes in eval mode with no optimizer."""
    notes: list[str] = field(default_factory=list)
    """What the search did or noticed that bears on the answer (a compiled model searched uncompiled, a
    checkpointed part that computes no gradients, ...)."""
    kernels: list[str] = field(default_factory=list)
    """On a simulated GPU: which models of CUDA's kernels its trials followed, e.g. ``"attention: memory-efficient
    (CUDA), 24 calls"`` (:mod:`batchfinder.memory.kernels`); empty on a real GPU."""

    def __post_init__(self) -> None:
        if not self.micro_batch_size:
            self.micro_batch_size = self.batch_size

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step over all ranks: ``micro_batch_size * accumulation_steps * world_size``."""
        return self.micro_batch_size * self.accumulation_steps * self.world_size

    @property
    def eval_batch_size(self) -> int | None:
        """Recommended evaluation batch size, when an evaluation batch size was searched."""
        return None if self.evaluation is None else self.evaluation.batch_size

    @property
    def eval_max_batch_size(self) -> int | None:
        """Largest evaluation batch size that fitted, when an evaluation batch size was searched."""
        return None if self.evaluation is None else self.evaluation.max_batch_size

    @property
    def confirmed_reserved_fraction(self) -> float | None:
        """The reserved peak of the last confirmation run as a fraction of the capacity (None without one)."""
        if not self.confirmations or not self.capacity_bytes:
            return None
        return self.confirmations[-1].peak_reserved_bytes / self.capacity_bytes

    @property
    def confirmed_allocated_fraction(self) -> float | None:
        """The allocated peak of the last confirmation run as a fraction of the capacity (None without one)."""
        if not self.confirmations or not self.capacity_bytes:
            return None
        return self.confirmations[-1].peak_bytes / self.capacity_bytes

    @property
    def num_trials(self) -> int:
        """Trials run by this search (the evaluation search's are in :attr:`evaluation`)."""
        return len(self.trials)

    @property
    def num_steps(self) -> int:
        """Steps executed across all trials."""
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
        scaled = scaled_batch_size(self.max_batch_size, self.safety)
        text = f"largest that fits: {self.max_batch_size}; x{self.safety:g} = {scaled}"
        first = self.confirmations[0].batch_size if self.confirmations else None
        if self.multiple_of > 1:
            text += f"; rounded down to a multiple of {self.multiple_of} = {first or self.batch_size}"
        elif first is None and scaled != self.batch_size:
            text += f"; at least 1 = {self.batch_size}"
        if first is not None and first != self.batch_size:
            failed = self.confirmations[0]
            text += (
                f"; {first} ran out of memory when confirmed (after {failed.steps} step(s): {failed.error}), "
                f"so {self.batch_size}"
            )
        return text

    def why_stopped(self) -> str:
        """Why the search ended, with the smallest size that ran out of memory when there is one."""
        text = f"stopped: {self.stop_reason.value}"
        if self.stop_reason == StopReason.PREDICTION_CONFIRMED:
            text += (
                f" (the trial at {self.max_batch_size} reached the predicted peaks to the byte); "
                f"{self.smallest_failure} is predicted to run out of memory (not tried)"
            )
        elif self.smallest_failure is not None:
            text += f"; smallest that ran out of memory: {self.smallest_failure}"
        return text

    def table(self) -> str:
        """The trial table as text."""
        return trial_table(self.trials)

    def as_dict(self) -> dict[str, Any]:
        """Every figure as plain JSON-ready values (nested for the evaluation search)."""
        return {
            "max_batch_size": self.max_batch_size,
            "batch_size": self.batch_size,
            "safety": self.safety,
            "multiple_of": self.multiple_of,
            "mode": self.mode,
            "device": self.device,
            "capacity_bytes": self.capacity_bytes,
            "stop_reason": self.stop_reason.value,
            "smallest_failure": self.smallest_failure,
            "seconds": round(self.seconds, 3),
            "num_trials": self.num_trials,
            "num_steps": self.num_steps,
            "num_ooms": self.num_ooms,
            "target_batch_size": self.target_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "accumulation_steps": self.accumulation_steps,
            "world_size": self.world_size,
            "effective_batch_size": self.effective_batch_size,
            "predicted_peaks": {str(size): peak for size, peak in sorted(self.predicted_peaks.items())},
            "predicted_max_batch_size": self.predicted_max_batch_size,
            "prediction_status": self.prediction_status,
            "prediction_method": self.prediction_method,
            "trials": [trial.as_dict() for trial in self.trials],
            "evaluation": None if self.evaluation is None else self.evaluation.as_dict(),
            "confirmations": [trial.as_dict() for trial in self.confirmations],
            "accumulation_trials": [trial.as_dict() for trial in self.accumulation_trials],
            "data_scan": None if self.data_scan is None else self.data_scan.as_dict(),
            "precision": self.precision,
            "train": self.train,
            "notes": list(self.notes),
            "kernels": list(self.kernels),
        }

    def plot(self, path: Any) -> Any:
        """Write a PNG of the search to ``path``: each trial's peak against batch size (out-of-memory trials
        marked), the predicted curve when the search had one, the capacity, the largest and the recommended size.
        Needs matplotlib (``pip install batchfinder[plot]``); see :func:`batchfinder.plot.plot_search`."""
        from .plot import plot_search

        return plot_search(self, path)

    def __str__(self) -> str:
        capacity = f", capacity {format_bytes(self.capacity_bytes)}" if self.capacity_bytes else ""
        lines = [
            f"{'' if self.train else 'inference '}batch size search on {self.device}{capacity}, mode {self.mode}"
            + f", precision {self.precision}"
            + f": {self.num_trials} trial{'' if self.num_trials == 1 else 's'}, "
            f"{self.num_steps} steps, {self.num_ooms} out of memory, {self.seconds:.1f} s",
            self.table(),
            f"recommended batch size: {self.batch_size}",
            f"  {self.explain()}",
            f"  {self.why_stopped()}",
        ]
        if self.prediction_status is not None:
            predicted = f"largest {self.predicted_max_batch_size} predicted, " if self.predicted_max_batch_size else ""
            method = self.prediction_method
            if not method and self.prediction_status == "unavailable":
                method = "no prediction was computed before the search ended"  # every "unavailable" says why
            lines.append(f"  prediction: {predicted}{self.prediction_status}" + (f" ({method})" if method else ""))
        if self.data_scan is not None and self.data_scan.varies:
            lines.append(f"  data: {self.data_scan.describe()}")
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.kernels:
            lines.append(f"  kernels: {'; '.join(self.kernels)}")
        if self.world_size > 1:
            lines.append(f"  agreed by {self.world_size} ranks: a size fits only if it fitted on every rank")
        if self.confirmations:
            last = self.confirmations[-1]
            lowered = len(self.confirmations) - 1
            fraction = self.confirmed_reserved_fraction
            allocated = self.confirmed_allocated_fraction
            varies = self.data_scan is not None and self.data_scan.varies
            lines.append(
                f"  confirmed: {last.steps} steps at {last.batch_size} with the cache kept"
                + (" (batches in the loader's order, then the largest samples)" if varies else "")
                + (" (replayed from the recorded trial, which the search's trial matched to the byte)" if last.replayed else "")
                + f", peak allocated {format_bytes(last.peak_bytes)}"
                + (f" ({allocated:.0%})" if allocated is not None else "")
                + f", reserved {format_bytes(last.peak_reserved_bytes)}"
                + (f" ({fraction:.0%} of the capacity)" if fraction is not None else "")
                + (f"; lowered {lowered} time(s) after running out of memory when confirmed" if lowered else "")
            )
        if self.target_batch_size is not None or self.accumulation_steps > 1:
            waste = self.effective_batch_size - (self.target_batch_size or 0)
            target = f" for target batch size {self.target_batch_size}" if self.target_batch_size is not None else ""
            lines.append(
                f"gradient accumulation{target}: micro-batch "
                f"{self.micro_batch_size} x {self.accumulation_steps}"
                + (f" x {self.world_size} ranks" if self.world_size > 1 else "")
                + f" = {self.effective_batch_size}"
                + (f" ({waste} over the target)" if waste and self.target_batch_size is not None else "")
            )
        if self.accumulation_trials:
            last = self.accumulation_trials[-1]
            lines.append(
                f"  accumulation measured: {last.steps} optimizer steps of {last.micro_batches} micro-batches of "
                f"{last.batch_size} with the gradients kept between them, peak allocated {format_bytes(last.peak_bytes)}, "
                f"reserved {format_bytes(last.peak_reserved_bytes)}"
                + (f"; lowered {len(self.accumulation_trials) - 1} time(s) after running out of memory"
                   if len(self.accumulation_trials) > 1 else "")
            )
        if self.evaluation is not None:
            lines.append(
                f"evaluation batch size: {self.evaluation.batch_size} (largest that fits: "
                f"{self.evaluation.max_batch_size}, {self.evaluation.num_trials} evaluation trials)"
            )
        return "\n".join(lines)
