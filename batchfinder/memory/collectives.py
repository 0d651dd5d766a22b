"""Collectives (``torch.distributed``) charged as a CUDA GPU with NCCL holds them, also when they run over gloo.

A sharded model's trials run FSDP2's collectives; on the CPU they run over gloo, which allocates buffers of its own
that NCCL on a CUDA GPU does not. gloo's reduce-scatter (``_reduce_scatter_base``, behind FSDP2's
``reduce_scatter_single``) reduces a *clone* of its input with an all-reduce and, in the work's ``wait()`` on the
calling thread, copies this rank's chunk of the clone into the output (``ProcessGroupGloo::
reduce_scatter_tensor_coalesced``, ``torch/csrc/distributed/c10d/ProcessGroupGloo.cpp``). The clone is made inside
the collective's own operation, where no dispatch mode sees it, so the chunk taken in ``wait()`` (an ``aten.split``)
would charge it as a storage read for the first time: as large as the unit's reduce-scatter input, charged and freed
after every unit's reduce-scatter, where the prediction (a fake process group, whose collectives move nothing,
:mod:`batchfinder.memory.sharding`) charges nothing. NCCL reduce-scatters from the input into the output and
allocates nothing in PyTorch's caching allocator (``ProcessGroupNCCL::_reduce_scatter_base``), so while a charging
mode is active a work's ``wait()`` runs as host-side work (:func:`~batchfinder.training.host.host_side_loading`):
nothing in it is charged (the output it writes was charged when it was made).

Not modelled: gloo's worker thread drops its reference to a finished work (and with it the work's references to
its collective's input and output) a moment after the work completes, unsynchronised with the main thread, so that
on gloo a storage may be freed an operation or two later than where the program dropped it, from one run to the
next (``ProcessGroupGloo::runLoop``).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

__all__ = ["WAIT_HOOK"]


class _WaitHook:
    """While a charging mode is active, every ``Work.wait()`` runs as host-side work (see the module
    documentation)."""

    def __init__(self) -> None:
        self._users = 0
        self._lock = threading.Lock()
        self._original: Any = None

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            if self._users > 1 or not torch.distributed.is_available():
                return
            from torch._C._distributed_c10d import Work

            from ..training.host import host_side_loading

            original = Work.wait
            self._original = original

            def wait(work: Any, *args: Any, **kwargs: Any) -> Any:
                with host_side_loading():
                    return original(work, *args, **kwargs)

            Work.wait = wait  # type: ignore[method-assign]

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._original is not None:
                from torch._C._distributed_c10d import Work

                Work.wait = self._original  # type: ignore[method-assign]
                self._original = None


WAIT_HOOK = _WaitHook()
