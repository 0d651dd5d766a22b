"""Rebuilding a ``DataLoader`` with another batch size, keeping everything else.

>>> from torch.utils.data import DataLoader
>>> loader = DataLoader(list(range(100)), batch_size=8, shuffle=True, drop_last=True)
>>> rebuilt = rebuild_dataloader(loader, 32)
>>> rebuilt.batch_size, rebuilt.sampler is loader.sampler, rebuilt.drop_last
(32, True, True)

The new loader gets the same dataset, sampler (the very object, so a ``RandomSampler`` keeps its generator and a
``DistributedSampler`` its rank), ``collate_fn``, workers, ``worker_init_fn``, pinning, timeout, generator,
multiprocessing context, prefetching and ``drop_last``. A loader built around a plain ``BatchSampler`` gets a new
``BatchSampler`` over the same sampler. Loaders that cannot be rebuilt faithfully (a custom ``batch_sampler``, no
batching at all, a ``DataLoader`` subclass whose constructor does not take ``DataLoader``'s arguments) are refused
with a ``ValueError`` that says why.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, IterableDataset

__all__ = ["rebuild_dataloader", "rebuild_dataloaders"]

_COPIED = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


def _accepted(cls: type) -> set[str] | None:
    """Keyword names ``cls(...)`` accepts (None when it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def rebuild_dataloader(loader: DataLoader, batch_size: int) -> DataLoader:
    """A copy of ``loader`` that yields batches of ``batch_size`` (see the module documentation)."""
    if not isinstance(loader, DataLoader):
        raise ValueError(f"only torch DataLoaders can be rebuilt with a new batch size, not {type(loader).__name__}")
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            f"the DataLoader reads an IterableDataset ({type(loader.dataset).__name__}): its batches are whatever the "
            "dataset yields, so there is no batch size to change; put the batch size where the dataset reads it"
        )
    kwargs: dict[str, Any] = {"dataset": loader.dataset}
    if loader.batch_size is not None:
        kwargs.update(batch_size=batch_size, sampler=loader.sampler, drop_last=loader.drop_last)
    elif type(loader.batch_sampler) is BatchSampler:
        old = loader.batch_sampler
        kwargs.update(batch_sampler=BatchSampler(old.sampler, batch_size, old.drop_last))
    elif loader.batch_sampler is None:
        raise ValueError("the DataLoader was built with batch_size=None (no batching): there is no batch size to change")
    else:
        raise ValueError(
            f"the DataLoader uses a custom batch_sampler ({type(loader.batch_sampler).__name__}) that decides the batch "
            "size itself; give it the new batch size yourself, or keep the batch size in an attribute"
        )
    for name in _COPIED:
        if hasattr(loader, name):
            kwargs[name] = getattr(loader, name)
    if not kwargs.get("num_workers"):
        kwargs.pop("prefetch_factor", None)
        kwargs["persistent_workers"] = False
    cls = type(loader)
    accepted = _accepted(cls)
    if cls is not DataLoader and accepted is not None:
        missing = sorted(set(kwargs) - accepted)
        if missing:
            raise ValueError(
                f"cannot rebuild the {cls.__name__} (a DataLoader subclass) with a new batch size: its constructor does "
                f"not take {missing}; keep the batch size in an attribute (model.batch_size, datamodule.batch_size)"
            )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"cannot rebuild the {cls.__name__} with a new batch size: {exc}") from exc


def rebuild_dataloaders(loaders: Any, batch_size: int) -> Any:
    """:func:`rebuild_dataloader` over a loader or a list, tuple or dict of them (the same structure comes back)."""
    if isinstance(loaders, DataLoader):
        return rebuild_dataloader(loaders, batch_size)
    if isinstance(loaders, Mapping):
        return type(loaders)({key: rebuild_dataloaders(value, batch_size) for key, value in loaders.items()})
    if isinstance(loaders, Sequence) and not isinstance(loaders, str):
        rebuilt = [rebuild_dataloaders(value, batch_size) for value in loaders]
        return tuple(rebuilt) if isinstance(loaders, tuple) else rebuilt
    raise ValueError(f"only DataLoaders (or lists, tuples and dicts of them) can be rebuilt, not {type(loaders).__name__}")
