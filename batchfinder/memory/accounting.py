"""Storage accounting: what a GPU would hold, measured on the CPU.

:class:`MemoryLedger` charges tensor *storages* (never views: a view of memory that is already charged costs
nothing), each rounded up to 512 bytes as the CUDA caching allocator rounds every request, and releases the charge
when the storage is freed. With a capacity it refuses a charge that would pass it by raising
``torch.OutOfMemoryError`` with a message in the format of CUDA's own; the refused charge is not recorded.

:class:`ChargingMode` is a ``TorchDispatchMode`` that feeds a ledger from every aten operation run inside it:

* every storage an operation *creates* is charged when it is created (activations, temporaries, gradients,
  optimizer state, anything);
* a storage that existed before (or that a DataLoader produced) is charged the first time an operation consumes
  it, as a transfer to the device would be;
* while a DataLoader is producing a batch (host-side loading, collation, pinning) nothing is charged;
* a storage resized in place (``UntypedStorage.resize_``, which FSDP2 uses to free and re-allocate the unsharded
  parameters between all-gathers, ``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``: ``free_storage``,
  ``alloc_storage``) is released at size 0 and charged again when it grows; one charged at a resize and resized to
  0 where no mode saw it (FSDP freeing gathered parameters while a failed trial is recovered from) is released at
  the ledger's next charge or query;
* a ``DTensor`` (a sharded parameter, its gradient or optimizer state) is charged for its local tensor only: what
  this rank holds, not the global tensor its wrapper describes (:func:`local_tensor`);
* nothing a collective's ``Work.wait()`` does is charged: gloo's reduce-scatter (behind FSDP2's
  ``reduce_scatter_single``) reduces a clone of its input, made inside the collective's own operation where no
  dispatch mode sees it, and copies this rank's chunk of it into the output in ``wait()`` on the calling thread
  (``ProcessGroupGloo::reduce_scatter_tensor_coalesced``, ``torch/csrc/distributed/c10d/ProcessGroupGloo.cpp``),
  which would charge the clone as a storage read for the first time. NCCL reduce-scatters from the input into the
  output and allocates nothing in PyTorch's allocator (``ProcessGroupNCCL::_reduce_scatter_base``), nor does the
  prediction's fake process group. (Not modelled: gloo's worker thread drops its reference to a finished
  collective a moment after it completes, so that on gloo a buffer may be freed an operation later than where the
  program dropped it, from one run to the next.)

The same ledger and mode serve the simulated GPU (real CPU tensors) and the memory estimator (fake tensors), which
is why the two agree to the byte.

With an ``allocator`` (a :class:`~batchfinder.memory.allocator.CachingAllocator`) every charge is also a ``malloc`` and every
release a ``free`` in a model of PyTorch's CUDA caching allocator: the ledger then also knows the reserved bytes
(segments obtained from the driver), and a charge fails where the real allocator would fail (on reserved memory,
fragmentation included), not merely where allocated bytes pass the capacity.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..training.host import host_side_loading, loading_on_host
from ..training.state import deferred_interrupts
from ..units import format_bytes
from .allocator import MIN_BLOCK_SIZE, AllocatorOutOfMemory, CachingAllocator

__all__ = [
    "round_allocation",
    "MemoryLedger",
    "ChargingMode",
    "tensor_storages",
    "local_tensor",
]

def round_allocation(nbytes: int) -> int:
    """Bytes a storage of ``nbytes`` occupies in the CUDA caching allocator: rounded up to a multiple of
    ``kMinBlockSize`` (:data:`~batchfinder.memory.allocator.MIN_BLOCK_SIZE`); 0 stays 0 (no request is made)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE


class MemoryLedger:
    """Charged bytes per live storage, the running total and its peak, against an optional capacity."""

    def __init__(
        self,
        capacity: int | None = None,
        *,
        device_label: str = "GPU 0",
        allocator: CachingAllocator | None = None,
        workspace_bytes: int = 0,
    ) -> None:
        self.capacity = capacity
        self.device_label = device_label
        self.allocator = allocator
        self.workspace_bytes = workspace_bytes
        """cuBLAS workspace charged at the first matrix multiply of the forward and of the backward pass (0: none)."""
        self.workspaces: dict[str, torch.Tensor] = {}
        """The workspaces charged so far, by pass (``"forward"``, ``"backward"``); they live as long as the ledger,
        as cuBLAS keeps its workspaces for the life of the process."""
        self._handles: dict[int, int] = {}  # token -> the allocator's block handle
        # id(storage) -> token. A freed storage's entry goes at the next settling (below), before any lookup by id;
        # a plain dict is several times faster than a weak one.
        self._tokens: dict[int, int] = {}
        self._ids: dict[int, int] = {}  # token -> id(storage)
        self._sizes: dict[int, int] = {}  # token -> charged bytes
        # id(weakref) -> (the weakref, token). A storage's weak reference calls ``self._dead.append`` when the storage
        # is freed: a C function, in which no signal handler can run, so a Ctrl-C cannot break it (a Python finalizer
        # that a KeyboardInterrupt hits loses both the interrupt and the accounting). The freed storages are settled
        # at the next query or charge (:meth:`_settle`), with Ctrl-C held back meanwhile, before any lookup by
        # ``id(storage)``: an id can only be reused after its storage was freed, so entries are never confused.
        self._refs: dict[int, tuple[weakref.ref, int]] = {}
        self._dead: list[weakref.ref] = []
        self._ref_ids: dict[int, int] = {}  # token -> id(weakref)
        self._lock = threading.RLock()
        self._resizable: dict[int, weakref.ref] = {}  # token -> the storage charged at a resize (charge_resized)
        self._next_token = 0
        self._allocated = 0
        self.peak = 0

    # -- queries -------------------------------------------------------------------------------------------
    @property
    def allocated(self) -> int:
        """Bytes charged for the live storages."""
        self._catch_up()
        return self._allocated

    def is_charged(self, storage: torch.UntypedStorage) -> bool:
        """True when ``storage`` is currently charged."""
        self._catch_up()
        return id(storage) in self._tokens

    def charged_bytes(self, storage: torch.UntypedStorage) -> int:
        """Bytes charged for ``storage`` (0 when it is not charged)."""
        self._catch_up()
        token = self._tokens.get(id(storage))
        return 0 if token is None else self._sizes.get(token, 0)

    @property
    def reserved(self) -> int:
        """Bytes in the allocator's segments (the charged bytes when there is no allocator)."""
        self._catch_up()
        return self.allocator.reserved if self.allocator is not None else self._allocated

    @property
    def peak_reserved(self) -> int:
        """Peak of :attr:`reserved` since the last :meth:`reset_peak`."""
        return self.allocator.peak_reserved if self.allocator is not None else self.peak

    def reset_peak(self) -> None:
        """Start a new peak measurement at the current total."""
        with self._lock:
            self.peak = self.allocated
            if self.allocator is not None:
                self.allocator.reset_peak()

    def empty_cache(self) -> None:
        """Release the allocator's wholly free cached segments (nothing to do without an allocator)."""
        with self._lock:
            self._catch_up()
            if self.allocator is not None:
                self.allocator.empty_cache()

    # -- charging ------------------------------------------------------------------------------------------
    def charge(self, storages: Iterable[torch.UntypedStorage]) -> int:
        """Charge every storage not charged yet (and the growth of those that are), all or nothing.

        Returns the bytes added. Raises ``torch.OutOfMemoryError`` when the total would pass the capacity; nothing
        is charged then.
        """
        with self._lock:
            self._catch_up()
            pending: dict[int, tuple[torch.UntypedStorage, int, int, int]] = {}
            for storage in storages:
                if id(storage) in pending:
                    continue
                raw = storage.nbytes()
                size = round_allocation(raw)
                delta = size - self.charged_bytes(storage)
                if delta > 0:
                    pending[id(storage)] = (storage, size, delta, raw)
            if not pending:
                return 0
            extra = sum(entry[2] for entry in pending.values())
            if self.allocator is not None:
                entries = list(pending.values())
                handles = self._malloc(self.allocator, [e[1] for e in entries], [e[3] for e in entries])
            elif self.capacity is not None and self._allocated + extra > self.capacity:
                raise torch.OutOfMemoryError(self._oom_message(extra))
            else:
                handles = [None] * len(pending)
            for (storage, size, _, _), handle in zip(pending.values(), handles):
                self._record(storage, size, handle)
            self._allocated += extra
            self.peak = max(self.peak, self._allocated)
            return extra

    def charge_resized(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Charge ``storage`` at ``nbytes`` before it is resized to that size (``torch.OutOfMemoryError`` when it
        does not fit; nothing changes then)."""
        with self._lock:
            self._catch_up()
            size = round_allocation(nbytes)
            delta = size - self.charged_bytes(storage)
            if delta <= 0:
                return
            if self.allocator is not None:
                handle = self._malloc(self.allocator, [size], [nbytes])[0]
            elif self.capacity is not None and self._allocated + delta > self.capacity:
                raise torch.OutOfMemoryError(self._oom_message(delta))
            else:
                handle = None
            self._record(storage, size, handle)
            self._resizable[self._tokens[id(storage)]] = weakref.ref(storage)
            self._allocated += delta
            self.peak = max(self.peak, self._allocated)

    def release(self, storage: torch.UntypedStorage) -> int:
        """Stop charging ``storage`` now (it left the device); returns the bytes released."""
        with self._lock, deferred_interrupts():
            self._catch_up()
            token = self._tokens.pop(id(storage), None)
            if token is None:
                return 0
            self._ids.pop(token, None)
            return self._uncharge(token)

    def charge_workspace(self, kind: str) -> None:
        """Charge the cuBLAS workspace of ``kind`` (``"forward"``: the main thread's handle; ``"backward"``: the
        autograd thread's) unless it is charged already or the ledger has none."""
        if self.workspace_bytes <= 0 or kind in self.workspaces:
            return
        with host_side_loading():
            workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8)
        self.charge([workspace.untyped_storage()])
        self.workspaces[kind] = workspace

    def _malloc(self, allocator: CachingAllocator, sizes: list[int], raws: list[int] | None = None) -> list[int | None]:
        """One block per size from the allocator, all or nothing (blocks of a failed call are freed again).
        ``raws``: the storages' unrounded sizes (for a ledger that logs them)."""
        handles: list[int | None] = []
        try:
            for size in sizes:
                handles.append(allocator.malloc(size))
        except AllocatorOutOfMemory as exc:
            for handle in handles:
                if handle is not None:
                    allocator.free(handle)
            raise torch.OutOfMemoryError(
                str(exc).replace("GPU 0", self.device_label, 1)
                + " (simulated GPU: batchfinder.SimulatedGPU models PyTorch's caching allocator)"
            ) from None
        return handles

    def _free(self, token: int) -> None:
        handle = self._handles.pop(token, None)
        if handle is not None and self.allocator is not None:
            self.allocator.free(handle)

    def _record(self, storage: torch.UntypedStorage, size: int, handle: int | None = None) -> None:
        token = self._tokens.get(id(storage))
        if token is not None:
            self._free(token)  # a storage that grew: its new block replaces the old one, as a resize would
            self._sizes[token] = size
            if handle is not None:
                self._handles[token] = handle
            return
        token = self._next_token
        self._next_token += 1
        self._tokens[id(storage)] = token
        self._ids[token] = id(storage)
        self._sizes[token] = size
        if handle is not None:
            self._handles[token] = handle
        ref = weakref.ref(storage, self._dead.append)
        self._refs[id(ref)] = (ref, token)
        self._ref_ids[token] = id(ref)

    def forget_storages(self) -> None:
        """Stop watching the storages charged so far: their frees are no longer accounted (a recording of real
        tensors that outlive it)."""
        with self._lock:
            self._refs.clear()
            self._ref_ids.clear()
            self._dead.clear()

    def settle(self) -> None:
        """Account for the storages freed since the last call now (every query and charge does it first)."""
        self._catch_up()

    def _catch_up(self) -> None:
        """Account for the storages freed, and those resized to 0 bytes outside a charging mode, since the last
        call."""
        if self._dead:
            self._settle()
        if self._resizable:
            self._release_emptied()

    def _release_emptied(self) -> None:
        """Release the storages charged at a resize (:meth:`charge_resized`) that were resized to 0 bytes where no
        charging mode saw it: FSDP2 frees a unit's gathered parameters so (``free_storage`` in
        ``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``) also while a failed trial is recovered from, and a
        GPU's allocator gets those bytes back then."""
        with self._lock, deferred_interrupts():
            for token, ref in list(self._resizable.items()):
                storage = ref()
                if storage is None or self._ids.get(token) != id(storage):
                    del self._resizable[token]
                elif storage.nbytes() == 0:
                    del self._resizable[token]
                    del self._tokens[id(storage)]
                    del self._ids[token]
                    self._uncharge(token)

    def _settle(self) -> None:
        """Account for the storages freed since the last call, with Ctrl-C held back until the books agree."""
        with self._lock, deferred_interrupts():
            while self._dead:
                entry = self._refs.get(id(self._dead[-1]))
                if entry is not None and entry[0] is self._dead[-1]:
                    self._freed(entry[1])  # (drops the entry)
                self._dead.pop()

    def _uncharge(self, token: int) -> int:
        """Release ``token``'s block and bytes; returns the bytes."""
        self._refs.pop(self._ref_ids.pop(token, -1), None)
        self._free(token)
        size = self._sizes.pop(token, 0)
        self._allocated -= size
        return size

    def _freed(self, token: int) -> None:
        """The storage of ``token`` was freed."""
        key = self._ids.pop(token, None)
        if key is not None and self._tokens.get(key) == token:
            del self._tokens[key]
        self._uncharge(token)

    def _oom_message(self, request: int) -> str:
        capacity = self.capacity or 0
        free = max(capacity - self._allocated, 0)
        return (
            f"CUDA out of memory. Tried to allocate {format_bytes(request)}. {self.device_label} has a total capacity "
            f"of {format_bytes(capacity)} of which {format_bytes(free)} is free. Of the allocated memory "
            f"{format_bytes(self._allocated)} is allocated by PyTorch, and 0 bytes is reserved by PyTorch but "
            "unallocated. (simulated GPU: batchfinder.SimulatedGPU charges what a real GPU would hold)"
        )


# -- host-side work: what some methods do is never charged ---------------------------------------------------
class _HostSideMethod:
    """While installed (by every active :class:`ChargingMode`), the method ``name`` of the class ``owner()`` returns
    runs inside :func:`host_side_loading` (nothing in it is charged); nothing is installed when it returns None."""

    def __init__(self, owner: Callable[[], type | None], name: str) -> None:
        self._owner = owner
        self._name = name
        self._users = 0
        self._lock = threading.Lock()
        self._original: Any = None

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            cls = self._owner() if self._users == 1 else None
            if cls is None:
                return
            original = getattr(cls, self._name)
            self._original = original

            def host_side(*args: Any, **kwargs: Any) -> Any:
                with host_side_loading():
                    return original(*args, **kwargs)

            setattr(cls, self._name, host_side)

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._original is not None:
                setattr(self._owner(), self._name, self._original)
                self._original = None


def _dataloader_iterator() -> type:
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    return _BaseDataLoaderIter


def _work() -> type | None:
    """``torch.distributed``'s work class (None without ``torch.distributed``)."""
    if not torch.distributed.is_available():
        return None
    from torch._C._distributed_c10d import Work

    return Work


_DATALOADER_HOOK = _HostSideMethod(_dataloader_iterator, "__next__")
"""Every ``DataLoader`` iterator produces its batches as host-side work."""
_WAIT_HOOK = _HostSideMethod(_work, "wait")
"""A collective's ``Work.wait()`` charges nothing (see the module documentation)."""


class _ResizeHook:
    """While a :class:`ChargingMode` is active, ``UntypedStorage.resize_`` (not an aten operation, so no dispatch
    mode sees it) tells the innermost active mode's ledger: a storage resized to 0 bytes is released, one that grew
    is charged (an out-of-memory error then leaves the storage as it was)."""

    def __init__(self) -> None:
        self.ledgers: list[MemoryLedger] = []
        self._lock = threading.Lock()
        self._original: Any = None

    def acquire(self, ledger: MemoryLedger) -> None:
        with self._lock:
            self.ledgers.append(ledger)
            if self._original is not None:
                return
            original = torch.UntypedStorage.resize_
            self._original = original
            ledgers = self.ledgers

            def resize_(storage: torch.UntypedStorage, size: int) -> Any:
                ledger = ledgers[-1] if ledgers and not loading_on_host() else None
                if ledger is not None and size > storage.nbytes():
                    ledger.charge_resized(storage, size)
                result = original(storage, size)
                if ledger is not None and size == 0:
                    ledger.release(storage)
                return result

            torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]

    def release(self, ledger: MemoryLedger) -> None:
        with self._lock:
            for index in range(len(self.ledgers) - 1, -1, -1):
                if self.ledgers[index] is ledger:
                    del self.ledgers[index]
                    break
            if not self.ledgers and self._original is not None:
                del torch.UntypedStorage.resize_  # the method UntypedStorage inherits shows through again
                self._original = None


_RESIZE_HOOK = _ResizeHook()


def tensor_storages(tree: Any) -> list[torch.UntypedStorage]:
    """The storages of every strided tensor in a nested structure (lists, tuples, dicts)."""
    storages: list[torch.UntypedStorage] = []
    _collect_storages(tree, storages)
    return storages


_STRIDED = torch.strided


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage this rank holds: a ``DTensor``'s local shard (``DTensor._local_tensor``; the wrapper's
    own storage describes the global tensor and holds no data), any other tensor itself."""
    cls = type(tensor)
    if cls in _PLAIN:
        return tensor
    local = getattr(tensor, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return local
    _PLAIN.add(cls)  # a tensor class without a local tensor (a fake tensor): not looked up again
    return tensor


_PLAIN: set[type] = {torch.Tensor, torch.nn.Parameter}


def _collect_storages(value: Any, storages: list[torch.UntypedStorage]) -> None:
    # Hand-rolled rather than pytree's flatten: this runs for every operation of a trace (twice), where pytree's
    # generality costs a sixth of the trace's time. Other containers (named tuples, dataclasses) go through pytree.
    if isinstance(value, torch.Tensor):
        if type(value) not in _PLAIN:
            value = local_tensor(value)  # a DTensor's local shard
        if value.layout == _STRIDED:
            try:
                storages.append(value.untyped_storage())
            except (RuntimeError, NotImplementedError):  # tensors without a storage of their own
                pass
    elif type(value) in (list, tuple):
        for item in value:
            if not isinstance(item, (int, float, bool, str)) and item is not None:
                _collect_storages(item, storages)
    elif type(value) is dict:
        for item in value.values():
            _collect_storages(item, storages)
    elif isinstance(value, (int, float, bool, str, torch.dtype, torch.device)) or value is None:
        return
    else:
        leaves = tree_flatten(value)[0]
        if len(leaves) != 1 or leaves[0] is not value:
            for leaf in leaves:
                _collect_storages(leaf, storages)


_GEMMS = frozenset(
    getattr(torch.ops.aten, name)
    for name in ("mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "_addmm_activation")
)
"""Operations that run on cuBLAS (and so create its workspace on first use)."""


class ChargingMode(TorchDispatchMode):
    """Charges a :class:`MemoryLedger` for every storage that aten operations create or consume."""

    def __init__(self, ledger: MemoryLedger) -> None:
        super().__init__()
        self.ledger = ledger

    def __enter__(self) -> "ChargingMode":
        _DATALOADER_HOOK.acquire()
        _RESIZE_HOOK.acquire(self.ledger)
        _WAIT_HOOK.acquire()
        try:
            return super().__enter__()
        except BaseException:
            _WAIT_HOOK.release()
            _RESIZE_HOOK.release(self.ledger)
            _DATALOADER_HOOK.release()
            raise

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            _WAIT_HOOK.release()
            _RESIZE_HOOK.release(self.ledger)
            _DATALOADER_HOOK.release()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if loading_on_host():
            return func(*args, **kwargs)
        if self.ledger.workspace_bytes and func.overloadpacket in _GEMMS:
            self.ledger.charge_workspace("backward" if torch._C._current_autograd_node() is not None else "forward")
        consumed = tensor_storages((args, kwargs))
        if consumed:
            self.ledger.charge(consumed)
        out = func(*args, **kwargs)
        produced = tensor_storages(out)
        if produced:
            self.ledger.charge(produced)
        return out
