"""Where a trial's batches come from in a Lightning run: the trainer's dataloaders, as Lightning would shape them.

Every source builds host batches of a requested size from a DataLoader's dataset and ``collate_fn``
(:class:`~batchfinder.batching.BatchSource`) and passes them through the module's ``on_before_batch_transfer`` hook,
as Lightning's loops do; ``on_after_batch_transfer`` runs in the steps (:mod:`batchfinder.lightning.steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import DataLoader

from ..accounting import host_side_loading
from ..batching import BatchSource
from .framework import pl
from .targets import check_loader, flatten_loaders

__all__ = ["HookedSource", "StructuredSource", "PerLoader", "EvalSource", "training_source", "evaluation_source"]


class HookedSource:
    """A :class:`BatchSource` whose host batches pass through ``on_before_batch_transfer``, as Lightning's do."""

    def __init__(self, source: Any, hook: Callable[[Any], Any]) -> None:
        self.source = source
        self.hook = hook
        self.length = source.length

    def batch(self, batch_size: int) -> Any:
        with host_side_loading():  # host memory, also when a simulated GPU is measuring around the search
            return self.hook(self.source.batch(batch_size))

    def sample(self, index: int) -> Any:
        """One sample of the underlying data (for the memory estimator of ``mode="guided"``)."""
        return self.source.sample(index)

    def collate(self, samples: list[Any]) -> Any:
        return self.source.collate(samples)


class StructuredSource:
    """Batches for several training dataloaders at once, shaped like Lightning's combined batch (dict or list)."""

    def __init__(self, structure: Any, sources: dict[int, Any]) -> None:
        self.structure = structure
        self.sources = sources
        self.length = max(source.length for source in sources.values())

    def batch(self, batch_size: int) -> Any:
        def build(node: Any) -> Any:
            if isinstance(node, Mapping):
                return {key: build(value) for key, value in node.items()}
            if isinstance(node, (list, tuple)):
                return [build(value) for value in node]
            source = self.sources[id(node)]
            return source.batch(min(batch_size, source.length))

        return build(self.structure)


class PerLoader:
    """Evaluation batches, one per dataloader. Not a pytree: each moves to the device only when its step runs."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches


class EvalSource:
    """Evaluation batches of a requested size for every evaluation dataloader (capped at each dataset's length)."""

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources
        self.length = max(source.length for source in sources)

    def batch(self, batch_size: int) -> PerLoader:
        return PerLoader([source.batch(min(batch_size, source.length)) for source in self.sources])


def _hooked(loader: DataLoader, module: pl.LightningModule, dataloader_idx: int) -> HookedSource:
    return HookedSource(BatchSource(loader), lambda batch: module.on_before_batch_transfer(batch, dataloader_idx))


def training_source(loaders: Any, module: pl.LightningModule) -> HookedSource:
    """Training batches from the trainer's training dataloader(s): one loader, or several combined as Lightning's
    ``CombinedLoader`` combines them (a dict or list of batches)."""
    flat = [check_loader(loader, "training") for loader in flatten_loaders(loaders)]
    if not flat:
        raise ValueError("the training dataloader hook returned nothing to build batches from")
    if isinstance(loaders, DataLoader):
        return _hooked(loaders, module, 0)
    structure = getattr(loaders, "iterables", loaders)
    sources = {id(loader): BatchSource(loader) for loader in flat}
    return HookedSource(StructuredSource(structure, sources), lambda batch: module.on_before_batch_transfer(batch, 0))


def evaluation_source(loaders: list[DataLoader], module: pl.LightningModule) -> EvalSource:
    """Evaluation batches for every evaluation dataloader, each through its own ``on_before_batch_transfer``."""
    return EvalSource([_hooked(loader, module, index) for index, loader in enumerate(loaders)])
