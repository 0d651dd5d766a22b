"""Worst-case batches: which samples of a data set are the largest, found cheaply.

When the samples of a data set differ in size (token sequences of different lengths, images of different
resolutions, a varying number of objects per image), a batch of ``B`` samples that fits does not say that every
batch of ``B`` fits: a shuffled epoch soon draws one with the longest samples. A trial of size ``B`` therefore runs on
the ``B`` largest samples, collated with the user's ``collate_fn`` (so padding to the longest is what the model
sees), which bounds every batch of ``B`` the loader can produce, shuffled, bucketed or not.

:func:`scan_sizes` finds them:

1. It looks at a spread of ``PROBE_SAMPLES`` items (the first, the last and evenly spaced ones), then at up to
   ``FIXED_CHECK_SAMPLES`` more in a private random order for at most ``FIXED_CHECK_SECONDS`` while all have the
   same shapes (a ``TensorDataset``'s
   always do: it stops after the probe). When all have the same shapes the data is taken as fixed-size: batches are
   the first ``B`` samples, as for any fixed-size data.
2. Otherwise it measures every sample's size, in a private random order, until it has seen them all or
   ``budget`` seconds have passed, and orders the samples largest first. A partial scan is reported and warned
   about: a sample it did not see may be larger.

The size of a sample is the number of elements of its tensors (and arrays, and numbers in nested lists; characters
of strings), unless the user gives ``sample_size``: a callable ``index -> number`` or a sequence with one number per
sample (a length column they already have), which is then used for every sample without loading any.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["DataScan", "SampleSize", "scan_sizes", "shapes_differ_further", "element_count", "check_scan_budget", "DEFAULT_SCAN_BUDGET"]

logger = logging.getLogger(__name__)

DEFAULT_SCAN_BUDGET = 10.0
"""Seconds the scan of a variable-size data set may take by default."""
PROBE_SAMPLES = 64
"""Items looked at first to decide whether sample sizes vary."""
FIXED_CHECK_SECONDS = 0.25
"""How long more samples are looked at, at most, when the probe's all have the same shapes."""
FIXED_CHECK_SAMPLES = 1_024
"""How many more samples are looked at, at most, when the probe's all have the same shapes (a kind of sample that
makes up 0.3% of the data set is among them 19 times in 20)."""

SampleSize = Callable[[int], float] | Sequence[float]
"""``sample_size``: a callable ``index -> number`` or one number per sample."""


@dataclass(frozen=True)
class DataScan:
    """What the search learned about the sizes of the data set's samples (``SearchResult.data_scan``)."""

    total: int
    """Samples in the data set."""
    scanned: int
    """Samples whose size was measured (all of them when :attr:`complete`)."""
    varies: bool
    """True when the sizes seen differ: trials then run on the largest samples."""
    largest_size: float
    """The largest size seen (elements, or the unit of ``sample_size``)."""
    largest_index: int
    """The index of that sample."""
    smallest_size: float
    measure: str
    """``"elements"`` (the tensors' element counts) or ``"sample_size"`` (the user's sizes)."""
    seconds: float
    """Time the scan took."""

    @property
    def complete(self) -> bool:
        """True when every sample's size was measured (or sizes do not vary)."""
        return self.scanned >= self.total or not self.varies

    @property
    def unit(self) -> str:
        return "elements" if self.measure == "elements" else "(sample_size)"

    def describe(self) -> str:
        """One line, e.g. ``scanned 20,000 of 1,000,000 samples in 10.0 s (partial); largest 512 elements
        (sample 4,211), smallest 12: trials use the largest samples``."""
        if not self.varies:
            return (
                f"samples are fixed-size ({_number(self.largest_size)} {self.unit} each in the "
                f"{format_count(self.scanned)} looked at of {format_count(self.total)}): trials use the first samples"
            )
        partial = "" if self.complete else " (partial: a sample not scanned may be larger)"
        return (
            f"scanned {format_count(self.scanned)} of {format_count(self.total)} samples in {self.seconds:.1f} s"
            f"{partial}; largest {_number(self.largest_size)} {self.unit} (sample {format_count(self.largest_index)}), "
            f"smallest {_number(self.smallest_size)}: trials use the largest samples"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}


def format_count(count: int) -> str:
    return f"{count:,}"


def _number(value: float) -> str:
    return format_count(int(value)) if float(value).is_integer() else f"{value:,.4g}"


# -- sizes ------------------------------------------------------------------------------------------------------------
def element_count(sample: Any) -> int:
    """Elements of a sample: tensors' and arrays' element counts, numbers in (nested) lists, characters of strings,
    pixels times bands of a PIL image; summed over tuples, lists and dict values."""
    if isinstance(sample, torch.Tensor):
        return sample.numel()
    if isinstance(sample, (str, bytes)):
        return len(sample)
    if isinstance(sample, Mapping):
        return sum(element_count(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        if sample and isinstance(sample[0], numbers.Number) and isinstance(sample[-1], numbers.Number):
            return len(sample)  # a flat list of numbers (token ids): no need to look at each
        return sum(element_count(v) for v in sample)
    size = getattr(sample, "size", None)
    if isinstance(size, int) and hasattr(sample, "shape"):  # NumPy arrays
        return size
    if isinstance(size, tuple) and len(size) == 2 and hasattr(sample, "getbands"):  # PIL images
        return size[0] * size[1] * len(sample.getbands())
    return 1 if isinstance(sample, numbers.Number) else 0


def _shapes(sample: Any) -> Any:
    """A hashable description of a sample's shapes (what makes two samples collate to the same shapes)."""
    if isinstance(sample, torch.Tensor):
        return tuple(sample.shape)
    if isinstance(sample, (str, bytes)):
        return ("str", len(sample))
    if isinstance(sample, Mapping):
        return tuple((str(k), _shapes(v)) for k, v in sample.items())
    if isinstance(sample, (list, tuple)):
        if sample and isinstance(sample[0], numbers.Number):
            return ("list", len(sample))
        return tuple(_shapes(v) for v in sample)
    shape = getattr(sample, "shape", None)
    if isinstance(shape, tuple):
        return shape
    size = getattr(sample, "size", None)
    if isinstance(size, tuple):
        return size
    return type(sample).__name__


def check_scan_budget(scan_budget: Any) -> float:
    """``scan_budget`` as seconds; a ``TypeError``/``ValueError`` naming it unless it is a positive number."""
    if isinstance(scan_budget, bool) or not isinstance(scan_budget, numbers.Real):
        raise TypeError(f"scan_budget must be a number of seconds (e.g. 10), not {type(scan_budget).__name__}")
    if not math.isfinite(scan_budget) or scan_budget <= 0:
        raise ValueError(f"scan_budget={scan_budget!r} must be a positive, finite number of seconds (e.g. 10)")
    return float(scan_budget)


def _checked_size(value: Any, index: int, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"sample_size must give a number for every sample, but {where} is {type(value).__name__} ({value!r:.60})"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"sample_size must give a non-negative, finite number for every sample, but {where} is {value!r}")
    return float(value)


def _check_sample_size(sample_size: Any, total: int) -> None:
    if callable(sample_size):
        return
    if isinstance(sample_size, (str, bytes, Mapping)) or not hasattr(sample_size, "__len__") or not hasattr(
        sample_size, "__getitem__"
    ):
        raise TypeError(
            "sample_size must be a callable index -> number or a sequence with one number per sample (e.g. a list of "
            f"lengths), not {type(sample_size).__name__}"
        )
    if len(sample_size) != total:
        raise ValueError(
            f"sample_size has {len(sample_size):,} entries but the data set has {total:,} samples: give one size per "
            "sample, in the data set's index order"
        )


# -- the scan ---------------------------------------------------------------------------------------------------------
def _probe_indices(total: int) -> list[int]:
    if total <= PROBE_SAMPLES:
        return list(range(total))
    return sorted({(i * (total - 1)) // (PROBE_SAMPLES - 1) for i in range(PROBE_SAMPLES)})


_ORDER_CHUNK = 4_096


def _private_permutation(total: int) -> torch.Tensor:
    """Every index in a fixed pseudo-random order (a private generator: the user's random state is not touched)."""
    generator = torch.Generator().manual_seed(0x5EED)
    return torch.randperm(total, generator=generator)


def scan_sizes(
    load: Callable[[int], Any],
    total: int,
    *,
    sample_size: SampleSize | None = None,
    budget: float = DEFAULT_SCAN_BUDGET,
    probe_only: bool = False,
    fixed_check: float | None = FIXED_CHECK_SECONDS,
) -> tuple[DataScan, list[int] | None]:
    """Find the largest samples of a data set of ``total`` items that ``load(index)`` returns.

    Returns the :class:`DataScan` and the indices largest first (``None`` when the sizes do not vary: batches are
    then the first samples). After a partial scan the samples not scanned follow the scanned ones in index order.
    ``probe_only``: samples are known to share their shapes when the probe's do (a ``TensorDataset``).
    ``fixed_check``: seconds to go on looking while every shape is the same (None: ``FIXED_CHECK_SAMPLES`` more
    samples, at most ``FIXED_CHECK_SECONDS``; the caller may look further with :func:`shapes_differ_further`).
    Raises ``TypeError``/``ValueError`` naming ``sample_size`` or ``scan_budget`` when they are not valid.
    """
    budget = check_scan_budget(budget)
    started = time.perf_counter()
    if sample_size is not None:
        _check_sample_size(sample_size, total)
        sizes: dict[int, float] | None = _user_sizes(sample_size, total, started + budget)
        measure, looked_at = "sample_size", total
    else:
        sizes, looked_at = _measured_sizes(load, total, started + budget, probe_only, fixed_check)
        measure = "elements"
    if sizes is None:
        return _fixed_scan(load, total, started, looked_at), None
    values = set(sizes.values())
    scanned = len(sizes)
    largest_index = min(sizes, key=lambda i: (-sizes[i], i))
    scan = DataScan(
        total=total,
        scanned=scanned,
        varies=len(values) > 1,
        largest_size=sizes[largest_index],
        largest_index=largest_index,
        smallest_size=min(values),
        measure=measure,
        seconds=time.perf_counter() - started,
    )
    if not scan.varies:
        return scan, None
    order = sorted(sizes, key=lambda i: (-sizes[i], i))
    if scanned < total:
        order += [i for i in range(total) if i not in sizes]
        # The user must see it (not only a log record): trials bound only the samples the scan reached.
        warnings.warn(
            f"{scan.describe()}. Pass sample_size= (a length per sample) or a larger scan_budget= to scan them all.",
            UserWarning,
            stacklevel=2,
        )
    else:
        logger.info("%s", scan.describe())
    return scan, order


def _user_sizes(sample_size: SampleSize, total: int, deadline: float) -> dict[int, float]:
    if not callable(sample_size):
        return {i: _checked_size(sample_size[i], i, f"sample_size[{i}]") for i in range(total)}
    sizes: dict[int, float] = {}
    for count, index in enumerate(_scan_order(total)):
        sizes[index] = _checked_size(sample_size(index), index, f"sample_size({index})")
        if count % 256 == 255 and time.perf_counter() >= deadline:
            break
    return sizes


def _scan_order(total: int) -> Iterator[int]:
    """The probe's indices first, then every other index in a private random order (made as it is read: a scan that
    stops early does not pay for the whole order)."""
    probe = _probe_indices(total)
    seen = set(probe)
    yield from probe
    order = _private_permutation(total)
    for start in range(0, total, _ORDER_CHUNK):
        for index in order[start : start + _ORDER_CHUNK].tolist():
            if index not in seen:
                yield index


def _measured_sizes(
    load: Callable[[int], Any], total: int, deadline: float, probe_only: bool, fixed_check: float | None
) -> tuple[dict[int, float] | None, int]:
    """(element counts by index, or None when every sample looked at had the same shapes; samples looked at).

    The probe is always read. While every shape is the same, reading goes on for ``fixed_check`` seconds (None:
    ``FIXED_CHECK_SAMPLES`` more samples, for at most ``FIXED_CHECK_SECONDS``; a rare larger sample among identical
    ones is found when samples are cheap to load); once two differ, until every sample is measured or the deadline
    passes."""
    probe = min(PROBE_SAMPLES, total)
    now = time.perf_counter()
    fixed_deadline = min(deadline, now + (FIXED_CHECK_SECONDS if fixed_check is None else fixed_check))
    fixed_samples = probe + FIXED_CHECK_SAMPLES if fixed_check is None else total
    sizes: dict[int, float] = {}
    shapes: set[Any] = set()
    for index in _scan_order(total):
        sample = load(index)
        sizes[index] = float(element_count(sample))
        if len(shapes) < 2:
            shapes.add(_shapes(sample))
        del sample
        if len(sizes) < probe:
            continue
        if len(shapes) < 2 and (
            probe_only or len(sizes) >= fixed_samples or time.perf_counter() >= fixed_deadline
        ):
            break
        if time.perf_counter() >= deadline:
            break
    return (sizes if len(shapes) > 1 else None), len(sizes)


def shapes_differ_further(load: Callable[[int], Any], total: int, skip: int, seconds: float) -> tuple[bool, int]:
    """Go on looking for a sample whose shapes differ from the first's, past the ``skip`` samples of the scan order
    already looked at, for at most ``seconds``: (whether one was found, samples looked at now)."""
    deadline = time.perf_counter() + seconds
    reference = _shapes(load(0))
    looked = 0
    for index in itertools.islice(_scan_order(total), skip, None):
        looked += 1
        if _shapes(load(index)) != reference:
            return True, looked
        if looked % 64 == 0 and time.perf_counter() >= deadline:
            break
    return False, looked


def _fixed_scan(load: Callable[[int], Any], total: int, started: float, looked_at: int) -> DataScan:
    size = float(element_count(load(0)))
    return DataScan(
        total=total,
        scanned=looked_at,
        varies=False,
        largest_size=size,
        largest_index=0,
        smallest_size=size,
        measure="elements",
        seconds=time.perf_counter() - started,
    )
