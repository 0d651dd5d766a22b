"""One traced training step for every batch size: the allocation log of a trace, replayed at any size.

A fake-tensor trace (:mod:`batchfinder.memory.tracing`) turns a training step into a sequence of allocator calls: a
``malloc`` for every storage the step creates, a ``free`` when it dies. For nearly every model the size of each
storage is an affine function of the batch size B, ``k * B + c`` bytes (``k`` bytes per sample, ``c`` constant),
and the sequence of calls does not depend on B. Then one trace determines the step's memory at every batch size:
:func:`record` traces once and :meth:`AllocationLog.replay` replays the calls at another B through a model of the
caching allocator (:class:`~batchfinder.memory.allocator.CachingAllocator`), with 512-byte rounding, segments, splitting,
caching and, with a capacity, the release-and-retry of a full device. The replay gives what a trace at that B would
give, to the byte: the allocated and reserved peaks, the peak of each phase, and whether the allocator of the
device's capacity runs out.

How one trace finds ``k`` and ``c``, and checks that it may: the first training step is traced at batch size
``P1 = 4,099`` and the later steps at ``P2 = 8,191`` (fake tensors allocate nothing, so these cost what a trace at
32 costs). The forward and backward passes of the first and of the second step must make the same calls in the same
order; each allocation, ``s1`` bytes at ``P1`` and ``s2`` at ``P2``, then has ``k = (s2 - s1) / (P2 - P1)``, which
must be a whole number, and ``c = s1 - k * P1``, which must not be negative. Sizes that are not affine in B (a B x B
similarity matrix gives a negative ``c``), calls that depend on B (chunking by a fixed size, algorithms chosen by
size) or a step that allocates differently from the next make the log unsuitable (:attr:`AllocationLog.unsuitable`
says why): the estimator then traces at each batch size instead. What the first step makes besides (the optimizer's
state) is constant; the batch scales with ``P1``.

The same log can come from a real trial instead of a trace: on the simulated GPU the guided search records one
(:meth:`~batchfinder.engine.trial.TrialSession.record_allocations`, step 1 at batch size 2, step 2 at 3), which costs about
one small trial and runs models fake tensors cannot.

Known limitations: an affine fit through two points is taken at its word (a recording at 2 and 3 cannot see a
model that processes its batch in chunks of 256: it predicts one chunk's line; the guided search notices, because
its trial then does not reach the predicted peaks to the byte, and closes its bracket with real trials; a size that
is affine at 4,099 and 8,191 but not elsewhere would be replayed wrongly); batch size 1 is not replayed (dimensions
of size 1 make some copies unnecessary) but traced; a model that makes more than ``MAX_EVENTS`` allocations per recording is traced per size.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..units import format_bytes
from .accounting import round_allocation
from .allocator import AllocatorOutOfMemory, CachingAllocator
from .tracing import FakeTrainer, PeakLedger

__all__ = ["AllocationLog", "Replay", "RecordingLedger", "record", "replay_obstacle", "UnsuitableForReplay", "P1", "P2", "MAX_EVENTS"]

logger = logging.getLogger(__name__)

P1 = 4_099
"""The batch size the first traced step runs at."""
P2 = 8_191
"""The batch size the later traced steps run at."""
MAX_EVENTS = 1_000_000
"""Allocator calls a recording may make before it is given up (a model looping over its samples in Python)."""

_MALLOC, _FREE, _CHARGED, _PHASE = 0, 1, 2, 3
_SCALING_PHASES = ("forward", "backward")


class UnsuitableForReplay(Exception):
    """The recording stopped: the model's memory cannot be replayed from one trace (the reason is the message)."""


@dataclass(frozen=True)
class Replay:
    """What a trace at one batch size would report, computed from the log."""

    batch_size: int
    peak: int
    """Peak allocated bytes (each storage rounded to 512 B), model included."""
    peak_reserved: int
    """Peak bytes in the caching allocator's segments."""
    overflows: bool
    """True when the allocator of the replay's capacity ran out of memory (the peaks are then those reached)."""
    peak_phase: str
    phase_peaks: dict[str, int]
    failure: str | None = None
    """When the replay ran out of memory: what failed and why (:func:`describe_failure`), for a user to read."""


def describe_failure(exc: AllocatorOutOfMemory, where: str) -> str:
    """What an allocator's out-of-memory error means in words: the request that failed, in which phase, and why
    (the free capacity is smaller, or the free bytes are cached in segments too fragmented to serve it). Not a peak:
    the step needs a little more memory than there is, it does not jump by the request."""
    free = exc.capacity - exc.reserved
    cached = exc.reserved - exc.allocated
    text = (
        f"the allocator's request of {format_bytes(exc.allocation_size)} (for a {format_bytes(exc.requested)} tensor) "
        f"in the {where} exceeds the {format_bytes(free)} left free on the device"
    )
    if cached:
        text += f", with {format_bytes(cached)} cached in segments that cannot serve it"
    return text


class _HandlesOnly:
    """An allocator that only hands out handles: a recording logs the calls, the replays model the allocator."""

    reserved = peak_reserved = 0

    def __init__(self) -> None:
        self._next = 0

    def malloc(self, nbytes: int, stream: int = 0) -> int:
        self._next += 1
        return self._next

    def free(self, handle: int) -> None:
        pass

    def reset_peak(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass


class RecordingLedger(PeakLedger):
    """A ledger logging every allocator call with the raw size and how it scales (for a fake-tensor trace or a real
    trial); it models no allocator itself (its reserved bytes read 0)."""

    def __init__(self, step_sizes: tuple[int, ...], *, workspace_bytes: int = 0) -> None:
        super().__init__(None, workspace_bytes=workspace_bytes, capacity=None)
        self.allocator = _HandlesOnly()  # type: ignore[assignment]
        self.step_sizes = step_sizes
        self.events: list[tuple[Any, ...]] = []
        self.scale: int | None = None
        """The batch size storages made now scale with (None: they are constant)."""
        self._paused = False

    def mark_phase(self, phase: str, index: int) -> None:
        """Called by the trace when a phase begins: forward and backward storages scale with the step's size."""
        self.settle()  # the frees of the phase before belong to it
        self.events.append((_PHASE, phase, index))
        self.scale = self.step_sizes[index - 1] if phase in _SCALING_PHASES else None

    @contextlib.contextmanager
    def scaling(self, batch_size: int | None) -> Iterator[None]:
        """Storages made within this block scale with ``batch_size`` (the batch's transfer)."""
        self.settle()
        previous, self.scale = self.scale, batch_size
        try:
            yield
        finally:
            self.settle()
            self.scale = previous

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Allocator calls within this block are not logged (the later steps' batch, which a trial does not make)."""
        self.settle()
        self._paused = True
        try:
            yield
        finally:
            self.settle()
            self._paused = False

    def charge(self, storages: Any) -> int:
        added = super().charge(storages)
        if not self._paused and added:
            self.events.append((_CHARGED,))
        return added

    def _malloc(self, allocator: CachingAllocator, sizes: list[int], raws: list[int] | None = None) -> list[int | None]:
        handles = super()._malloc(allocator, sizes, raws)
        if not self._paused:
            for handle, raw in zip(handles, raws or sizes):
                self.events.append((_MALLOC, handle, raw, self.scale))
            if len(self.events) > MAX_EVENTS:
                raise UnsuitableForReplay(f"the step made more than {MAX_EVENTS:,} allocations at a billion samples")
        return handles

    def forget(self) -> None:
        """Stop watching the storages charged so far (a recording of real tensors, such as the model's parameters,
        which outlive it: their finalizers would otherwise keep this ledger and its log alive)."""
        self.forget_storages()
        self.close()

    def _free(self, token: int) -> None:
        handle = self._handles.get(token)
        super()._free(token)
        if handle is not None and not self._paused:
            self.events.append((_FREE, handle))


@dataclass
class AllocationLog:
    """The allocator calls of one recording, each size as ``k * B + c``; :meth:`replay` runs them at any B."""

    calls: list[tuple[Any, ...]]
    """``(MALLOC, handle, k, c)``, ``(FREE, handle)``, ``(CHARGED,)``, ``(PHASE, name, index)``."""
    unsuitable: str | None = None
    """Why the log cannot stand for other batch sizes (None when it can)."""
    seconds: float = 0.0

    @classmethod
    def from_events(cls, events: list[tuple[Any, ...]], sizes: tuple[int, int] = (P1, P2)) -> "AllocationLog":
        """Fit ``k`` and ``c`` to every logged allocation and check that the steps agree (step 1 recorded at batch
        size ``sizes[0]``, the later steps at ``sizes[1]``)."""
        calls: list[list[Any]] = []
        steps: dict[int, list[tuple[Any, ...]]] = {}
        at: dict[int, list[list[Any]]] = {}  # the step's forward/backward mallocs, in order
        phase, index = "setup", 0
        for event in events:
            kind = event[0]
            if kind == _PHASE:
                phase, index = event[1], event[2]
                calls.append(list(event))
                if phase == "done":
                    break
                continue
            if kind == _MALLOC:
                _, handle, raw, scale = event
                call = [_MALLOC, handle, *((0, raw) if scale is None else divmod(raw, scale))]
                if phase in _SCALING_PHASES:
                    steps.setdefault(index, []).append((_MALLOC, raw))
                    at.setdefault(index, []).append(call)
                calls.append(call)
                continue
            if phase in _SCALING_PHASES:
                steps.setdefault(index, []).append((kind,))
            calls.append(list(event))
        unsuitable = _fit(steps, at, sizes)
        return cls([tuple(call) for call in calls], unsuitable)

    def allocated_peak(self, batch_size: int) -> int:
        """The allocated peak alone at ``batch_size`` (no allocator model: a fraction of :meth:`replay`'s cost). It
        never decreases with the batch size, and the reserved peak is never below it."""
        sizes: dict[int, int] = {}
        allocated = best = 0
        for call in self.calls:
            kind = call[0]
            if kind == _MALLOC:
                size = round_allocation(call[2] * batch_size + call[3])
                sizes[call[1]] = size
                allocated += size
            elif kind == _FREE:
                allocated -= sizes.pop(call[1], 0)
            elif kind == _CHARGED:
                if allocated > best:
                    best = allocated
        return best

    def largest_within_allocated(self, level: int, lo: int, hi: int) -> int:
        """The largest batch size in ``[lo, hi]`` whose allocated peak is at most ``level`` (``lo - 1`` if none), by
        bisection on :meth:`allocated_peak`."""
        if self.allocated_peak(lo) > level:
            return lo - 1
        good, bad = lo, hi + 1
        while bad - good > 1:
            middle = (good + bad) // 2
            if self.allocated_peak(middle) <= level:
                good = middle
            else:
                bad = middle
        return good

    def replay(self, batch_size: int, capacity: int | None = None) -> Replay:
        """The peaks a trace at ``batch_size`` would report, on an allocator of ``capacity`` (None: unlimited)."""
        allocator = CachingAllocator(capacity)
        malloc, free = allocator.malloc, allocator.free
        live: dict[int, tuple[int, int]] = {}  # the recording's handle -> (this allocator's handle, charged bytes)
        allocated = best = reserved_peak = phase_top = 0
        peak_phase, phase, index = "setup", "setup", 0
        phase_peaks: dict[str, int] = {}
        overflows = False
        failure: str | None = None
        for call in self.calls:
            kind = call[0]
            if kind == _MALLOC:
                size = round_allocation(call[2] * batch_size + call[3])
                if size:
                    try:
                        live[call[1]] = (malloc(size), size)
                    except AllocatorOutOfMemory as exc:
                        overflows = True
                        failure = describe_failure(exc, "set-up before the first step" if phase == "setup" else f"{phase} (step {index})")
                        break
                    allocated += size
            elif kind == _FREE:
                found = live.pop(call[1], None)
                if found is not None:
                    free(found[0])
                    allocated -= found[1]
            elif kind == _CHARGED:
                if allocated > phase_top:
                    phase_top = allocated
                if allocated > best:
                    best = allocated
                    peak_phase = phase if phase == "setup" else f"{phase} (step {index})"
                if allocator.reserved > reserved_peak:
                    reserved_peak = allocator.reserved
            else:
                phase_peaks[phase] = max(phase_peaks.get(phase, 0), phase_top)
                phase, index = call[1], call[2]
                phase_top = allocated
        phase_peaks[phase] = max(phase_peaks.get(phase, 0), phase_top)
        phase_peaks.pop("done", None)
        return Replay(batch_size, best, reserved_peak, overflows, peak_phase, phase_peaks, failure)


def _fit(
    steps: dict[int, list[tuple[Any, ...]]], at: dict[int, list[list[Any]]], sizes: tuple[int, int]
) -> str | None:
    """Set ``k`` and ``c`` of every forward/backward allocation from the same allocation at ``sizes[0]`` (step 1)
    and at ``sizes[1]`` (step 2); the reason the steps cannot stand for other sizes, or None."""
    p1, p2 = sizes
    if 1 not in steps or 2 not in steps:
        return "fewer than two training steps were recorded"
    first, second = steps[1], steps[2]
    differ = (
        f"the forward and backward passes of training step 2 (recorded at a batch of {p2:,}) made other allocations "
        f"than step 1 (at {p1:,}): memory is not an affine function of the batch size"
    )
    if [e[0] for e in first] != [e[0] for e in second] or any(steps[i] != second for i in steps if i > 2):
        return differ
    fitted: list[tuple[int, int]] = []
    for (kind, *raw1), (_, *raw2) in zip(first, second):
        if kind != _MALLOC:
            continue
        k, rest = divmod(raw2[0] - raw1[0], p2 - p1)
        c = raw1[0] - k * p1
        if rest or k < 0 or c < 0:
            return differ
        fitted.append((k, c))
    for index, calls in at.items():
        for call, (k, c) in zip(calls, fitted):
            call[2], call[3] = k, c
    return None


def replay_obstacle(template: Any) -> str | None:
    """Why a batch shaped like ``template`` cannot be made at a billion samples (None when it can): lists of plain
    values (strings) are repeated per sample."""
    if isinstance(template, Mapping):
        return next((reason for reason in map(replay_obstacle, template.values()) if reason), None)
    if isinstance(template, (list, tuple)):
        if len(template) == 1 and not isinstance(template[0], (torch.Tensor, Mapping, list, tuple)):
            return "the batch holds a list of plain values per sample (e.g. strings)"
        return next((reason for reason in map(replay_obstacle, template) if reason), None)
    return None


def record(trainer: FakeTrainer) -> AllocationLog:
    """Trace ``trainer``'s steps once (step 1 at ``P1``, the later ones at ``P2``) and fit the allocation log.

    Raises :class:`UnsuitableForReplay` (or what the trace raised) when the recording could not be made."""
    sizes = (P1, *([P2] * (trainer.steps - 1)))
    ledger = RecordingLedger(sizes, workspace_bytes=trainer.workspace_bytes)
    trainer.trace_steps_with(ledger, sizes)
    return AllocationLog.from_events(ledger.events)
