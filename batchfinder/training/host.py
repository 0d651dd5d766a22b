"""Host-side work: what runs inside :func:`host_side_loading` stands for data loading and collation on the host,
so that no simulated device or memory trace charges it.

A small base module: the batch builders, the optimizer factory, the state snapshot and the trial runner mark their
host-side work with it, and the memory ledger (:mod:`batchfinder.memory.accounting`) reads it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["host_side_loading", "loading_on_host"]

_loading = threading.local()


def loading_on_host() -> bool:
    """True inside :func:`host_side_loading` on this thread."""
    return getattr(_loading, "depth", 0) > 0


@contextlib.contextmanager
def host_side_loading() -> Iterator[None]:
    """Within this block nothing is charged: it stands for host-side data loading and collation."""
    _loading.depth = getattr(_loading, "depth", 0) + 1
    try:
        yield
    finally:
        _loading.depth -= 1
