"""The pure-Python model of PyTorch's CUDA caching allocator (batchfinder/allocator.py), with plain numbers."""

from __future__ import annotations

import ast
import doctest
import itertools
import pickle
import random
import sys
from pathlib import Path

import pytest

from batchfinder.memory import allocator as allocator_module
from batchfinder.memory.allocator import (
    AllocatorOutOfMemory,
    CachingAllocator,
    pool_of,
    round_size,
    segment_size,
)

KiB = 1024
MiB = 1024 * 1024
SOURCE = Path(allocator_module.__file__)


def _blocks(gpu: CachingAllocator) -> list[list[tuple[int, int, bool]]]:
    """Each segment's blocks, in MiB-friendly plain bytes."""
    return [list(info.blocks) for info in gpu.segments()]


def _check_invariants(gpu: CachingAllocator) -> None:
    infos = gpu.segments()
    assert gpu.reserved == sum(info.size for info in infos)
    assert gpu.allocated == sum(size for info in infos for _, size, used in info.blocks if used)
    for info in infos:
        offset = 0
        for start, size, _ in info.blocks:
            assert start == offset and size > 0 and size % 512 == 0
            offset += size
        assert offset == info.size
        for (_, _, used_a), (_, _, used_b) in zip(info.blocks, info.blocks[1:]):
            assert used_a or used_b, "two neighbouring free blocks were not merged"
    if gpu.capacity is not None:
        assert gpu.reserved <= gpu.capacity
    assert gpu.peak_allocated >= gpu.allocated and gpu.peak_reserved >= gpu.reserved


# ------------------------------------------------------------------------------------------------ the helpers

def test_round_size_rounds_up_to_512_bytes() -> None:
    assert [round_size(n) for n in (0, 1, 511, 512, 513, 1024, 1025)] == [512, 512, 512, 512, 1024, 1024, 1536]


def test_pool_choice_at_the_1_mib_boundary() -> None:
    assert pool_of(1) == "small"
    assert pool_of(MiB - 1) == "small"
    assert pool_of(MiB) == "small"
    assert pool_of(MiB + 1) == "large"  # rounds to 1 MiB + 512


def test_segment_sizes_for_small_medium_and_large_requests() -> None:
    assert segment_size(1) == 2 * MiB
    assert segment_size(MiB) == 2 * MiB
    assert segment_size(MiB + 1) == 20 * MiB
    assert segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB - 1) == 10 * MiB  # rounds to 10 MiB first: no longer below kMinLargeAlloc
    assert segment_size(10 * MiB) == 10 * MiB
    assert segment_size(11 * MiB + 1) == 12 * MiB
    assert segment_size(12 * MiB) == 12 * MiB


def test_malloc_obtains_those_segments() -> None:
    small = CachingAllocator(None)
    small.malloc(1)
    assert (small.allocated, small.reserved) == (512, 2 * MiB)

    medium = CachingAllocator(None)
    medium.malloc(3 * MiB)
    assert (medium.allocated, medium.reserved) == (3 * MiB, 20 * MiB)

    large = CachingAllocator(None)
    handle = large.malloc(11 * MiB + 1)
    # The remainder, 1 MiB - 512, is too small to split in the large pool: the block holds the whole segment.
    assert large.block_size(handle) == 12 * MiB
    assert (large.allocated, large.reserved) == (12 * MiB, 12 * MiB)


# ------------------------------------------------------------------------------------------- reuse and best fit

def test_free_then_malloc_of_the_same_size_reuses_the_block() -> None:
    gpu = CachingAllocator(None)
    first = gpu.malloc(3 * MiB)
    gpu.free(first)
    assert (gpu.allocated, gpu.reserved) == (0, 20 * MiB)
    second = gpu.malloc(3 * MiB)
    assert second != first  # handles are never reused
    assert (gpu.allocated, gpu.reserved) == (3 * MiB, 20 * MiB)
    assert _blocks(gpu) == [[(0, 3 * MiB, True), (3 * MiB, 17 * MiB, False)]]


def test_best_fit_chooses_the_smallest_adequate_block() -> None:
    gpu = CachingAllocator(None)
    handles = [gpu.malloc(n * MiB) for n in (12, 16, 14)]  # one segment each, exactly that size
    for handle in handles:
        gpu.free(handle)
    assert gpu.reserved == 42 * MiB
    assert gpu.block_size(gpu.malloc(13 * MiB)) == 14 * MiB  # not 16 MiB (remainder 1 MiB: not split)
    assert gpu.block_size(gpu.malloc(11 * MiB)) == 12 * MiB
    assert gpu.block_size(gpu.malloc(15 * MiB)) == 16 * MiB
    assert gpu.reserved == 42 * MiB


def test_best_fit_ties_go_to_the_lowest_address() -> None:
    gpu = CachingAllocator(None)
    a, b = gpu.malloc(12 * MiB), gpu.malloc(12 * MiB)
    gpu.free(b)
    gpu.free(a)
    gpu.malloc(12 * MiB)
    assert _blocks(gpu) == [[(0, 12 * MiB, True)], [(0, 12 * MiB, False)]]


# ---------------------------------------------------------------------------------------------------- splitting

def test_small_pool_splits_a_512_byte_remainder() -> None:
    gpu = CachingAllocator(None)
    gpu.malloc(MiB)
    gpu.malloc(MiB - 512)  # leaves exactly 512 B of the 2 MiB segment
    assert _blocks(gpu) == [[(0, MiB, True), (MiB, MiB - 512, True), (2 * MiB - 512, 512, False)]]
    last = gpu.malloc(100)
    assert gpu.block_size(last) == 512
    assert (gpu.allocated, gpu.reserved) == (2 * MiB, 2 * MiB)


def test_large_pool_does_not_split_a_remainder_of_exactly_1_mib() -> None:
    gpu = CachingAllocator(None)
    handle = gpu.malloc(19 * MiB)  # a 20 MiB segment, remainder 1 MiB
    assert gpu.block_size(handle) == 20 * MiB
    assert gpu.allocated == 20 * MiB
    assert _blocks(gpu) == [[(0, 20 * MiB, True)]]


def test_large_pool_splits_a_remainder_of_1_mib_plus_512() -> None:
    gpu = CachingAllocator(None)
    handle = gpu.malloc(19 * MiB - 512)  # a 20 MiB segment, remainder 1 MiB + 512
    assert gpu.block_size(handle) == 19 * MiB - 512
    assert gpu.allocated == 19 * MiB - 512
    assert _blocks(gpu) == [[(0, 19 * MiB - 512, True), (19 * MiB - 512, MiB + 512, False)]]


# ------------------------------------------------------------------------------------------------------ merging

@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_freed_neighbours_merge_in_any_order(order: tuple[int, ...]) -> None:
    gpu = CachingAllocator(20 * MiB)
    handles = [gpu.malloc(4 * MiB) for _ in range(3)]  # 4 + 4 + 4 MiB and an 8 MiB free remainder
    assert _blocks(gpu) == [[(0, 4 * MiB, True), (4 * MiB, 4 * MiB, True), (8 * MiB, 4 * MiB, True),
                             (12 * MiB, 8 * MiB, False)]]
    for index in order:
        gpu.free(handles[index])
        _check_invariants(gpu)
    assert _blocks(gpu) == [[(0, 20 * MiB, False)]]
    whole = gpu.malloc(20 * MiB)  # fits only in the merged block: the capacity allows no second segment
    assert gpu.block_size(whole) == 20 * MiB
    assert gpu.reserved == 20 * MiB


def test_two_freed_neighbours_serve_a_request_neither_could() -> None:
    gpu = CachingAllocator(20 * MiB)
    a, b, c = (gpu.malloc(6 * MiB) for _ in range(3))
    gpu.free(b)
    gpu.free(a)
    handle = gpu.malloc(12 * MiB)
    assert _blocks(gpu) == [[(0, 12 * MiB, True), (12 * MiB, 6 * MiB, True), (18 * MiB, 2 * MiB, False)]]
    assert gpu.block_size(handle) == 12 * MiB and gpu.reserved == 20 * MiB


# ------------------------------------------------------------------------------------------ out of memory

def _fragmented(capacity: int = 60 * MiB) -> tuple[CachingAllocator, list[int]]:
    """Three 20 MiB segments, each six 3 MiB blocks and a 2 MiB free tail; every other block then freed."""
    gpu = CachingAllocator(capacity)
    handles = [gpu.malloc(3 * MiB) for _ in range(18)]
    assert gpu.reserved == 60 * MiB and len(gpu.segments()) == 3
    for handle in handles[::2]:
        gpu.free(handle)
    return gpu, handles[1::2]


def test_fragmentation_raises_out_of_memory_far_below_capacity() -> None:
    gpu, _ = _fragmented()
    assert (gpu.allocated, gpu.reserved) == (27 * MiB, 60 * MiB)  # 33 MiB cached, in 3 MiB and 2 MiB holes
    with pytest.raises(AllocatorOutOfMemory) as caught:
        gpu.malloc(4 * MiB)
    error = caught.value
    assert (error.requested, error.allocation_size) == (4 * MiB, 20 * MiB)
    assert (error.allocated, error.reserved, error.capacity) == (27 * MiB, 60 * MiB, 60 * MiB)
    assert str(error) == (
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 60.00 MiB of which "
        "0 bytes is free. Of the allocated memory 27.00 MiB is allocated by PyTorch, and 33.00 MiB is reserved by "
        "PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
    )
    assert isinstance(error, RuntimeError)
    assert pickle.loads(pickle.dumps(error)).args == error.args
    # Nothing changed, and a request that fits a hole still succeeds.
    assert (gpu.allocated, gpu.reserved) == (27 * MiB, 60 * MiB)
    gpu.malloc(3 * MiB)
    assert (gpu.allocated, gpu.reserved) == (30 * MiB, 60 * MiB)


def test_out_of_memory_message_reports_figures_after_the_release() -> None:
    gpu = CachingAllocator(64 * MiB)
    gpu.malloc(40 * MiB)
    hole = gpu.malloc(3 * MiB)  # a 20 MiB segment
    gpu.malloc(MiB)  # a 2 MiB small segment, half free
    gpu.free(hole)
    assert gpu.reserved == 62 * MiB
    # A 24 MiB segment: 62 + 24 > 64; the wholly free 20 MiB segment is released; 42 + 24 > 64 still.
    with pytest.raises(AllocatorOutOfMemory, match=r"Tried to allocate 24\.00 MiB\. GPU 0 has a total capacity of "
                       r"64\.00 MiB of which 22\.00 MiB is free\. Of the allocated memory 41\.00 MiB is allocated by "
                       r"PyTorch, and 1024\.00 KiB is reserved by PyTorch but unallocated\."):  # PyTorch's format_size
        gpu.malloc(23 * MiB)
    assert (gpu.allocated, gpu.reserved) == (41 * MiB, 42 * MiB)


def test_failed_segment_request_releases_the_cache_and_retries() -> None:
    gpu = CachingAllocator(40 * MiB)
    gpu.free(gpu.malloc(12 * MiB))  # a wholly free 12 MiB segment, large pool, stream 0
    gpu.free(gpu.malloc(512, stream=1))  # a wholly free 2 MiB segment, small pool, stream 1
    assert gpu.reserved == 14 * MiB
    handle = gpu.malloc(30 * MiB)  # 14 + 30 > 40: both cached segments are released, then it fits
    assert gpu.block_size(handle) == 30 * MiB
    assert (gpu.allocated, gpu.reserved) == (30 * MiB, 30 * MiB)
    assert gpu.peak_reserved == 30 * MiB  # reserved never went over the capacity
    assert len(gpu.segments()) == 1


def test_empty_cache_releases_only_wholly_free_segments() -> None:
    gpu = CachingAllocator(None)
    gpu.malloc(3 * MiB)  # a 20 MiB segment that stays partly used
    gpu.free(gpu.malloc(18 * MiB))  # too big for the 17 MiB free tail: an 18 MiB segment, then wholly free
    gpu.free(gpu.malloc(100))  # a 2 MiB small segment, wholly free
    assert (gpu.allocated, gpu.reserved) == (3 * MiB, 40 * MiB)
    gpu.empty_cache()
    assert (gpu.allocated, gpu.reserved) == (3 * MiB, 20 * MiB)
    assert _blocks(gpu) == [[(0, 3 * MiB, True), (3 * MiB, 17 * MiB, False)]]


# ------------------------------------------------------------------------------------ statistics and streams

def test_peaks_and_reset_peak() -> None:
    gpu = CachingAllocator(None)
    a = gpu.malloc(3 * MiB)
    b = gpu.malloc(5 * MiB)
    gpu.free(a)
    gpu.free(b)
    assert (gpu.allocated, gpu.peak_allocated, gpu.reserved, gpu.peak_reserved) == (0, 8 * MiB, 20 * MiB, 20 * MiB)
    gpu.empty_cache()
    assert (gpu.reserved, gpu.peak_reserved) == (0, 20 * MiB)
    gpu.malloc(1)
    gpu.reset_peak()
    assert (gpu.peak_allocated, gpu.peak_reserved) == (512, 2 * MiB)


def test_mem_get_info_is_capacity_minus_reserved() -> None:
    gpu = CachingAllocator(100 * MiB)
    assert gpu.mem_get_info() == (100 * MiB, 100 * MiB)
    gpu.malloc(KiB)
    assert gpu.mem_get_info() == (98 * MiB, 100 * MiB)
    with pytest.raises(RuntimeError, match="capacity"):
        CachingAllocator(None).mem_get_info()


def test_streams_do_not_share_cached_blocks() -> None:
    gpu = CachingAllocator(None)
    gpu.free(gpu.malloc(3 * MiB, stream=0))
    gpu.malloc(3 * MiB, stream=1)
    assert gpu.reserved == 40 * MiB
    assert [(info.stream, info.blocks[0][2]) for info in gpu.segments()] == [(0, False), (1, True)]
    gpu.malloc(3 * MiB, stream=0)  # stream 0's cached block serves stream 0
    assert gpu.reserved == 40 * MiB


def test_zero_byte_requests_hold_nothing() -> None:
    gpu = CachingAllocator(MiB)
    handle = gpu.malloc(0)
    assert handle == 0
    assert (gpu.allocated, gpu.reserved, gpu.block_size(handle)) == (0, 0, 0)
    gpu.free(handle)
    gpu.free(handle)  # like cudaFree(nullptr)


def test_unknown_and_double_frees_raise() -> None:
    gpu = CachingAllocator(None)
    handle = gpu.malloc(KiB)
    gpu.free(handle)
    with pytest.raises(ValueError, match=f"handle {handle}"):
        gpu.free(handle)
    with pytest.raises(ValueError, match="handle 12345"):
        gpu.free(12345)
    with pytest.raises(ValueError, match="handle"):
        gpu.block_size(handle)
    assert (gpu.allocated, gpu.reserved) == (0, 2 * MiB)


def test_invalid_arguments_name_the_argument() -> None:
    for capacity in (0, -MiB):
        with pytest.raises(ValueError, match="capacity"):
            CachingAllocator(capacity)
    for wrong in ("64MiB", 1.5, True):
        with pytest.raises(TypeError, match="capacity"):
            CachingAllocator(wrong)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expandable_segments"):
        CachingAllocator(MiB, expandable_segments=1)  # type: ignore[arg-type]
    gpu = CachingAllocator(MiB)
    with pytest.raises(ValueError, match="nbytes"):
        gpu.malloc(-1)
    with pytest.raises(TypeError, match="nbytes"):
        gpu.malloc(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="stream"):
        gpu.malloc(1, stream="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="handle"):
        gpu.free(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nbytes"):
        round_size(-1)
    with pytest.raises(TypeError, match="rounded"):
        segment_size("1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- expandable segments

def test_expandable_segments_map_pages_into_one_growing_segment() -> None:
    gpu = CachingAllocator(None, expandable_segments=True)
    gpu.malloc(3 * MiB)
    assert gpu.reserved == 20 * MiB  # one 20 MiB page of the large pool
    gpu.malloc(22 * MiB)  # the 17 MiB free tail grows by one page (not two, as 22 MiB alone would need)
    assert gpu.reserved == 40 * MiB
    assert _blocks(gpu) == [[(0, 3 * MiB, True), (3 * MiB, 22 * MiB, True), (25 * MiB, 15 * MiB, False)]]
    gpu.malloc(100)
    assert gpu.reserved == 42 * MiB  # the small pool maps 2 MiB pages, in its own segment
    assert [(info.pool, info.size, info.expandable) for info in gpu.segments()] == [
        ("large", 40 * MiB, True), ("small", 2 * MiB, True)]


def test_expandable_segments_split_any_remainder() -> None:
    gpu = CachingAllocator(None, expandable_segments=True)
    assert gpu.block_size(gpu.malloc(19 * MiB)) == 19 * MiB  # the default configuration gives 20 MiB
    assert gpu.allocated == 19 * MiB


def test_expandable_best_fit_keeps_the_growable_tail_for_last() -> None:
    gpu = CachingAllocator(None, expandable_segments=True)
    a, b, c = gpu.malloc(3 * MiB), gpu.malloc(10 * MiB), gpu.malloc(5 * MiB)  # a 2 MiB free tail is left
    gpu.free(b)
    gpu.malloc(2 * MiB)  # the tail is the smallest fit, but it can grow: the 10 MiB hole serves instead
    assert _blocks(gpu) == [[(0, 3 * MiB, True), (3 * MiB, 2 * MiB, True), (5 * MiB, 8 * MiB, False),
                             (13 * MiB, 5 * MiB, True), (18 * MiB, 2 * MiB, False)]]


def test_expandable_segments_avoid_a_fragmentation_out_of_memory() -> None:
    def run(gpu: CachingAllocator) -> int:
        a, b, c, d = gpu.malloc(6 * MiB), gpu.malloc(14 * MiB), gpu.malloc(6 * MiB), gpu.malloc(14 * MiB)
        gpu.free(b)
        gpu.free(c)  # b ends one 20 MiB segment and c starts the next: apart by default, adjacent when expandable
        return gpu.malloc(20 * MiB)

    with pytest.raises(AllocatorOutOfMemory):
        run(CachingAllocator(40 * MiB))
    gpu = CachingAllocator(40 * MiB, expandable_segments=True)
    assert gpu.block_size(run(gpu)) == 20 * MiB
    assert (gpu.allocated, gpu.reserved) == (40 * MiB, 40 * MiB)


def test_expandable_empty_cache_unmaps_whole_free_pages() -> None:
    gpu = CachingAllocator(None, expandable_segments=True)
    a = gpu.malloc(3 * MiB)
    gpu.free(gpu.malloc(18 * MiB))
    assert gpu.reserved == 40 * MiB
    gpu.empty_cache()  # [3 MiB, 40 MiB) is free: the page [20 MiB, 40 MiB) goes back
    assert (gpu.allocated, gpu.reserved) == (3 * MiB, 20 * MiB)
    assert _blocks(gpu) == [[(0, 3 * MiB, True), (3 * MiB, 17 * MiB, False)]]
    gpu.free(a)
    gpu.empty_cache()
    assert (gpu.reserved, gpu.segments()) == (0, [])
    gpu.malloc(MiB + 512)
    assert gpu.reserved == 20 * MiB


def test_expandable_unmapped_hole_is_mapped_again() -> None:
    gpu = CachingAllocator(60 * MiB, expandable_segments=True)
    a, b, c = (gpu.malloc(20 * MiB) for _ in range(3))
    gpu.free(b)
    gpu.empty_cache()
    assert gpu.reserved == 40 * MiB
    infos = gpu.segments()  # the mapped ranges on either side of the hole
    assert [(info.size, info.blocks) for info in infos] == [(20 * MiB, ((0, 20 * MiB, True),))] * 2
    assert infos[1].address - infos[0].address == 40 * MiB
    gpu.malloc(20 * MiB)
    assert gpu.reserved == 60 * MiB
    assert _blocks(gpu) == [[(0, 20 * MiB, True), (20 * MiB, 20 * MiB, True), (40 * MiB, 20 * MiB, True)]]


def test_expandable_out_of_memory_when_no_whole_page_is_free() -> None:
    gpu = CachingAllocator(40 * MiB, expandable_segments=True)
    gpu.malloc(30 * MiB)  # maps two 20 MiB pages; [30 MiB, 40 MiB) is free but no whole page
    with pytest.raises(AllocatorOutOfMemory, match=r"Tried to allocate 12\.00 MiB.* 30\.00 MiB is allocated.*"
                       r" 10\.00 MiB is reserved by PyTorch but unallocated"):
        gpu.malloc(11 * MiB)
    assert (gpu.allocated, gpu.reserved) == (30 * MiB, 40 * MiB)


# ------------------------------------------------------------------------------------------- random sequences

@pytest.mark.parametrize("expandable", [False, True])
def test_random_sequences_keep_the_books_straight(expandable: bool) -> None:
    rng = random.Random(1234)
    gpu = CachingAllocator(200 * MiB, expandable_segments=expandable)
    live: list[int] = []
    ooms = 0
    for step in range(1500):
        action = rng.random()
        if action < 0.55 or not live:
            size = rng.choice([rng.randrange(0, 4 * KiB), rng.randrange(0, 2 * MiB), rng.randrange(MiB, 30 * MiB)])
            try:
                live.append(gpu.malloc(size, stream=rng.randrange(2)))
            except AllocatorOutOfMemory as error:
                ooms += 1
                assert error.reserved == gpu.reserved and error.allocated == gpu.allocated
        elif action < 0.97:
            gpu.free(live.pop(rng.randrange(len(live))))
        else:
            gpu.empty_cache()
        _check_invariants(gpu)
        assert gpu.allocated == sum(gpu.block_size(h) for h in live)
    assert ooms > 0  # the sequence does reach the capacity
    for handle in live:
        gpu.free(handle)
    gpu.empty_cache()
    assert (gpu.allocated, gpu.reserved, gpu.segments()) == (0, 0, [])


# ------------------------------------------------------------------------------------------------ the module

def test_module_imports_no_torch_and_nothing_from_the_package() -> None:
    tree = ast.parse(SOURCE.read_text())
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import from the package"
            imported.append(node.module or "")
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            assert name not in {"__import__", "import_module"}, "dynamic import"
    assert imported, "the reader found no imports at all"
    for name in imported:
        top = name.split(".")[0]
        assert top != "torch" and top != "batchfinder", name
        assert top == "__future__" or top in sys.stdlib_module_names, f"{name} is not in the standard library"


def test_module_docstring_example_runs() -> None:
    assert "Known limitations" in (CachingAllocator.__doc__ or "")
    results = doctest.testmod(allocator_module, verbose=False)
    assert results.attempted >= 4 and results.failed == 0


def test_a_per_process_limit_bounds_reserved_bytes_below_the_capacity():
    """``set_per_process_memory_fraction``: checked, like ``allowed_memory_maximum`` in ``alloc_block``, only when a
    new segment is needed; cached blocks still serve requests."""
    gpu = CachingAllocator(64 * MiB)
    gpu.limit = 30 * MiB
    small = gpu.malloc(3 * MiB)  # a 20 MiB segment
    with pytest.raises(AllocatorOutOfMemory):
        gpu.malloc(18 * MiB)  # no cached block holds it; an 18 MiB segment: 38 MiB reserved > 30 MiB
    gpu.free(small)
    again = gpu.malloc(5 * MiB)  # from the cached 20 MiB segment
    assert gpu.reserved == 20 * MiB and gpu.block_size(again) == 5 * MiB
    gpu.limit = None
    gpu.malloc(18 * MiB)
    assert gpu.reserved == 38 * MiB
    with pytest.raises(TypeError):
        gpu.limit = 1.5  # type: ignore[assignment]
