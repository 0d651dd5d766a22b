"""PyTorch Lightning integration: the :class:`BatchFinder` callback (needs ``pip install batchfinder[lightning]``).

>>> from batchfinder.lightning import BatchFinder
>>> trainer = pl.Trainer(callbacks=[BatchFinder()])     # doctest: +SKIP

The pieces: :mod:`~batchfinder.lightning.callback` (the thin callback), :mod:`~batchfinder.lightning.steps` (how a
trial runs the module's steps), :mod:`~batchfinder.lightning.sources` (where batches come from),
:mod:`~batchfinder.lightning.targets` (where the batch size lives), :mod:`~batchfinder.lightning.loaders`
(rebuilding a DataLoader with another batch size), :mod:`~batchfinder.lightning.isolation` (what must stay
untouched) and :mod:`~batchfinder.lightning.strategies` (the strategies it can search under). The core package
never imports this subpackage.
"""

from __future__ import annotations

from .callback import BatchFinder

__all__ = ["BatchFinder"]
