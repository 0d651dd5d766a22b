"""batchfinder.errors.exception_first_line: the one helper for "the first line of an exception's message"."""

from __future__ import annotations

import pytest

import batchfinder.cli
import batchfinder.memory.estimate
import batchfinder.memory.tracing
from batchfinder.errors import exception_first_line


class _BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB.\nGPU 0 has a total capacity of 8 GiB"), "CUDA out of memory. Tried to allocate 2.00 MiB."),
        (ValueError("\n\n  indented first line  \nsecond"), "indented first line"),
        (RuntimeError(b"bytes message\nmore"), "bytes message"),
        (RuntimeError(), ""),
        (RuntimeError(""), ""),
        (_BrokenStr("from args\nsecond"), "from args"),
        (KeyError("missing"), "missing"),
    ],
)
def test_first_line(exc: BaseException, expected: str) -> None:
    assert exception_first_line(exc) == expected


def test_the_library_uses_the_one_helper() -> None:
    for module in (batchfinder.memory.estimate, batchfinder.memory.tracing, batchfinder.cli):
        assert module.exception_first_line is exception_first_line, module.__name__
