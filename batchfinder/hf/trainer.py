"""Hugging Face Transformers' ``Trainer`` as a front end: :func:`find_trainer_batch_size`, instead of
``auto_find_batch_size=True``.

>>> import batchfinder as bf
>>> from batchfinder.hf.trainer import find_trainer_batch_size
>>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)   # doctest: +SKIP
>>> result = find_trainer_batch_size(trainer, target_batch_size=256)                 # on the Trainer's CUDA GPU
>>> result = find_trainer_batch_size(trainer, device=bf.SimulatedGPU("16GiB"))       # doctest: +SKIP
>>> trainer.train()                               # at trainer.args.per_device_train_batch_size  # doctest: +SKIP

The search runs the engine's real training steps (:func:`~batchfinder.engine.run.search`) on the Trainer's own pieces
(:mod:`batchfinder.hf.workload`): its model, its training loader as ``get_train_dataloader()`` builds it (column
removal, ``data_collator``), its optimizer as ``create_optimizer()`` builds it, its ``compute_loss``, its precision
(``fp16`` -> ``"16-mixed"``, ``bf16`` -> ``"bf16-mixed"``) and gradient checkpointing when its arguments ask for it;
with an evaluation dataset, also a separate evaluation batch size. It then writes the result into ``trainer.args``
(:mod:`batchfinder.hf.isolation`), so that a plain ``trainer.train()`` uses it. The model's weights, the optimizer,
the scheduler and the random generators are left exactly as they were.

Needs ``transformers`` (``pip install batchfinder[transformers]``); importing this module does not import it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from ..devices.base import DeviceBackend, DeviceLike
from ..devices.resolve import resolve_device
from ..engine.distributed import agrees_across_ranks
from ..engine.options import ProgressLike, SearchOptions
from ..engine.run import search
from ..engine.workload import Workload
from ..result import SearchResult
from ..search.checks import MIN_STEPS_PER_TRIAL
from ..training.sample_sizes import DEFAULT_SCAN_BUDGET, SampleSize, check_scan_budget
from .isolation import apply_result, checkpointing, kept_attributes
from .workload import (
    eval_step,
    evaluation_source,
    loss_step,
    optimizer_spec,
    trainer_precision,
    training_source,
    trial_model,
)

__all__ = ["find_trainer_batch_size"]

logger = logging.getLogger(__name__)

_EXTRA = "pip install batchfinder[transformers]"


def _transformers() -> Any:
    """The ``transformers`` package, or an ImportError that names the extra to install."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"find_trainer_batch_size needs Hugging Face Transformers: {_EXTRA} (or pip install transformers)"
        ) from exc
    return transformers


def _check_trainer(trainer: Any) -> None:
    """Refuse what the search cannot serve, before anything runs."""
    transformers = _transformers()
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(
            f"find_trainer_batch_size takes a transformers.Trainer (or a subclass), not {type(trainer).__name__}; "
            "for a plain model use batchfinder.find_batch_size"
        )
    args = trainer.args
    if getattr(args, "auto_find_batch_size", False):
        raise ValueError(
            "the Trainer's args.auto_find_batch_size is True: turn it off (auto_find_batch_size=False). "
            "find_trainer_batch_size replaces it, and the two would fight: the Trainer would shrink the batch size "
            "found here at its first out-of-memory error"
        )
    if trainer.train_dataset is None:
        raise ValueError("the Trainer has no train_dataset: the search runs training steps on its training data")
    refusal = _sharding_refusal(trainer)
    if refusal:
        raise ValueError(refusal)
    if getattr(trainer, "is_model_parallel", False):
        raise ValueError("the Trainer's model is split over several GPUs (device_map): search it on one device")
    if getattr(args, "n_gpu", 1) > 1:
        logger.warning(
            "the Trainer uses DataParallel over %d GPUs: the per-device batch size is searched on one GPU; what "
            "DataParallel gathers on the first GPU is not charged",
            args.n_gpu,
        )


def _fsdp_version(trainer: Any) -> int:
    """The FSDP version the Trainer's accelerator was set up with (transformers' default is 2)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    version = getattr(plugin, "fsdp_version", None)
    if version is None:
        config = getattr(trainer.args, "fsdp_config", None) or {}
        version = config.get("version", config.get("fsdp_version", 2))
    return int(version)


def _sharding_refusal(trainer: Any) -> str | None:
    """Why a Trainer that shards its model (DeepSpeed, FSDP) cannot be searched here, and what to do; None if it
    does not shard."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return (
            "the Trainer runs DeepSpeed, whose engine partitions the model (ZeRO) and owns the backward pass and the "
            "optimizer step, with collectives inside them that batchfinder cannot make every rank agree on before "
            "they start: one rank running out of memory would leave the others waiting. Use DeepSpeed's autotuner, "
            "or shard with FSDP2 (torch.distributed.fsdp.fully_shard) and call batchfinder.find_batch_size on the "
            "sharded model on every rank"
        )
    if getattr(trainer, "is_fsdp_enabled", False):
        version = _fsdp_version(trainer)
        if version == 1:
            what = ("FSDP1 (FullyShardedDataParallel), whose unit states are left half-gathered when a trial runs "
                    "out of memory inside forward or backward")
        else:
            what = ("FSDP2, but only inside train() (accelerate's prepare), so before training there is no sharded "
                    "model for a trial to run")
        return (
            f"the Trainer shards the model with {what}. Shard the model yourself with "
            "torch.distributed.fsdp.fully_shard, call batchfinder.find_batch_size on it on every rank, and set "
            "per_device_train_batch_size to the size it recommends"
        )
    return None


def _device(trainer: Any, device: DeviceLike, memory_limit: int | str | None) -> DeviceBackend:
    """The device to search on: the one given, or the Trainer's own CUDA device."""
    if device is not None:
        return resolve_device(device, memory_limit=memory_limit)
    where = trainer.args.device
    if where.type == "cuda":
        return resolve_device(where, memory_limit=memory_limit)
    raise ValueError(
        f"the Trainer runs on {where} and the search measures GPU memory: pass device='cuda', or search for a GPU "
        "of a given size on this machine with device=batchfinder.SimulatedGPU('16GiB') (or device='sim:16GiB')"
    )


@agrees_across_ranks  # from before the first check: a failure on one rank reaches the others
def find_trainer_batch_size(
    trainer: Any,
    *,
    device: DeviceLike = None,
    target_batch_size: int | None = None,
    mode: str = "binsearch",
    eval_batch_size: bool = True,
    safety: float = 0.8,
    multiple_of: int = 1,
    init_batch_size: int | None = None,
    max_batch_size: int | None = None,
    steps_per_trial: int = MIN_STEPS_PER_TRIAL,
    max_trials: int | None = None,
    time_budget: float | None = None,
    progress: ProgressLike = False,
    confirm_steps: int = MIN_STEPS_PER_TRIAL,
    sample_size: SampleSize | None = None,
    scan_budget: float = DEFAULT_SCAN_BUDGET,
    memory_limit: int | str | None = None,
    distributed: bool | None = None,
    search_eval: bool | None = None,
    train: bool = True,
) -> SearchResult:
    """Find the largest batch size a Hugging Face ``Trainer`` can train with, and set it in ``trainer.args``.

    Args:
        trainer: a ``transformers.Trainer`` (or a subclass) with a ``train_dataset`` and
            ``args.auto_find_batch_size=False``. Its model, loaders, optimizer, loss, precision and gradient
            checkpointing are what the trials run (see the module documentation).
        device: ``"cuda"``, ``"cuda:N"``, a ``torch.device``, a :class:`~batchfinder.SimulatedGPU` or ``"sim:16GiB"``.
            Default: the Trainer's device when it is a CUDA GPU (a Trainer on the CPU needs a simulated GPU here).
        target_batch_size: the effective batch size to reach with gradient accumulation, over all ranks: the
            micro-batch goes to ``per_device_train_batch_size`` and the steps to ``gradient_accumulation_steps``.
            Without it ``gradient_accumulation_steps`` is left as it is.
        mode: ``"binsearch"``, ``"power"`` or ``"guided"``, as for :func:`~batchfinder.find_batch_size`.
        eval_batch_size: when the Trainer has an ``eval_dataset``, also search the evaluation batch size (with
            evaluation-only trials, so that evaluation never lowers the training size) and set
            ``per_device_eval_batch_size`` (the Lightning callback's ``eval_batch_size``, the same concept).
        search_eval: the former name of ``eval_batch_size`` (deprecated: it warns, and wins when given).
        train: ``False``: search only ``per_device_eval_batch_size`` (evaluation-only trials of the Trainer's
            ``prediction_step``; needs an ``eval_dataset``), leaving the training arguments as they are.
        init_batch_size: the first size tried (default: ``args.per_device_train_batch_size``).
        sample_size: the size of each training sample (a callable ``index -> number`` or one number per sample).
            Default: the dataset's length column (``args.length_column_name``) or ``input_ids`` lengths for a
            ``datasets.Dataset``, otherwise the number of elements of each sample.
        distributed: ``None`` agrees between ranks when ``torch.distributed`` runs several (under ``accelerate
            launch`` or ``torchrun`` every rank must call this); ``False`` searches on this rank alone.
        safety, multiple_of, max_batch_size, steps_per_trial, max_trials, time_budget, progress, confirm_steps,
        scan_budget, memory_limit: as for :func:`~batchfinder.find_batch_size`.

    Returns:
        The :class:`~batchfinder.SearchResult` (``result.evaluation`` holds the evaluation search). Raises
        ``ImportError`` without transformers, ``TypeError`` for anything but a Trainer, ``ValueError`` for a Trainer
        without training data, with ``auto_find_batch_size`` on, or sharded, and the engine's errors
        (:class:`~batchfinder.NoBatchSizeFitsError`, :class:`~batchfinder.SearchIncompleteError`).
    """
    _check_trainer(trainer)
    args = trainer.args
    if search_eval is not None:
        warnings.warn(
            "find_trainer_batch_size(search_eval=...) is now eval_batch_size=..., as in the Lightning callback",
            DeprecationWarning, stacklevel=3,  # (the caller, past agrees_across_ranks)
        )
        eval_batch_size = search_eval
    if not isinstance(eval_batch_size, bool):
        raise TypeError(f"eval_batch_size must be True or False, not {type(eval_batch_size).__name__}")
    if train is False and trainer.eval_dataset is None:
        raise ValueError("train=False searches per_device_eval_batch_size, but the Trainer has no eval_dataset")
    if init_batch_size is None:
        init_batch_size = max(1, int(args.per_device_train_batch_size))
        if max_batch_size is not None:
            init_batch_size = min(init_batch_size, max_batch_size)
    options = SearchOptions.from_arguments(locals())
    check_scan_budget(scan_budget)
    backend = _device(trainer, device, memory_limit)
    precision = trainer_precision(args)
    module, ddp = trial_model(trainer, distributed)
    with kept_attributes(trainer), checkpointing(module, args) as checkpointed:
        source = training_source(trainer, sample_size, scan_budget) if train else None
        eval_source = evaluation_source(trainer, scan_budget) if (eval_batch_size or not train) else None
        workload = Workload(
            model=module,
            source=source,
            step=loss_step(trainer) if train else None,
            optimizer=optimizer_spec(trainer) if train else None,
            eval_step=eval_step(trainer, precision, backend.torch_device.type) if eval_source is not None else None,
            eval_source=eval_source,
            validate=False,
            search_evaluation=eval_source is not None,
            ddp=ddp,
            precision=precision,
            accumulation_steps=1 if target_batch_size is not None else max(1, int(args.gradient_accumulation_steps)),
        )
        logger.info(
            "searching the Trainer's batch size on %s (%s, %s%s)", backend.name, precision,
            workload.optimizer.label if workload.optimizer is not None else "no optimizer",
            ", gradient checkpointing" if checkpointed else "",
        )
        result = search(workload, backend, options)
    if checkpointed:
        result.notes.append("gradient checkpointing was on during the search, as the training arguments ask")
    apply_result(trainer, result, accumulate=target_batch_size is not None)
    logger.info("find_trainer_batch_size:\n%s", result)
    return result
