"""Building real batches of any size from a user's dataset or DataLoader.

A :class:`BatchSource` accepts any map-style ``Dataset`` (``TensorDataset``, torchvision datasets, user classes)
or a ``DataLoader`` (its dataset, ``collate_fn`` and sampler are used). Samples may be a tensor, a tuple/list
``(input, target, ...)`` or a dict of tensors (or anything the loader's ``collate_fn`` turns into tensors).

Batches are built host-side. For fixed-size data a batch of ``B`` is the first ``B`` samples; when sample sizes
vary it is the ``B`` largest samples (:mod:`batchfinder.training.sample_sizes`), the worst case of every batch of ``B`` the
loader can produce. :meth:`BatchSource.loader_batches` gives batches in the order the user's loader yields them (for
the confirmation run). Samples are cached in host memory (up to a budget) so that repeated trials do not reload them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, Protocol

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)
from torch.utils.data._utils.collate import default_collate, default_convert

from ..errors import set_note
from .host import host_side_loading
from .state import preserved_rng
from .sample_sizes import (
    DEFAULT_SCAN_BUDGET,
    FIXED_CHECK_SECONDS,
    DataScan,
    SampleSize,
    scan_sizes,
    shapes_differ_further,
)

__all__ = ["BatchSource", "EvaluationBatches", "TrainingBatches", "describe_batch", "sample_bytes", "is_supported_sample", "plain_containers"]

logger = logging.getLogger(__name__)

_CACHE_BUDGET_BYTES = 2 * 1024**3


def sample_bytes(sample: Any) -> int:
    """Unrounded bytes of the tensors in a sample or batch (nested tuples, lists and dicts); other values count 0."""
    if isinstance(sample, torch.Tensor):
        return sample.numel() * sample.element_size()
    if isinstance(sample, Mapping):
        return sum(sample_bytes(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        return sum(sample_bytes(v) for v in sample)
    return 0


def _is_array_like(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or type(value).__module__.split(".")[0] == "numpy"


def _sample_problem(sample: Any) -> str | None:
    """Why ``sample`` cannot be batched (None when it can): a tensor, a dict with tensors, or a tuple/list whose
    first element is a tensor (or NumPy array)."""
    if _is_array_like(sample):
        return None
    if isinstance(sample, Mapping):
        if sample and any(_is_array_like(v) for v in sample.values()):
            return None
        return "dataset[0] is a dict without tensors; dict samples must map argument names of model.forward to tensors"
    if isinstance(sample, (tuple, list)):
        if sample and _is_array_like(sample[0]):
            return None
        first = type(sample[0]).__name__ if sample else "nothing"
        return (
            f"dataset[0] is a {type(sample).__name__} whose first element is {first}, not a tensor: samples must be "
            "(input_tensor, target, ...). For image datasets add transforms.ToTensor() to the dataset's transform."
        )
    return (
        f"unsupported sample type {type(sample).__name__} (dataset[0]): samples must be a tensor, a tuple/list "
        "(input, target, ...) or a dict of tensors. For PIL images add transforms.ToTensor(); for anything else "
        "pass a DataLoader with a collate_fn that returns tensors."
    )


def is_supported_sample(sample: Any) -> bool:
    """True for a tensor, a dict with tensors, or a tuple/list whose first element is a tensor (or NumPy array)."""
    return _sample_problem(sample) is None


def _check_sample(sample: Any) -> None:
    problem = _sample_problem(sample)
    if problem is not None:
        raise TypeError(problem)


class EvaluationBatches(Protocol):
    """Where an evaluation search's batches come from: what the engine and a trial read of a batch source.

    :class:`BatchSource` is the one for a dataset or a ``DataLoader``; front ends adapt their own loaders to it
    (:mod:`batchfinder.lightning.sources`).
    """

    length: int
    """The number of samples: no batch is larger."""

    @property
    def scan(self) -> DataScan | None:
        """What the scan of the sample sizes found (``SearchResult.data_scan``)."""

    @property
    def varies(self) -> bool:
        """True when sample sizes vary: batches are then the largest samples."""

    @property
    def largest_index(self) -> int:
        """The index of the largest sample seen (0 for fixed-size data)."""

    def batch(self, batch_size: int) -> Any:
        """A host-side batch of ``batch_size`` samples: the worst case of that size when sizes vary."""


class TrainingBatches(EvaluationBatches, Protocol):
    """Where a training search's batches come from: an :class:`EvaluationBatches` that also gives batches in the
    loader's order (the confirmation run), single samples and their collation (the memory estimator), and the
    deferred check of fixed-size data."""

    def loader_batches(self, batch_size: int, count: int) -> list[Any]:
        """The first ``count`` batches of ``batch_size`` in the order the user's loader yields them."""

    def sample(self, index: int) -> Any:
        """Sample ``index`` of the data."""

    def collate(self, samples: list[Any]) -> Any:
        """Samples collated into a batch, as the user's loader does it."""

    def look_further(self, seconds: float) -> bool:
        """After a search: go on looking for a sample of other shapes for up to ``seconds``; True when one turned
        up (the search must run again on the largest samples)."""

    def rescan(self) -> None:
        """Scan the sample sizes again, as for data whose sizes vary."""


class BatchSource:
    """Real batches of a requested size from a dataset (or a DataLoader's dataset, collate function and sampler).

    ``sample_size`` and ``scan_budget`` control how the largest samples are found (see
    :func:`~batchfinder.training.sample_sizes.scan_sizes`); :attr:`scan` says what was found.
    """

    def __init__(
        self,
        data: Dataset | DataLoader | Any,
        *,
        sample_size: SampleSize | None = None,
        scan_budget: float = DEFAULT_SCAN_BUDGET,
        defer_fixed_check: bool = False,
    ) -> None:
        collate: Callable[[list[Any]], Any] = default_collate
        dataset = data
        self.loader = data if isinstance(data, DataLoader) else None
        if isinstance(data, DataLoader):
            dataset = data.dataset
            if data.collate_fn is not default_convert:
                collate = data.collate_fn
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "dataset is an IterableDataset: batch sizes are searched over map-style datasets (with __getitem__ "
                "and __len__); wrap a few thousand samples in a list or TensorDataset"
            )
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"dataset must be a map-style Dataset or a DataLoader (with __getitem__ and __len__), "
                f"not {type(dataset).__name__}"
            )
        length = len(dataset)
        if length == 0:
            raise ValueError("dataset is empty: the search needs at least one sample to build batches from")
        self.dataset = dataset
        self.collate = collate
        self.length = length
        self._cache: dict[int, Any] = {}
        self._fixed_bytes: int | None = None
        self.order: list[int] | None = None
        self._cached_bytes = 0
        with host_side_loading(), preserved_rng():  # an augmenting dataset draws random numbers: not the user's
            first = self.sample(0)
            if self.collate is default_collate:
                _check_sample(first)
            probe_only = isinstance(dataset, TensorDataset)
            self.scan, self.order = scan_sizes(
                self._load, length, sample_size=sample_size, budget=scan_budget, probe_only=probe_only,
                fixed_check=None if defer_fixed_check else FIXED_CHECK_SECONDS,
            )
        self._scan_budget = scan_budget
        self._fixed_bytes = sample_bytes(first) if self.order is None else None
        self._looked_at: int | None = None
        """Samples the deferred check of fixed-size data has looked at (None: nothing left to check)."""
        if defer_fixed_check and sample_size is None and not probe_only and self.order is None:
            self._looked_at = self.scan.scanned if self.scan.scanned < length else None
        if self.collate is not default_collate:
            with host_side_loading(), preserved_rng():
                _check_sample_or_collated(first, self.collate)

    def look_further(self, seconds: float) -> bool:
        """With ``defer_fixed_check``: go on looking for a sample of other shapes than the rest, for at most
        ``seconds`` (once). True when one turned up: the data set is then scanned as variable-size data (trials run
        on the largest samples) and the batches of any earlier trial were not the worst case."""
        if self._looked_at is None or seconds <= 0:
            return False
        skip, self._looked_at = self._looked_at, None
        with host_side_loading(), preserved_rng():
            found, looked = shapes_differ_further(self._load, self.length, skip, seconds)
        if not found:
            self.scan = dataclasses.replace(self.scan, scanned=self.scan.scanned + looked)
            return False
        self.rescan()
        return True

    def rescan(self) -> None:
        """Scan the sizes of every sample again, as for data whose sizes vary (looking for one of other shapes for
        up to the scan budget while all are the same)."""
        self._looked_at = None
        with host_side_loading(), preserved_rng():
            self.scan, self.order = scan_sizes(
                self._load, self.length, budget=self._scan_budget, fixed_check=self._scan_budget
            )

    @property
    def varies(self) -> bool:
        """True when sample sizes vary: batches are then the largest samples."""
        return self.order is not None

    @property
    def largest_index(self) -> int:
        """The index of the largest sample seen (0 for fixed-size data)."""
        return self.scan.largest_index

    def _load(self, index: int) -> Any:
        """Sample ``index`` as the scan of sample sizes reads it; an error of the dataset's says where it happened."""
        try:
            return self._cache[index] if index in self._cache else self.dataset[index]
        except Exception as exc:
            set_note(
                exc,
                f"batchfinder: raised by the dataset's __getitem__ for sample {index}, while measuring the samples' "
                "sizes. Check the dataset, or pass sample_size= to give the sizes yourself.",
            )
            raise

    def sample(self, index: int) -> Any:
        """Sample ``index`` of the dataset (cached)."""
        found = self._cache.get(index)
        if found is not None:
            return found
        sample = self.dataset[index]
        if self._cached_bytes < _CACHE_BUDGET_BYTES:
            self._cache[index] = sample
            # Samples of fixed-size data all hold as many bytes as the first: count them once.
            if self.order is None and self._fixed_bytes is not None:
                self._cached_bytes += self._fixed_bytes
            else:
                self._cached_bytes += sample_bytes(sample)
        return sample

    def indices(self, batch_size: int) -> Sequence[int]:
        """The samples a batch of ``batch_size`` is built from: the first, or the largest when sizes vary."""
        return range(batch_size) if self.order is None else self.order[:batch_size]

    def batch(self, batch_size: int) -> Any:
        """A host-side batch of ``batch_size`` samples (at most the dataset length): the first ones, or when sample
        sizes vary the largest ones, which bound every batch of that size the loader can produce."""
        if not 1 <= batch_size <= self.length:
            raise ValueError(f"batch_size={batch_size} must be between 1 and the dataset length {self.length}")
        # Loading and collation happen on the host, also inside a SimulatedGPU block, and leave the RNGs alone.
        with host_side_loading(), preserved_rng():
            return self.collate([self.sample(i) for i in self.indices(batch_size)])

    def loader_batches(self, batch_size: int, count: int) -> list[Any]:
        """The first ``count`` batches of ``batch_size`` in the order the user's loader would yield them in an
        epoch: its sampler's order (a shuffling loader, or a plain dataset, in a private random order that leaves
        the user's random state alone). Fewer when the dataset runs out."""
        batches = []
        with host_side_loading(), preserved_rng():
            order = _epoch_order(self.loader, self.length)
            for _ in range(count):
                indices = list(islice(order, batch_size))
                if not indices:
                    break
                batches.append(self.collate([self._load(i) for i in indices]))
        return batches


def _check_sample_or_collated(sample: Any, collate: Callable[[list[Any]], Any]) -> None:
    """A loader with its own ``collate_fn`` may take samples of any kind: what must be batchable is its output."""
    if is_supported_sample(sample):
        return
    problem = _sample_problem(collate([sample]))
    if problem is not None:
        raise TypeError(problem.replace("dataset[0]", "the collate_fn's batch of dataset[0]"))


def _epoch_order(loader: DataLoader | None, length: int) -> Iterator[int]:
    """Sample indices in the order one epoch of ``loader`` visits them (a shuffled epoch without a loader)."""
    shuffled = lambda: iter(torch.randperm(length, generator=torch.Generator().manual_seed(0)).tolist())  # noqa: E731
    if loader is None:
        return shuffled()
    sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    if isinstance(sampler, BatchSampler):
        sampler = sampler.sampler
    if isinstance(sampler, RandomSampler):
        return shuffled()
    if isinstance(sampler, SequentialSampler):
        return iter(range(length))
    return _flattened(_replayed(sampler, shared=(loader, loader.dataset)))


def _replayed(sampler: Any, shared: Sequence[Any] = ()) -> list[Any]:
    """One pass over a private copy of a custom sampler (or batch sampler), so that its own random generators
    (``random.Random``, ``torch.Generator``, NumPy's) and counters (an epoch number) stay as they were; the objects
    in ``shared`` (the loader, the dataset) are not copied. A sampler that cannot be copied is iterated itself, with
    an attribute ``generator`` holding a ``torch.Generator`` put back. The global random states are restored by the
    caller."""
    replica = _private_copy(sampler, shared)
    if replica is not None:
        return list(replica)
    generator = getattr(sampler, "generator", None)
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    try:
        return list(sampler)
    finally:
        if state is not None:
            generator.set_state(state)


def _private_copy(sampler: Any, shared: Sequence[Any]) -> Any:
    """A deep copy of ``sampler`` sharing the objects of ``shared`` (a data set is never copied), or None."""
    memo: dict[int, Any] = {id(obj): obj for obj in shared if obj is not None}
    try:
        return copy.deepcopy(sampler, memo)
    except Exception:  # noqa: BLE001 - an uncopyable sampler (a lock, a file handle) is iterated itself
        logger.debug("could not copy the sampler %s; iterating it itself", type(sampler).__name__, exc_info=True)
        return None


def _flattened(items: list[Any]) -> Iterator[int]:
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from (int(i) for i in item)
        else:
            yield int(item)


def describe_batch(batch: Any, batch_size: int | str | None = None) -> str:
    """A one-line description of a batch's (or a sample's) structure, e.g.
    ``(Tensor[2, 1, 28, 28] float32, Tensor[2] int64)``; with ``batch_size`` the first dimension of every tensor is
    shown as that (``describe_batch(template, "B")`` gives ``Tensor[B, 1, 28, 28]``)."""
    if isinstance(batch, torch.Tensor):
        shape: list[Any] = list(batch.shape)
        if batch_size is not None and shape:
            shape[0] = batch_size
        return f"Tensor[{', '.join(map(str, shape))}] {str(batch.dtype).replace('torch.', '')}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_batch(v, batch_size)}" for k, v in batch.items()) + "}"
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return "(" + ", ".join(describe_batch(v, batch_size) for v in batch) + ")"
    return type(batch).__name__


def plain_containers(batch: Any) -> Any:
    """``batch`` with every mapping that is not a ``dict`` (a tokenizer's ``BatchEncoding``, a ``UserDict``) turned
    into a ``dict``, recursively, so that moving it to a device reaches every tensor inside (``tree_map`` treats an
    unknown mapping as a single leaf)."""
    if isinstance(batch, Mapping):
        return {key: plain_containers(value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(plain_containers(value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(plain_containers(value) for value in batch)
    return batch
