"""Fake-tensor failures: recognising an operation that cannot run under fake tensors, and keeping torch's own
logging of such failures (a full traceback per operation) out of the user's log."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator

from ..errors import exception_text

__all__ = ["is_fake_unsupported", "quiet_fake_tensor_logs", "TORCH_FAKE_TENSOR_LOGGERS"]

logger = logging.getLogger(__name__)


TORCH_FAKE_TENSOR_LOGGERS: tuple[str, ...] = ("torch._subclasses.fake_tensor", "torch._subclasses.fake_tensor.not_implemented")
"""Torch's loggers that report, with a full traceback, every operation that fails under fake tensors."""


class _ThreadRecordsFilter(logging.Filter):
    """Drops the log records of one thread (the one that created the filter) and counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread is None or record.thread == self.thread:
            self.dropped += 1
            return False
        return True


@contextlib.contextmanager
def quiet_fake_tensor_logs() -> Iterator[_ThreadRecordsFilter]:
    """Within this block, drop what torch's fake-tensor loggers log from this thread.

    When an operation fails under fake tensors (e.g. a batch of the wrong shape), torch logs the failure with a full
    traceback at ERROR level (``torch._subclasses.fake_tensor``: "failed while attempting to run meta for
    aten.mm.default" and some 17 lines of traceback) before raising it. A trace turns that exception into one clear message, so the log
    is noise. Only the records of the calling thread are dropped; the loggers are left as they were on exit. Yields
    the filter, whose ``dropped`` counts the records dropped.
    """
    records = _ThreadRecordsFilter()
    loggers = [logging.getLogger(name) for name in TORCH_FAKE_TENSOR_LOGGERS]
    for torch_logger in loggers:
        torch_logger.addFilter(records)
    try:
        yield records
    finally:
        for torch_logger in loggers:
            torch_logger.removeFilter(records)
        if records.dropped:
            logger.debug("dropped %d log record(s) of torch's fake tensors (the error is reported instead)", records.dropped)


@functools.lru_cache(maxsize=1)
def _fake_unsupported_types() -> tuple[type[BaseException], ...]:
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedFakeTensorException,
        UnsupportedOperatorException,
    )

    types: list[type[BaseException]] = [
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
        UnsupportedFakeTensorException,
    ]
    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        types.append(GuardOnDataDependentSymNode)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(types)


_FAKE_HINTS = ("fake tensor", "faketensor", "tensor subclass", "meta tensor", "meta device", "device='meta'", "data pointer")


def is_fake_unsupported(exc: BaseException) -> bool:
    """True when ``exc`` says an operation cannot run on fake tensors (rather than that the batch is wrong)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _fake_unsupported_types()):
            return True
        text = exception_text(current).lower()
        if any(hint in text for hint in _FAKE_HINTS):
            return True
        current = current.__cause__ or current.__context__
    return False
