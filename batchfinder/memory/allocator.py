"""A pure-Python model of PyTorch's CUDA caching allocator in its default configuration.

The model follows the rules of ``c10/cuda/CUDACachingAllocator.cpp`` (written afresh from those rules, stdlib
only, no torch) so that a simulated GPU can show what a real one shows: requests rounded up to 512 B, blocks cut
from 2 MiB / 20 MiB / rounded-up segments, freed blocks kept cached (``reserved`` stays above ``allocated``),
fragmentation, the release-and-retry on a failed segment request, and the out-of-memory message.

Usage (a doctest, run by the tests):

>>> from batchfinder.memory.allocator import AllocatorOutOfMemory, CachingAllocator
>>> gpu = CachingAllocator(64 * 2**20)             # a 64 MiB device; None means unlimited
>>> a = gpu.malloc(3 * 2**20)                      # 3 MiB, cut from a new 20 MiB segment
>>> gpu.allocated, gpu.reserved
(3145728, 20971520)
>>> gpu.free(a); gpu.allocated, gpu.reserved       # a freed block stays cached
(0, 20971520)
>>> b = gpu.malloc(3 * 2**20); gpu.reserved        # served from the cache, no new segment
20971520
>>> try:
...     gpu.malloc(60 * 2**20)                     # 20 MiB reserved + a 60 MiB segment > 64 MiB
... except AllocatorOutOfMemory as exc:
...     print(str(exc)[:48])
CUDA out of memory. Tried to allocate 60.00 MiB.
>>> gpu.free(b); gpu.empty_cache(); gpu.reserved   # wholly free segments go back to the device
0

Handles are opaque positive ints, never reused; ``malloc(0)`` returns the null handle 0, which holds nothing and
whose ``free`` does nothing (CUDA returns and accepts ``nullptr``). ``segments()`` is a snapshot in the spirit of
``torch.cuda.memory_snapshot()``.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

__all__ = [
    "ALLOCATORS",
    "AllocatorOutOfMemory",
    "CachingAllocator",
    "SegmentInfo",
    "MIN_BLOCK_SIZE",
    "SMALL_SIZE",
    "SMALL_BUFFER",
    "LARGE_BUFFER",
    "MIN_LARGE_ALLOC",
    "ROUND_LARGE",
    "NULL_HANDLE",
    "round_size",
    "segment_size",
    "pool_of",
]

_MiB = 1024 * 1024
MIN_BLOCK_SIZE = 512  #: kMinBlockSize: every request is rounded up to a multiple of this.
SMALL_SIZE = _MiB  #: kSmallSize: requests up to this size use the small pool.
SMALL_BUFFER = 2 * _MiB  #: kSmallBuffer: the segment for small requests (and the small pool's expandable page).
LARGE_BUFFER = 20 * _MiB  #: kLargeBuffer: the segment for 1-10 MiB requests (and the large pool's expandable page).
MIN_LARGE_ALLOC = 10 * _MiB  #: kMinLargeAlloc: from this size on, a segment is the request rounded to ROUND_LARGE.
ROUND_LARGE = 2 * _MiB  #: kRoundLarge.

ALLOCATORS = ("caching", "ideal")
"""The allocator models a simulated GPU offers: this caching allocator, or ``"ideal"`` (allocated bytes only)."""

NULL_HANDLE = 0  #: What malloc(0) returns: a handle that holds nothing (CUDA's nullptr).


def _check_bytes(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of bytes, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {value}")
    return value


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def round_size(nbytes: int) -> int:
    """The bytes a request of ``nbytes`` occupies: below 512 B -> 512 B, else up to a multiple of 512 B."""
    _check_bytes(nbytes, "nbytes")
    return MIN_BLOCK_SIZE if nbytes < MIN_BLOCK_SIZE else _round_up(nbytes, MIN_BLOCK_SIZE)


def pool_of(rounded: int) -> str:
    """``"small"`` for requests up to 1 MiB, else ``"large"`` (the argument is rounded first; rounding is idempotent)."""
    _check_bytes(rounded, "rounded")
    return "small" if round_size(rounded) <= SMALL_SIZE else "large"


def segment_size(rounded: int) -> int:
    """Bytes of the segment obtained when no cached block serves a request (rounded first, like ``round_size``).

    Up to 1 MiB -> 2 MiB; below 10 MiB -> 20 MiB; otherwise the request rounded up to a multiple of 2 MiB.
    """
    _check_bytes(rounded, "rounded")
    size = round_size(rounded)
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return _round_up(size, ROUND_LARGE)


def _format_size(nbytes: int) -> str:
    """Bytes as PyTorch's ``format_size`` writes them: ``512 bytes``, ``1024.00 KiB``, ``20.00 MiB``, ``1.50 GiB``."""
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    if nbytes <= _MiB:
        return f"{nbytes / 1024:.2f} KiB"
    if nbytes <= 1024 * _MiB:
        return f"{nbytes / _MiB:.2f} MiB"
    return f"{nbytes / (1024 * _MiB):.2f} GiB"


class AllocatorOutOfMemory(RuntimeError):
    """No cached block served the request and no segment could be obtained, even after releasing the cache.

    Attributes: ``requested`` (the rounded request), ``allocation_size`` (the segment asked for, which is what
    "Tried to allocate" reports, as in PyTorch), ``allocated``, ``reserved`` and ``capacity`` in bytes.
    """

    def __init__(self, requested: int, allocation_size: int, allocated: int, reserved: int, capacity: int) -> None:
        self.requested = requested
        self.allocation_size = allocation_size
        self.allocated = allocated
        self.reserved = reserved
        self.capacity = capacity
        super().__init__(
            f"CUDA out of memory. Tried to allocate {_format_size(allocation_size)}. GPU 0 has a total capacity of "
            f"{_format_size(capacity)} of which {_format_size(capacity - reserved)} is free. Of the allocated memory "
            f"{_format_size(allocated)} is allocated by PyTorch, and {_format_size(reserved - allocated)} is reserved "
            "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
        )

    def __reduce__(self) -> tuple[type, tuple[int, int, int, int, int]]:
        return type(self), (self.requested, self.allocation_size, self.allocated, self.reserved, self.capacity)


@dataclass(frozen=True)
class SegmentInfo:
    """One segment (for expandable segments: one contiguous mapped range) and its blocks.

    ``blocks`` are ``(offset, size, allocated)`` from the segment's start, in address order; their sizes add up to
    ``size``. ``address`` is the model's virtual address of the segment's start (segments are listed by it).
    """

    pool: str
    stream: int
    size: int
    blocks: tuple[tuple[int, int, bool], ...]
    address: int
    expandable: bool = False


class _Segment:
    __slots__ = ("pool", "stream", "base", "size", "expandable", "page", "first")

    def __init__(self, pool: str, stream: int, base: int, size: int, expandable: bool) -> None:
        self.pool = pool
        self.stream = stream
        self.base = base
        self.size = size  # bytes of address space; for an expandable segment only the mapped part is reserved
        self.expandable = expandable
        self.page = SMALL_BUFFER if pool == "small" else LARGE_BUFFER
        self.first = _Block(self, 0, size, mapped=not expandable)


class _Block:
    __slots__ = ("segment", "offset", "size", "allocated", "mapped", "prev", "next")

    def __init__(self, segment: _Segment, offset: int, size: int, mapped: bool = True) -> None:
        self.segment = segment
        self.offset = offset
        self.size = size
        self.allocated = False
        self.mapped = mapped
        self.prev: _Block | None = None
        self.next: _Block | None = None

    @property
    def address(self) -> int:
        return self.segment.base + self.offset

    @property
    def is_free(self) -> bool:
        """Free and mapped: a cached block that can serve a request."""
        return self.mapped and not self.allocated


class CachingAllocator:
    """PyTorch's CUDA caching allocator on one device, as bookkeeping only (no memory is touched).

    ``capacity`` is the device's memory in bytes (``None``: unlimited, never out of memory); a new segment is
    obtained only while ``reserved + segment <= capacity``. ``expandable_segments=True`` models
    ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: per stream and pool, segments of address space into
    which pages (2 MiB in the small pool, 20 MiB in the large pool, as in PyTorch) are mapped on demand, blocks
    always split when the remainder is >= 512 B, and releasing the cache unmaps every whole free page.

    Known limitations (what the model does not do):

    * one device only, no CUDA context, no cuBLAS/cuDNN workspaces and nothing else outside the allocator; the
      capacity is all the allocator's, and memory used by other processes is not modelled;
    * no CUDA graph private pools, no ``record_stream`` (cross-stream uses and their events), no
      ``garbage_collection_threshold``, ``max_split_size_mb`` or ``roundup_power2_divisions``;
      ``set_per_process_memory_fraction`` is :attr:`limit`, a second bound on ``reserved`` next to ``capacity``;
    * no driver-side effects: ``cudaMalloc`` granularity, driver fragmentation of physical memory and failures
      other than "does not fit" are not modelled; segment addresses are the model's own, increasing;
    * with expandable segments, a request whose pages cannot all be mapped maps none of them (PyTorch may map
      some before failing), and an expandable segment's address space is 9/8 of the capacity (1 PiB if unlimited).
    """

    def __init__(self, capacity: int | None, *, expandable_segments: bool = False) -> None:
        if capacity is not None:
            if isinstance(capacity, bool) or not isinstance(capacity, int):
                raise TypeError(f"capacity must be an int number of bytes or None, not {type(capacity).__name__}")
            if capacity <= 0:
                raise ValueError(f"capacity must be a positive number of bytes, got {capacity}")
        if not isinstance(expandable_segments, bool):
            raise TypeError(f"expandable_segments must be a bool, not {type(expandable_segments).__name__}")
        self._capacity = capacity
        self._limit: int | None = None
        self._expandable = expandable_segments
        self._segments: dict[int, _Segment] = {}  # by base address, in increasing address order
        self._free: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (pool, stream) -> sorted (size, address)
        self._free_blocks: dict[int, _Block] = {}  # address -> free mapped block
        self._live: dict[int, _Block] = {}  # handle -> allocated block
        self._next_handle = 1
        self._next_address = 1 << 32
        self._allocated = 0
        self._reserved = 0
        self._peak_allocated = 0
        self._peak_reserved = 0

    # ----------------------------------------------------------------------------------------------- public API

    @property
    def capacity(self) -> int | None:
        """The device's bytes, or ``None`` for unlimited."""
        return self._capacity

    @property
    def limit(self) -> int | None:
        """The per-process bound on ``reserved`` (``set_per_process_memory_fraction``: ``int(fraction * total)``,
        checked, as ``alloc_block`` checks ``allowed_memory_maximum``, only when a new segment is needed), or None."""
        return self._limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        if value is not None:
            _check_bytes(value, "limit")
        self._limit = value

    @property
    def expandable_segments(self) -> bool:
        """Whether this allocator models ``expandable_segments:True``."""
        return self._expandable

    @property
    def allocated(self) -> int:
        """Bytes in live blocks (block sizes, as ``torch.cuda.memory_allocated``)."""
        return self._allocated

    @property
    def reserved(self) -> int:
        """Bytes in segments (mapped pages for expandable segments), as ``torch.cuda.memory_reserved``."""
        return self._reserved

    @property
    def peak_allocated(self) -> int:
        """Highest ``allocated`` since creation or the last ``reset_peak``."""
        return self._peak_allocated

    @property
    def peak_reserved(self) -> int:
        """Highest ``reserved`` since creation or the last ``reset_peak``."""
        return self._peak_reserved

    def reset_peak(self) -> None:
        """Set both peaks back to the current values (``torch.cuda.reset_peak_memory_stats``)."""
        self._peak_allocated = self._allocated
        self._peak_reserved = self._reserved

    def mem_get_info(self) -> tuple[int, int]:
        """``(capacity - reserved, capacity)``, as ``torch.cuda.mem_get_info`` with nothing else on the device."""
        if self._capacity is None:
            raise RuntimeError("mem_get_info needs a capacity; this allocator was created with capacity=None")
        return self._capacity - self._reserved, self._capacity

    def malloc(self, nbytes: int, stream: int = 0) -> int:
        """Allocate ``nbytes`` on ``stream`` and return a handle; raise :class:`AllocatorOutOfMemory` if it cannot."""
        _check_bytes(nbytes, "nbytes")
        _check_int(stream, "stream")
        if nbytes == 0:
            return NULL_HANDLE
        size = round_size(nbytes)
        pool = pool_of(size)
        block = self._take_free_block(pool, stream, size)
        if block is None:
            block = self._obtain(pool, stream, size)
            if block is None:
                self._release_cached()
                block = self._obtain(pool, stream, size)
            if block is None:
                capacity = self._capacity if self._capacity is not None else self._limit
                assert capacity is not None  # an unlimited allocator always obtains a segment
                raise AllocatorOutOfMemory(size, segment_size(size), self._allocated, self._reserved, capacity)
        if self._should_split(pool, block.size - size):
            self._add_free(self._split(block, size))
        block.allocated = True
        self._allocated += block.size
        self._peak_allocated = max(self._peak_allocated, self._allocated)
        handle = self._next_handle
        self._next_handle += 1
        self._live[handle] = block
        return handle

    def free(self, handle: int) -> None:
        """Return a block to the cache, merging it with free neighbours; the null handle 0 is ignored."""
        block = self._live_block(handle)
        if block is None:
            return
        del self._live[handle]
        block.allocated = False
        self._allocated -= block.size
        self._add_free(self._merge_free_neighbours(block))

    def empty_cache(self) -> None:
        """Release every wholly free segment (and, with expandable segments, every whole free page)."""
        self._release_cached()

    def block_size(self, handle: int) -> int:
        """Bytes the handle's block holds: the rounded request, or more when the remainder was too small to split."""
        block = self._live_block(handle)
        return 0 if block is None else block.size

    def segments(self) -> list[SegmentInfo]:
        """A snapshot of every segment and its blocks, in address order."""
        result: list[SegmentInfo] = []
        for segment in self._segments.values():
            run: list[_Block] = []
            block: _Block | None = segment.first
            while block is not None:
                if block.mapped:
                    run.append(block)
                if run and (not block.mapped or block.next is None):
                    start = run[0].offset
                    blocks = tuple((b.offset - start, b.size, b.allocated) for b in run)
                    result.append(SegmentInfo(segment.pool, segment.stream, sum(b.size for b in run), blocks,
                                              segment.base + start, segment.expandable))
                    run = []
                block = block.next
        return result

    def __repr__(self) -> str:
        return (f"CachingAllocator(capacity={self._capacity}, allocated={self._allocated}, "
                f"reserved={self._reserved}, expandable_segments={self._expandable})")

    # -------------------------------------------------------------------------------------------- the free index

    def _add_free(self, block: _Block) -> None:
        insort(self._free.setdefault((block.segment.pool, block.segment.stream), []), (block.size, block.address))
        self._free_blocks[block.address] = block

    def _remove_free(self, block: _Block) -> None:
        entries = self._free[(block.segment.pool, block.segment.stream)]
        del entries[bisect_left(entries, (block.size, block.address))]
        del self._free_blocks[block.address]

    def _take_free_block(self, pool: str, stream: int, size: int) -> _Block | None:
        """Best fit: the smallest cached block of the pool and stream that holds ``size`` (ties: lowest address).

        With expandable segments, a block followed by unmapped address space counts as that much bigger, so the
        end of a segment is used only when no other block fits (it stays free to grow).
        """
        entries = self._free.get((pool, stream), [])
        index = bisect_left(entries, (size, -1))
        if index == len(entries):
            return None
        block = self._free_blocks[entries[index][1]]
        if self._expandable:
            while index + 1 < len(entries):
                following = self._free_blocks[entries[index + 1][1]]
                if self._growable_size(following) >= self._growable_size(block):
                    break
                block, index = following, index + 1
        self._remove_free(block)
        return block

    @staticmethod
    def _growable_size(block: _Block) -> int:
        after = block.next
        return block.size + (after.size if after is not None and not after.mapped else 0)

    # ------------------------------------------------------------------------------------ splitting and merging

    def _should_split(self, pool: str, remaining: int) -> bool:
        if pool == "small" or self._expandable:
            return remaining >= MIN_BLOCK_SIZE
        return remaining > SMALL_SIZE

    @staticmethod
    def _split(block: _Block, size: int) -> _Block:
        """Cut ``block`` to ``size`` bytes; return the new block after it (same mapped state, not allocated)."""
        tail = _Block(block.segment, block.offset + size, block.size - size, mapped=block.mapped)
        tail.prev, tail.next = block, block.next
        if block.next is not None:
            block.next.prev = tail
        block.next = tail
        block.size = size
        return tail

    @staticmethod
    def _absorb(low: _Block, high: _Block) -> _Block:
        """Merge ``high`` (the next block) into ``low``."""
        low.size += high.size
        low.next = high.next
        if high.next is not None:
            high.next.prev = low
        return low

    def _merge_free_neighbours(self, block: _Block) -> _Block:
        """Merge a free mapped block that is not in the index with its free mapped neighbours (taken out of it)."""
        if block.prev is not None and block.prev.is_free:
            self._remove_free(block.prev)
            block = self._absorb(block.prev, block)
        if block.next is not None and block.next.is_free:
            self._remove_free(block.next)
            block = self._absorb(block, block.next)
        return block

    # ---------------------------------------------------------------------------------------- obtaining memory

    def _fits(self, extra: int) -> bool:
        if self._limit is not None and self._reserved + extra > self._limit:
            return False
        return self._capacity is None or self._reserved + extra <= self._capacity

    def _grow_reserved(self, extra: int) -> None:
        self._reserved += extra
        self._peak_reserved = max(self._peak_reserved, self._reserved)

    def _obtain(self, pool: str, stream: int, size: int) -> _Block | None:
        """A free block of at least ``size`` bytes from new memory (not in the index), or None if it does not fit."""
        if self._expandable:
            return self._obtain_expandable(pool, stream, size)
        nbytes = segment_size(size)
        if not self._fits(nbytes):
            return None
        segment = self._new_segment(pool, stream, nbytes, expandable=False)
        self._grow_reserved(nbytes)
        return segment.first

    def _new_segment(self, pool: str, stream: int, nbytes: int, *, expandable: bool) -> _Segment:
        segment = _Segment(pool, stream, self._next_address, nbytes, expandable)
        self._segments[segment.base] = segment
        self._next_address = _round_up(self._next_address + nbytes, ROUND_LARGE)
        return segment

    def _obtain_expandable(self, pool: str, stream: int, size: int) -> _Block | None:
        """Map pages into the lowest run of free and unmapped space that can hold ``size`` (a new segment if none)."""
        candidate = self._expandable_candidate(pool, stream, size)
        if candidate is None:
            page = SMALL_BUFFER if pool == "small" else LARGE_BUFFER
            space = (1 << 50) if self._capacity is None else self._capacity + self._capacity // 8
            candidate = self._new_segment(pool, stream, _round_up(space, page), expandable=True).first
        page = candidate.segment.page
        to_map, have = 0, 0  # first the bytes to map, so that nothing is mapped if they do not fit
        scan: _Block | None = candidate
        while scan is not None and not scan.allocated and have < size:
            taken = scan.size if scan.mapped else min(_round_up(size - have, page), scan.size)
            to_map += 0 if scan.mapped else taken
            have += taken
            scan = scan.next
        if have < size or not self._fits(to_map):
            return None
        if candidate.mapped:
            self._remove_free(candidate)
        else:
            self._map_pages(candidate, size)
            candidate = self._merge_free_neighbours(candidate)
        while candidate.size < size:  # free -> unmapped -> ...: map the next pages and take them in
            piece = candidate.next
            assert piece is not None and not piece.mapped
            self._map_pages(piece, size - candidate.size)
            candidate = self._merge_free_neighbours(self._absorb(candidate, piece))
        return candidate

    def _expandable_candidate(self, pool: str, stream: int, size: int) -> _Block | None:
        """The lowest unmapped block (or the free block before it) that starts a free run of ``size`` bytes."""
        for segment in self._segments.values():
            if not segment.expandable or segment.pool != pool or segment.stream != stream:
                continue
            block: _Block | None = segment.first
            while block is not None:
                if not block.mapped:
                    start = block.prev if block.prev is not None and block.prev.is_free else block
                    if self._run_bytes(start, size) >= size:
                        return start
                block = block.next
        return None

    @staticmethod
    def _run_bytes(start: _Block, size: int) -> int:
        """Bytes of the run of free and unmapped blocks from ``start``, counted until they reach ``size``."""
        room = 0
        scan: _Block | None = start
        while scan is not None and not scan.allocated and room < size:
            room, scan = room + scan.size, scan.next
        return room

    def _map_pages(self, block: _Block, nbytes: int) -> None:
        """Map the whole pages that cover the first ``nbytes`` of an unmapped block (the rest stays unmapped)."""
        mapped = min(_round_up(nbytes, block.segment.page), block.size)
        if mapped < block.size:
            self._split(block, mapped)
        block.mapped = True
        self._grow_reserved(mapped)

    # ------------------------------------------------------------------------------------------ releasing memory

    def _release_cached(self) -> None:
        """Release wholly free segments; unmap the whole free pages of expandable segments (release_cached_blocks)."""
        for segment in list(self._segments.values()):
            if segment.expandable:
                self._unmap_free_pages(segment)
                first = segment.first
                if first.next is None and not first.mapped:
                    del self._segments[segment.base]
            elif segment.first.next is None and not segment.first.allocated:
                self._remove_free(segment.first)
                del self._segments[segment.base]
                self._reserved -= segment.size

    def _unmap_free_pages(self, segment: _Segment) -> None:
        free_blocks: list[_Block] = []
        block: _Block | None = segment.first
        while block is not None:
            if block.is_free:
                free_blocks.append(block)
            block = block.next
        for block in free_blocks:
            begin = _round_up(block.offset, segment.page)
            end = (block.offset + block.size) // segment.page * segment.page
            if end <= begin:
                continue
            self._remove_free(block)
            middle = block
            if begin > block.offset:
                middle = self._split(block, begin - block.offset)
                self._add_free(block)
            if end < middle.offset + middle.size:
                self._add_free(self._split(middle, end - middle.offset))
            middle.mapped = False
            self._reserved -= middle.size
            if middle.prev is not None and not middle.prev.mapped:
                middle = self._absorb(middle.prev, middle)
            if middle.next is not None and not middle.next.mapped:
                self._absorb(middle, middle.next)

    def _live_block(self, handle: int) -> _Block | None:
        _check_int(handle, "handle")
        if handle == NULL_HANDLE:
            return None
        block = self._live.get(handle)
        if block is None:
            raise ValueError(f"handle {handle} is not a live allocation (never returned by malloc, or already freed)")
        return block
