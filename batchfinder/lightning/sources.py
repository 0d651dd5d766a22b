"""Where a trial's batches come from in a Lightning run: the trainer's dataloaders, as Lightning would shape them.

Every source builds host batches of a requested size from a DataLoader's dataset and ``collate_fn``
(:class:`~batchfinder.training.batching.BatchSource`) and passes them through the module's ``on_before_batch_transfer`` hook,
as Lightning's loops do; ``on_after_batch_transfer`` runs in the steps (:mod:`batchfinder.lightning.steps`).

When the samples of a loader differ in size (:mod:`batchfinder.training.sample_sizes`), its batches of ``B`` are its ``B``
largest samples, the worst case of every batch of ``B`` the loader can produce; the sources here pass what the scan
found (``scan``, ``varies``, ``largest_index``) and the batches in the loader's own order (``loader_batches``, for
the confirmation run) through to the engine.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..training.batching import BatchSource, EvaluationBatches, TrainingBatches
from ..training.host import host_side_loading
from ..training.sample_sizes import DEFAULT_SCAN_BUDGET, DataScan
from .framework import pl
from .targets import check_loader, flatten_loaders

__all__ = [
    "HookedSource",
    "StructuredSource",
    "PerLoader",
    "EvalSource",
    "training_source",
    "evaluation_source",
    "check_sample_size_option",
]


def _first_varying(sources: list[Any]) -> Any:
    """The first source whose sample sizes vary, or the first source."""
    return next((source for source in sources if source.varies), sources[0])


class HookedSource:
    """A :class:`BatchSource` whose host batches pass through ``on_before_batch_transfer``, as Lightning's do."""

    def __init__(self, source: TrainingBatches, hook: Callable[[Any], Any]) -> None:
        self.source = source
        self.hook = hook
        self.length = source.length

    @property
    def scan(self) -> DataScan | None:
        """What the scan of the sample sizes found (``SearchResult.data_scan``)."""
        return self.source.scan

    @property
    def varies(self) -> bool:
        """True when sample sizes vary: batches are then the largest samples."""
        return self.source.varies

    @property
    def largest_index(self) -> int:
        """The index of the largest sample seen (0 for fixed-size data)."""
        return self.source.largest_index

    def batch(self, batch_size: int) -> Any:
        with host_side_loading():  # host memory, also when a simulated GPU is measuring around the search
            return self.hook(self.source.batch(batch_size))

    def loader_batches(self, batch_size: int, count: int) -> list[Any]:
        """The first ``count`` batches in the loader's own order, each through the hook (the confirmation run)."""
        with host_side_loading():
            return [self.hook(batch) for batch in self.source.loader_batches(batch_size, count)]

    def sample(self, index: int) -> Any:
        """One sample of the underlying data (for the memory estimator of ``mode="guided"``)."""
        return self.source.sample(index)

    def collate(self, samples: list[Any]) -> Any:
        return self.source.collate(samples)

    def look_further(self, seconds: float) -> bool:
        """The underlying source's deferred check of fixed-size data."""
        return self.source.look_further(seconds)

    def rescan(self) -> None:
        self.source.rescan()


def _build(structure: Any, leaf: Callable[[Any], Any]) -> Any:
    """``structure`` (a dict or list of loaders, possibly nested) with every loader replaced by ``leaf(loader)``."""
    if isinstance(structure, Mapping):
        return {key: _build(value, leaf) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return [_build(value, leaf) for value in structure]
    return leaf(structure)


class StructuredSource:
    """Batches for several training dataloaders at once, shaped like Lightning's combined batch (dict or list)."""

    def __init__(self, structure: Any, sources: dict[int, TrainingBatches]) -> None:
        self.structure = structure
        self.sources = sources
        self.length = max(source.length for source in sources.values())

    def _varying(self) -> Any:
        return _first_varying(list(self.sources.values()))

    @property
    def varies(self) -> bool:
        """True when the sample sizes of any of the loaders vary."""
        return any(source.varies for source in self.sources.values())

    @property
    def scan(self) -> DataScan | None:
        """The scan of the first loader whose sample sizes vary (of the first loader when none does)."""
        return self._varying().scan

    @property
    def largest_index(self) -> int:
        """The index of the largest sample of the first loader whose sample sizes vary."""
        return self._varying().largest_index

    def sample(self, index: int) -> Any:
        """Sample ``index`` of the first loader whose sample sizes vary (of the first loader when none does)."""
        return self._varying().sample(index)

    def collate(self, samples: list[Any]) -> Any:
        return self._varying().collate(samples)

    def look_further(self, seconds: float) -> bool:
        """Every loader's data was checked for fixed sizes before the search: nothing is left to look at."""
        return False

    def rescan(self) -> None:
        for source in self.sources.values():
            source.rescan()

    def batch(self, batch_size: int) -> Any:
        def leaf(loader: Any) -> Any:
            source = self.sources[id(loader)]
            return source.batch(min(batch_size, source.length))

        return _build(self.structure, leaf)

    def loader_batches(self, batch_size: int, count: int) -> list[Any]:
        """The first ``count`` combined batches, each loader's in its own order; a loader that runs out starts
        again (Lightning's default ``max_size_cycle``)."""
        per_loader = {
            key: source.loader_batches(min(batch_size, source.length), count) for key, source in self.sources.items()
        }
        steps = min(count, max(len(batches) for batches in per_loader.values()))
        return [
            _build(self.structure, lambda loader, i=i: per_loader[id(loader)][i % len(per_loader[id(loader)])])
            for i in range(steps)
        ]


class PerLoader:
    """Evaluation batches, one per dataloader. Not a pytree: each moves to the device only when its step runs."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches


class EvalSource:
    """Evaluation batches of a requested size for every evaluation dataloader (capped at each dataset's length);
    each loader's batches are its largest samples when its sample sizes vary."""

    def __init__(self, sources: list[EvaluationBatches]) -> None:
        self.sources = sources
        self.length = max(source.length for source in sources)

    @property
    def scans(self) -> list[DataScan | None]:
        """The scan of every evaluation loader, in order."""
        return [source.scan for source in self.sources]

    @property
    def varies(self) -> bool:
        """True when the sample sizes of any evaluation loader vary."""
        return any(source.varies for source in self.sources)

    @property
    def scan(self) -> DataScan | None:
        """The scan of the first loader whose sample sizes vary (of the first loader when none does)."""
        return _first_varying(self.sources).scan

    @property
    def largest_index(self) -> int:
        """The index of the largest sample of the first loader whose sample sizes vary."""
        return _first_varying(self.sources).largest_index

    def batch(self, batch_size: int) -> PerLoader:
        return PerLoader([source.batch(min(batch_size, source.length)) for source in self.sources])


# -- the sample_size option -------------------------------------------------------------------------------------------
def _check_one_sample_size(value: Any, where: str) -> None:
    if callable(value):
        return
    if isinstance(value, (str, bytes, Mapping)) or not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        raise TypeError(
            f"{where} must be a callable index -> number or a sequence with one number per sample (e.g. a list of "
            f"lengths), not {type(value).__name__}"
        )
    first = value[0] if len(value) else 0
    if isinstance(first, torch.Tensor) and first.numel() == 1:
        first = first.item()
    if isinstance(first, bool) or not isinstance(first, numbers.Real):
        raise TypeError(f"{where} must hold one number per sample, but its first entry is {value[0]!r:.60}")


def check_sample_size_option(sample_size: Any) -> None:
    """Refuse a ``sample_size`` that is neither None, a callable, a sequence of numbers, nor a dict of those keyed by
    the names of the training dataloaders (TypeError/ValueError naming it). Lengths are checked against the data
    when the loaders are built, before any trial."""
    if sample_size is None:
        return
    if isinstance(sample_size, Mapping):
        if not sample_size:
            raise ValueError("sample_size={} names no training dataloader: give None, or one entry per loader name")
        for key, value in sample_size.items():
            _check_one_sample_size(value, f"sample_size[{key!r}]")
        return
    _check_one_sample_size(sample_size, "sample_size")


def _training_sample_sizes(structure: Any, sample_size: Any) -> dict[int, Any]:
    """``sample_size`` for each training loader, by ``id``: all of it for one loader, a dict's entries by the names
    of a dict of loaders."""
    if sample_size is None:
        return {}
    if isinstance(structure, DataLoader):
        if isinstance(sample_size, Mapping):
            raise ValueError(
                "sample_size is a dict, but there is one training dataloader: give its sizes directly (a callable "
                "index -> number or one number per sample)"
            )
        return {id(structure): sample_size}
    if not isinstance(sample_size, Mapping) or not isinstance(structure, Mapping):
        raise ValueError(
            "sample_size with several training dataloaders must be a dict keyed like the dict of dataloaders "
            "(e.g. {'text': lengths}), one entry per loader whose sizes you give; a list of loaders takes no "
            "sample_size (their samples' element counts are used)"
        )
    unknown = [key for key in sample_size if key not in structure]
    if unknown:
        raise ValueError(
            f"sample_size names {unknown!r}, which are not training dataloaders; the loaders are {list(structure)!r}"
        )
    chosen: dict[int, Any] = {}
    for key, value in sample_size.items():
        if not isinstance(structure[key], DataLoader):
            raise ValueError(f"sample_size[{key!r}]: the training dataloader {key!r} is not one DataLoader but "
                             f"a {type(structure[key]).__name__}")
        chosen[id(structure[key])] = value
    return chosen


def _hooked(
    loader: DataLoader, module: pl.LightningModule, dataloader_idx: int, sample_size: Any, scan_budget: float
) -> HookedSource:
    source = BatchSource(loader, sample_size=sample_size, scan_budget=scan_budget)
    return HookedSource(source, lambda batch: module.on_before_batch_transfer(batch, dataloader_idx))


def training_source(
    loaders: Any,
    module: pl.LightningModule,
    *,
    sample_size: Any = None,
    scan_budget: float = DEFAULT_SCAN_BUDGET,
) -> HookedSource:
    """Training batches from the trainer's training dataloader(s): one loader, or several combined as Lightning's
    ``CombinedLoader`` combines them (a dict or list of batches). ``sample_size`` gives the sizes of one loader's
    samples, or of a dict of loaders' samples by name; every loader is scanned within ``scan_budget`` seconds."""
    flat = [check_loader(loader, "training") for loader in flatten_loaders(loaders)]
    if not flat:
        raise ValueError("the training dataloader hook returned nothing to build batches from")
    structure = loaders if isinstance(loaders, DataLoader) else getattr(loaders, "iterables", loaders)
    sizes = _training_sample_sizes(structure, sample_size)
    if isinstance(loaders, DataLoader):
        return _hooked(loaders, module, 0, sizes.get(id(loaders)), scan_budget)
    sources = {
        id(loader): BatchSource(loader, sample_size=sizes.get(id(loader)), scan_budget=scan_budget) for loader in flat
    }
    return HookedSource(StructuredSource(structure, sources), lambda batch: module.on_before_batch_transfer(batch, 0))


def evaluation_source(
    loaders: list[DataLoader], module: pl.LightningModule, *, scan_budget: float = DEFAULT_SCAN_BUDGET
) -> EvalSource:
    """Evaluation batches for every evaluation dataloader, each through its own ``on_before_batch_transfer``; the
    loaders' samples are scanned by element count within ``scan_budget`` seconds each."""
    return EvalSource([_hooked(loader, module, index, None, scan_budget) for index, loader in enumerate(loaders)])
