"""Recognising out-of-memory errors of every flavour.

:func:`is_oom_error` answers one question: does this exception mean "the batch did not fit, try a smaller one"?
It checks the exception class first (``torch.OutOfMemoryError``, which is also ``torch.cuda.OutOfMemoryError``)
and then the message text against :data:`OOM_MESSAGES`, walking ``__cause__`` and ``__context__`` so that an
out-of-memory error wrapped by a framework is still recognised. Exceptions whose ``args`` are not a single
string, or whose ``str()`` itself fails, are tolerated.

:func:`is_fatal_device_error` recognises CUDA errors that poison the process's CUDA context (illegal memory
access, device-side assertions). Those are never treated as "does not fit": the search stops and re-raises.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import exception_text

__all__ = [
    "OOM_MESSAGES",
    "is_oom_error",
    "is_ambiguous_oom_error",
    "is_fatal_device_error",
]

#: Message fragments that mean a device (or host) allocation failed, across CUDA, ROCm, XPU, MPS and cuDNN/cuBLAS.
OOM_MESSAGES: tuple[str, ...] = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "HIP out of memory",
    "XPU out of memory",
    "MPS backend out of memory",
    "Invalid buffer size",
    "CUDNN_STATUS_NOT_SUPPORTED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    "UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY",
)

_FATAL_MESSAGES: tuple[str, ...] = (
    "an illegal memory access was encountered",
    "device-side assert triggered",
    "unspecified launch failure",
    "CUDA error: misaligned address",
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and every exception reachable through ``__cause__``/``__context__``, each once."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (current.__cause__, current.__context__):
            if isinstance(linked, BaseException):
                pending.append(linked)


def _matches(exc: BaseException, fragments: tuple[str, ...]) -> bool:
    text = exception_text(exc).lower()
    return any(fragment.lower() in text for fragment in fragments)


def is_oom_error(exc: BaseException) -> bool:
    """Return True when ``exc`` (or an exception it was raised from) is an out-of-memory error.

    >>> is_oom_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB"))
    True
    >>> is_oom_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    False
    """
    for current in _chain(exc):
        if isinstance(current, torch.OutOfMemoryError):
            return True
        if isinstance(current, (KeyboardInterrupt, SystemExit)):
            return False
        if not _matches(current, _FATAL_MESSAGES) and _matches(current, OOM_MESSAGES):
            return True
    return False


def is_fatal_device_error(exc: BaseException) -> bool:
    """Return True for CUDA errors that leave the CUDA context unusable (never "try a smaller batch")."""
    return any(_matches(current, _FATAL_MESSAGES) for current in _chain(exc))


def is_ambiguous_oom_error(exc: BaseException) -> bool:
    """Return True for errors that mean "out of memory" only when a smaller batch of the same model worked.

    ``CUDNN_STATUS_NOT_SUPPORTED`` is what cuDNN raises when no algorithm fits in the memory left for its workspace,
    and also when it supports the layer's configuration at no batch size at all. A trial counts it as out of
    memory; the session's check at a batch of 2 does not, and reports it as an unsupported configuration.
    """
    return any(_matches(current, ("CUDNN_STATUS_NOT_SUPPORTED",)) for current in _chain(exc))
