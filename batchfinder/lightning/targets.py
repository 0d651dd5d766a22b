"""Where a Lightning run keeps its batch size, and putting a found batch size there.

The batch size lives in an attribute or ``hparams`` key of the LightningModule or the datamodule (every one that
exists gets the result), or in dataloaders passed to ``fit()``/``test()``/... directly, which are rebuilt with the
new batch size (:mod:`batchfinder.lightning.loaders`). Everything here is checked before any trial runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from .framework import pl
from .loaders import rebuild_dataloaders

__all__ = [
    "Holder",
    "Targets",
    "find_targets",
    "data_source",
    "flatten_loaders",
    "check_loader",
    "reload_evaluation_loop",
]


@dataclass(frozen=True)
class Holder:
    """One place that holds the batch size: an attribute of an object or a key of an hparams mapping."""

    owner: Any
    name: str
    in_hparams: bool
    label: str

    def get(self) -> Any:
        return self.owner[self.name] if self.in_hparams else getattr(self.owner, self.name)

    def set(self, value: int) -> None:
        if self.in_hparams:
            self.owner[self.name] = value
        else:
            setattr(self.owner, self.name, value)


@dataclass(frozen=True)
class Targets:
    """Every place one batch size goes: attribute holders, and data sources whose loaders were passed directly."""

    holders: list[Holder]
    direct: list[Any]

    def apply(self, size: int, *, skip: tuple[Any, ...] = ()) -> None:
        """Write ``size`` to every holder and rebuild every directly passed loader (except those in ``skip``)."""
        for holder in self.holders:
            holder.set(size)
        for source in self.direct:
            if not any(source is other for other in skip):
                source.instance = rebuild_dataloaders(source.instance, size)


def _holds_batch_size(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _find_holders(trainer: pl.Trainer, module: pl.LightningModule, name: str) -> list[Holder]:
    """Every place ``name`` is kept: model attribute, model.hparams, datamodule attribute, datamodule.hparams."""
    holders: list[Holder] = []
    owners: list[tuple[Any, str]] = [(module, "model")]
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        owners.append((datamodule, "datamodule"))
    for owner, label in owners:
        if hasattr(owner, name) and not callable(getattr(owner, name)):
            if not _holds_batch_size(getattr(owner, name)):
                raise ValueError(
                    f"{label}.{name} is {getattr(owner, name)!r}, not a batch size (a whole number); pass "
                    "batch_arg_name naming the attribute that holds the batch size"
                )
            holders.append(Holder(owner, name, False, f"{label}.{name}"))
        hparams = getattr(owner, "hparams", None)
        if isinstance(hparams, Mapping) and name in hparams:
            if not _holds_batch_size(hparams[name]):
                raise ValueError(f"{label}.hparams.{name} is {hparams[name]!r}, not a batch size (a whole number)")
            holders.append(Holder(hparams, name, True, f"{label}.hparams.{name}"))
    return holders


def data_source(trainer: pl.Trainer, stage: str, *, validation_of_fit: bool = False) -> Any:
    """Lightning's record of where a stage's dataloaders come from (a module's hook or loaders given directly)."""
    if stage == "fit":
        return trainer.fit_loop.epoch_loop.val_loop._data_source if validation_of_fit else trainer.fit_loop._data_source
    loops = {"validate": trainer.validate_loop, "test": trainer.test_loop, "predict": trainer.predict_loop}
    return loops[stage]._data_source


def _passed_directly(source: Any) -> bool:
    """True when the loaders were passed to fit()/test()/... rather than returned by a ``*_dataloader`` hook."""
    return source is not None and source.instance is not None and not source.is_module()


def flatten_loaders(loaders: Any) -> list[Any]:
    """The dataloaders in a (possibly nested or combined) collection of them."""
    if loaders is None:
        return []
    flattened = getattr(loaders, "flattened", None)  # a CombinedLoader
    if flattened is not None and not isinstance(loaders, (DataLoader, Mapping, list, tuple)):
        return list(flattened)
    if isinstance(loaders, Mapping):
        return [leaf for value in loaders.values() for leaf in flatten_loaders(value)]
    if isinstance(loaders, (list, tuple)):
        return [leaf for value in loaders for leaf in flatten_loaders(value)]
    return [loaders]


def check_loader(loader: Any, what: str) -> DataLoader:
    """``loader`` when it is a torch DataLoader; a TypeError naming ``what`` otherwise."""
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"the {what} dataloader is a {type(loader).__name__}, not a torch DataLoader: batches of any size are built "
            "from a DataLoader's dataset and collate_fn"
        )
    return loader


def find_targets(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    stage: str,
    name: str,
    *,
    evaluation: bool,
    explicit: bool,
) -> Targets:
    """Where a batch size for ``stage`` goes. Raises before any trial when there is nowhere to put it, or when the
    attribute was named ``explicit``ly and does not exist."""
    holders = _find_holders(trainer, module, name)
    if stage == "fit":
        sources = [data_source(trainer, "fit", validation_of_fit=True)] if evaluation else [
            data_source(trainer, "fit"), data_source(trainer, "fit", validation_of_fit=True)
        ]
    else:
        sources = [data_source(trainer, stage)]
    direct = [s for s in sources if _passed_directly(s)]
    if explicit and not holders:
        raise ValueError(
            f"batch_arg_name={name!r} was not found: the model, model.hparams, the datamodule and "
            f"datamodule.hparams have no {name!r}"
        )
    if not holders and not direct:
        what = "evaluation batch size" if evaluation else "batch size"
        raise ValueError(
            f"BatchFinder has nowhere to put the {what}: neither the model, model.hparams, the datamodule nor "
            f"datamodule.hparams has {name!r}, and no dataloaders were passed to "
            f"{'fit' if stage == 'fit' else stage}() directly to rebuild. Keep the batch size in self.{name} (and "
            "read it in the *_dataloader hooks), pass the dataloaders to fit() directly, or name the attribute "
            "with batch_arg_name"
        )
    if stage == "fit" and not evaluation and _passed_directly(sources[0]):
        for loader in flatten_loaders(sources[0].instance):
            check_loader(loader, "training")
    return Targets(holders, direct)


def reload_evaluation_loop(loop: Any) -> None:
    """Make a running evaluation loop iterate loaders built with the new batch size."""
    loop._combined_loader = None
    loop.setup_data()
    fetcher = getattr(loop, "_data_fetcher", None)
    combined = loop._combined_loader
    if fetcher is not None and combined is not None:
        combined.limits = loop.max_batches
        fetcher.setup(combined)
        iter(fetcher)
