"""Every exception batchfinder raises of its own, and how an exception is described in its messages.

The hierarchy::

    RuntimeError
    └── BatchFinderError              batchfinder's own runtime outcomes (not programming errors)
        ├── NoBatchSizeFitsError      even batch size 1 (or the model alone) does not fit on the device
        ├── SearchIncompleteError     a trial or time budget ended the search before any size fitted
        └── RankFailedError           another rank failed; this one stops too instead of waiting for it
    ValueError
    └── FakeTensorUnsupportedError    the step cannot run under fake tensors (estimate and predict)
    Exception
    └── StepContractError             the training step broke its contract
        ├── LossTypeError  (also a TypeError)    the step did not return a single-element tensor
        └── LossValueError (also a ValueError)   the loss does not require grad

Bad arguments raise ``ValueError`` or ``TypeError`` naming the argument and what would be valid; an error of the
user's own code propagates with its own type, with one note of batchfinder's (:func:`set_note`) saying where it
happened (the batch size, the phase of the step, the trials before it) and attributes that keep the search's
progress: ``batchfinder_batch_size``, ``batchfinder_phase`` and ``batchfinder_trials`` (the trials that ran before
it). Out-of-memory errors are recognised, not raised: :func:`batchfinder.is_oom_error` (:mod:`batchfinder.engine.oom`).

This module imports nothing, so every layer may use it.
"""

from __future__ import annotations

__all__ = [
    "BatchFinderError",
    "NoBatchSizeFitsError",
    "SearchIncompleteError",
    "RankFailedError",
    "FakeTensorUnsupportedError",
    "StepContractError",
    "LossTypeError",
    "LossValueError",
    "exception_text",
    "exception_first_line",
    "set_note",
    "batchfinder_note",
]


class BatchFinderError(RuntimeError):
    """Base class of batchfinder's own runtime errors."""


class NoBatchSizeFitsError(BatchFinderError):
    """Even batch size 1 (or the model alone) does not fit on the device.

    ``needed_bytes`` is the least the smallest attempt needed (peak reached plus the request that failed) and
    ``capacity_bytes`` what the device offers.
    """

    def __init__(self, message: str, *, needed_bytes: int | None = None, capacity_bytes: int | None = None) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.capacity_bytes = capacity_bytes


class SearchIncompleteError(BatchFinderError):
    """The trial or time budget ran out before any batch size was shown to fit."""


class RankFailedError(BatchFinderError):
    """Another rank failed during the search (raised an error, was interrupted, exited or stopped answering); this
    rank stops too instead of waiting for it.

    ``ranks`` lists the ranks that failed (as far as this rank can tell: a rank that exited or hung is named when the
    group has two ranks, otherwise every other rank is listed) and ``errors`` maps each rank that reported its error
    to that error's type and first line (``"KeyError: 'x'"``). The failing rank itself raises its own error.
    """

    def __init__(
        self, message: str, *, ranks: list[int] | tuple[int, ...] = (), errors: dict[int, str] | None = None
    ) -> None:
        super().__init__(message)
        self.ranks = list(ranks)
        self.errors = dict(errors or {})


class FakeTensorUnsupportedError(ValueError):
    """The training step cannot run under fake tensors (it reads tensor values, or uses an unsupported operation)."""


class StepContractError(Exception):
    """Marks errors about the step's own contract (a loss that is not a scalar, or that needs no grad)."""


class LossTypeError(TypeError, StepContractError):
    """The step did not return a single-element tensor."""


class LossValueError(ValueError, StepContractError):
    """The loss does not require grad."""


def exception_text(exc: BaseException) -> str:
    """Return the text of an exception, tolerating non-string args and a failing ``__str__``."""
    parts: list[str] = []
    for arg in getattr(exc, "args", ()) or ():
        if isinstance(arg, str):
            parts.append(arg)
        elif isinstance(arg, bytes):
            parts.append(arg.decode("utf-8", errors="replace"))
        else:
            try:
                parts.append(repr(arg))
            except Exception:  # a broken __repr__ must not hide the rest of the message
                continue
    try:
        parts.append(str(exc))
    except Exception:
        pass
    return "\n".join(parts)


def exception_first_line(exc: BaseException) -> str:
    """Return the first non-blank line of :func:`exception_text` (``""`` when the exception says nothing).

    >>> exception_first_line(RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB\\nsee the docs"))
    'CUDA out of memory. Tried to allocate 2.00 MiB'
    """
    for line in exception_text(exc).splitlines():
        if line.strip():
            return line.strip()
    return ""


_NOTE = "_batchfinder_note"


def batchfinder_note(exc: BaseException) -> str | None:
    """The note :func:`set_note` gave ``exc`` (None when it has none)."""
    note = getattr(exc, _NOTE, None)
    return note if isinstance(note, str) else None


def set_note(exc: BaseException, note: str) -> None:
    """Give ``exc`` batchfinder's note (:meth:`BaseException.add_note`), in place of the one it gave before: an
    exception carries one note of batchfinder's however many layers add to what it says."""
    previous = batchfinder_note(exc)
    notes = getattr(exc, "__notes__", None)
    if previous is not None and isinstance(notes, list) and previous in notes:
        notes.remove(previous)
    try:
        exc.add_note(note)
        setattr(exc, _NOTE, note)
    except (AttributeError, TypeError):  # an exception that refuses attributes (__slots__) keeps what it says
        pass
