"""What a search's trials run for a Hugging Face ``Trainer``: its own pieces, as its ``train()`` would use them.

* Batches: the loaders the Trainer builds itself (``get_train_dataloader()``/``get_eval_dataloader()``: its column
  removal, its ``data_collator``, its sampler), read by a :class:`~batchfinder.training.batching.BatchSource` (for text of
  varying length a trial of size B runs on the B longest samples, padded by the collator). The loaders are not left
  registered with the Trainer's accelerator. A dataset with a length column (``args.length_column_name``, or the
  lengths of its ``input_ids`` column in a ``datasets.Dataset``) gives the sample sizes without loading samples.
* The training step's loss: ``trainer.compute_loss`` (so a subclass's own loss, label smoothing and
  ``compute_loss_func`` count); the engine's built-in step runs backward and the optimizer step, in the
  Trainer's precision (:func:`trainer_precision`).
* The optimizer: the Trainer's own instance when it has one, otherwise a fresh one per trial from the Trainer's
  ``create_optimizer()`` (its optimizer class, hyperparameters and weight-decay groups), with ``trainer.optimizer``
  left as it was.
* The evaluation step: what ``prediction_step`` runs (the loss with its outputs when the batch has the labels, the
  forward pass otherwise) under the same autocast as training, without the collective that ``prediction_step``
  may run to count tokens over ranks (a trial must not run collectives).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from ..engine.distributed import unwrap_ddp
from ..engine.trial import EvalStepFn
from ..training.batching import BatchSource
from ..training.optimizers import OptimizerSpec
from ..training.sample_sizes import SampleSize
from ..training.steps import StepFn

__all__ = [
    "trainer_precision",
    "training_source",
    "evaluation_source",
    "length_sizes",
    "optimizer_spec",
    "loss_step",
    "eval_step",
    "PlannedDDP",
    "trial_model",
]

logger = logging.getLogger(__name__)

_DEFAULT_BUCKET_MB = 25
"""DistributedDataParallel's default ``bucket_cap_mb``."""


def trainer_precision(args: Any) -> str:
    """The engine's name for the precision ``args`` train in: ``fp16`` -> ``"16-mixed"``, ``bf16`` ->
    ``"bf16-mixed"``, otherwise ``"32-true"``."""
    if getattr(args, "fp16", False):
        return "16-mixed"
    if getattr(args, "bf16", False):
        return "bf16-mixed"
    return "32-true"


class _PlainBatches:
    """A collate function whose mapping batches (a tokenizer's ``BatchEncoding``) come out as plain dicts, which
    the devices move tensor by tensor."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list[Any]) -> Any:
        batch = self.collate(samples)
        return dict(batch) if isinstance(batch, Mapping) and type(batch) is not dict else batch


def _built_loader(trainer: Any, build: Callable[[], DataLoader]) -> DataLoader:
    """A loader built by the Trainer's own method, not left registered with its accelerator, collating to dicts."""
    registered = getattr(getattr(trainer, "accelerator", None), "_dataloaders", None)
    before = list(registered) if isinstance(registered, list) else None
    try:
        loader = build()
    finally:
        if before is not None:
            registered[:] = before
    if not isinstance(loader, DataLoader):
        raise TypeError(f"the Trainer built a {type(loader).__name__}, not a DataLoader, to search batch sizes with")
    plain = copy.copy(loader)  # the same dataset and sampler; DataLoader allows a new collate_fn
    plain.collate_fn = _PlainBatches(loader.collate_fn)
    return plain


def length_sizes(trainer: Any, dataset: Any) -> list[float] | None:
    """One size per sample from a column of a ``datasets.Dataset``-like dataset: ``args.length_column_name`` when
    it has that column, else the lengths of its main input column (``input_ids``); None for other datasets (the
    engine then measures samples)."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, (list, tuple)) or not columns:
        return None
    name = getattr(trainer.args, "length_column_name", "length")
    if name in columns:
        logger.info("sample sizes from the dataset's %r column", name)
        return [float(value) for value in dataset[name]]
    processor = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    inputs = list(getattr(processor, "model_input_names", None) or ["input_ids"])
    if inputs[0] in columns:
        logger.info("sample sizes from the lengths of the dataset's %r column", inputs[0])
        return [float(len(value)) for value in dataset[inputs[0]]]
    return None


def training_source(trainer: Any, sample_size: SampleSize | None, scan_budget: float) -> BatchSource:
    """Training batches from the loader ``trainer.get_train_dataloader()`` builds."""
    loader = _built_loader(trainer, trainer.get_train_dataloader)
    if sample_size is None:
        sample_size = length_sizes(trainer, trainer.train_dataset)
    return BatchSource(loader, sample_size=sample_size, scan_budget=scan_budget)


def evaluation_source(trainer: Any, scan_budget: float) -> BatchSource | None:
    """Evaluation batches from the loader(s) ``trainer.get_eval_dataloader()`` builds (None without an evaluation
    dataset). Several evaluation datasets (a dict) are searched as one: a batch of B is then the B largest samples
    of all of them, which bounds every one's batches."""
    datasets = trainer.eval_dataset
    if datasets is None:
        return None
    if isinstance(datasets, Mapping):
        loaders = [
            _built_loader(trainer, lambda data=data: trainer.get_eval_dataloader(data)) for data in datasets.values()
        ]
    else:
        loaders = [_built_loader(trainer, trainer.get_eval_dataloader)]
    if not loaders:
        return None
    data: Any = loaders[0]
    if len(loaders) > 1:
        data = DataLoader(ConcatDataset([loader.dataset for loader in loaders]), collate_fn=loaders[0].collate_fn)
    return BatchSource(data, scan_budget=scan_budget)


def optimizer_spec(trainer: Any) -> OptimizerSpec:
    """The Trainer's optimizer: its own instance (kept and restored by the engine), or a fresh one per trial built
    by its ``create_optimizer()`` with ``trainer.optimizer`` put back afterwards."""
    existing = trainer.optimizer
    if existing is not None:
        return OptimizerSpec(lambda: existing, existing, type(existing).__name__)

    def create() -> torch.optim.Optimizer:
        saved = trainer.optimizer
        trainer.optimizer = None
        try:
            return trainer.create_optimizer()
        finally:
            trainer.optimizer = saved

    optim = getattr(trainer.args, "optim", "")
    return OptimizerSpec(create, None, f"Trainer.create_optimizer() ({getattr(optim, 'value', optim)})")


def _inputs(batch: Any) -> Any:
    """A shallow copy of a dict batch (``compute_loss`` may pop the labels out of what it is given)."""
    return dict(batch) if isinstance(batch, Mapping) else batch


def loss_step(trainer: Any) -> StepFn:
    """``step(model, batch) -> loss`` with the Trainer's ``compute_loss``."""

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        return trainer.compute_loss(model, _inputs(batch))

    step.batchfinder_phase = "the Trainer's compute_loss (forward and loss)"  # type: ignore[attr-defined]
    step.batchfinder_loss_source = "the Trainer's compute_loss"  # type: ignore[attr-defined]
    return step


def _autocast(precision: str, device_type: str) -> Callable[[], Any]:
    """The engine's autocast for ``precision`` (what its built-in training step runs under); none on an engine
    without precisions."""
    try:
        from ..training.precision import StepPrecision
    except ImportError:
        return contextlib.nullcontext
    return StepPrecision(precision, device_type).autocast


def eval_step(trainer: Any, precision: str, device_type: str) -> EvalStepFn:
    """``step(model, batch)``: one evaluation step as ``prediction_step`` runs it (called under ``no_grad``)."""
    label_names = list(getattr(trainer, "label_names", None) or getattr(trainer.args, "label_names", None) or [])
    loss_without_labels = not label_names and bool(getattr(trainer, "can_return_loss", False))
    autocast = _autocast(precision, device_type)

    def step(model: nn.Module, batch: Any) -> None:
        inputs = _inputs(batch)
        has_labels = bool(label_names) and all(inputs.get(name) is not None for name in label_names)
        with autocast():
            if has_labels or loss_without_labels:
                _loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
            else:
                outputs = model(**inputs)
        del outputs

    return step


@dataclass
class PlannedDDP:
    """The ``DistributedDataParallel`` wrapper the Trainer builds when ``train()`` starts, after the search: what
    :func:`~batchfinder.engine.distributed.ddp_bucket_bytes` reads to charge its gradient buckets (one flat buffer per
    bucket, as large as the gradients it holds, alive for the whole of training)."""

    module: nn.Module
    bucket_bytes_cap: int
    gradient_as_bucket_view: bool = False
    parameters_to_ignore: tuple[str, ...] = ()
    holds_buckets: bool = False
    """False: nothing holds the buckets yet, on a real GPU either, so the search charges them on every device."""


def _several_ranks() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def trial_model(trainer: Any, distributed: bool | None) -> tuple[nn.Module, Any]:
    """``(module, ddp)``: the Trainer's model unwrapped for trials (no collective runs inside one), and its DDP
    wrapper when it has one or, on several ranks, the one ``train()`` will build (:class:`PlannedDDP`)."""
    module, ddp = unwrap_ddp(trainer.model)
    wrapped = getattr(trainer, "model_wrapped", None)
    if ddp is None and isinstance(wrapped, nn.parallel.DistributedDataParallel) and wrapped.module is module:
        ddp = wrapped
    mode = getattr(getattr(trainer.args, "parallel_mode", None), "value", None)
    if ddp is None and distributed is not False and mode == "distributed" and _several_ranks():
        cap_mb = getattr(trainer.args, "ddp_bucket_cap_mb", None) or _DEFAULT_BUCKET_MB
        ddp = PlannedDDP(module, int(cap_mb * 1024 * 1024))
        logger.info("charging the gradient buckets of the DistributedDataParallel wrapper train() will build")
    return module, ddp
