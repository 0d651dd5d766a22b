"""Exceptions the search raises for outcomes that are not programming errors."""

from __future__ import annotations

__all__ = ["BatchFinderError", "NoBatchSizeFitsError", "SearchIncompleteError"]


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
