"""The :class:`BatchFinder` callback: the engine's search at the start of ``fit`` (and of validate/test/predict).

>>> import batchfinder as bf
>>> from batchfinder.lightning import BatchFinder
>>> finder = BatchFinder(device=bf.SimulatedGPU("64MiB"))      # on a CUDA trainer: BatchFinder()
>>> trainer = pl.Trainer(callbacks=[finder], max_epochs=1)     # doctest: +SKIP
>>> trainer.fit(model, datamodule=dm)                          # doctest: +SKIP
>>> finder.result.batch_size, finder.result.max_batch_size    # doctest: +SKIP

The callback is thin: it checks the trainer, gathers the run's pieces (its steps from
:mod:`~batchfinder.lightning.steps`, its batches from :mod:`~batchfinder.lightning.sources`, the state a trial may
change from :mod:`~batchfinder.lightning.isolation`) into a :class:`~batchfinder.engine.workload.Workload`, calls the same
:func:`~batchfinder.engine.run.search` as :func:`~batchfinder.find_batch_size`, and puts the result where the batch size
lives (:mod:`~batchfinder.lightning.targets`). The result (largest size, recommendation, trial table) is logged to the
trainer's loggers and to Python's logging, and kept in :attr:`BatchFinder.result`.

The search leaves no trace: training starts from exactly the state it would have had without the callback
(weights, buffers, gradients, train/eval flags, optimizer state and hyperparameters, learning-rate schedulers, the
gradient scaler, torchmetrics states, RNG states, global step, epoch and loop progress; nothing is written to disk).

Distributed training: under ``strategy="ddp"`` (and ``ddp_spawn``/``ddp_fork``) every rank runs each trial at the
same size and the ranks agree after each trial (see :mod:`batchfinder.engine.distributed`), so every rank applies the same
batch size; ``target_batch_size`` is the global batch (micro-batch x accumulation x ranks). Trials run on the
unwrapped LightningModule, so no collective runs inside a trial, while DDP's gradient buckets are charged.
Collectives the user's own step code runs (``self.all_gather``, torchmetrics with ``dist_sync_on_step=True``) are not
made safe. Sharded strategies (FSDP, DeepSpeed, model parallel) and XLA are refused with the reason.

Variable-size data (token sequences of different lengths, a padding ``collate_fn``): a trial of size B runs on the B
largest samples of the training loader and of each validation loader (:mod:`batchfinder.training.sample_sizes`), the worst
case of every batch of B a shuffled epoch can draw; ``result.data_scan`` says what the scan found.

Not modelled: a user ``transfer_batch_to_device`` override (batches move with ``.to``-like semantics), dataloader
hooks that cache their loaders (they keep the old batch size), the profiler records the hooks that trials call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..devices.base import DeviceBackend, DeviceLike
from ..devices.cuda import CudaDevice
from ..devices.resolve import resolve_device
from ..devices.simulated import SimulatedGPU
from ..engine.distributed import agreeing_ranks
from ..engine.options import ProgressLike, SearchOptions
from ..engine.run import search
from ..engine.workload import Workload
from ..result import SearchResult
from ..search.checks import MIN_STEPS_PER_TRIAL
from ..training.optimizers import OptimizerSpec
from ..training.precision import cuda_autocast_policies
from ..training.sample_sizes import DEFAULT_SCAN_BUDGET, SampleSize, check_scan_budget
from .framework import Callback, is_overridden, is_param_in_hook_signature, pl
from .guard import GuardHooks, check_guardable, check_on_oom
from .reporting import log_result
from .isolation import isolated, trial_state
from .sources import check_sample_size_option, evaluation_source, training_source
from .steps import LightningSteps
from .strategies import check_strategy
from .targets import (
    Targets,
    check_loader,
    data_source,
    find_targets,
    flatten_loaders,
    reload_evaluation_loop,
)

__all__ = ["BatchFinder"]

logger = logging.getLogger(__name__)

_STAGES = ("fit", "validate", "test", "predict")
_EVAL_HOOKS = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}

def _autocast_as_on(device: DeviceBackend) -> Any:
    """On a simulated GPU the trainer runs on the CPU, where its precision plugin enters the CPU's autocast: make that
    follow CUDA's policies for the search, as the GPU it stands for would (:mod:`batchfinder.training.precision`)."""
    return cuda_autocast_policies() if device.simulated else contextlib.nullcontext()


def _accumulation_of(trainer: pl.Trainer) -> int:
    """The accumulation the trainer's fit runs with (``accumulate_grad_batches``; 1 when unset or not a number)."""
    steps = getattr(trainer, "accumulate_grad_batches", 1)
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 1 else 1


class BatchFinder(GuardHooks, Callback):
    """Find the batch size at the start of ``fit`` (and optionally of validate/test/predict) and apply it.

    Args:
        mode: search mode, as for :func:`~batchfinder.find_batch_size` (``"binsearch"``, ``"power"``, ``"guided"``).
        safety: the recommendation is ``floor(safety * largest size that fits)`` (default 0.8).
        init_batch_size: first size tried (default 16).
        max_batch_size: never try more than this (the dataset length caps the search as well).
        steps_per_trial: training steps per trial, at least 2 (optimizer state is allocated at the first step).
        multiple_of: round the recommendation down to a multiple of this.
        max_trials: stop after this many trials.
        time_budget: start no new trial after this many seconds.
        device: where to measure: a :class:`~batchfinder.SimulatedGPU` (or ``"sim:16GiB"``) on machines without a
            GPU, a CUDA device, a list with one device per rank, or a callable ``global_rank -> device``.
            Default: the trainer's CUDA device.
        memory_limit: on CUDA, make the GPU behave like one with this much memory (e.g. ``"16GiB"``).
        batch_arg_name: the attribute (or hparams key) of the model or datamodule that holds the batch size.
        validate: run ``validation_step`` at the same batch size in every trial (when the model validates).
        eval_batch_size: also search an evaluation batch size: ``True`` applies it to ``eval_batch_size``, a string
            names the attribute; validation dataloaders passed to ``fit()`` directly are rebuilt with it.
        target_batch_size: effective batch size to reach with gradient accumulation (across all ranks under DDP):
            the micro-batch is applied as the batch size and ``trainer.accumulate_grad_batches`` is set.
        stages: the stages that search: any of ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` (default
            ``"fit"``). Evaluation stages search with evaluation-only trials of their own step.
        distributed: ``None`` (default) agrees between ranks when ``torch.distributed`` is initialised; ``False``
            lets every rank search on its own (and possibly apply a different size).
        progress: True to print a line per trial to standard error, or a callable receiving each ``Trial``.
        log_results: log the result to the trainer's loggers (hyperparameters and metrics under ``batchfinder/``).
        confirm_steps: after the search, this many training steps at the recommended size in one trial, as for
            :func:`~batchfinder.find_batch_size` (for variable-size data: batches in the loader's order, then the
            largest samples).
        sample_size: the size of each training sample, when sizes vary: a callable ``index -> number`` or one number
            per sample; with a dict of training dataloaders, a dict of those by loader name. Default: element counts.
            Trials of size B run on each loader's B largest samples (validation loaders' too, by element count).
        scan_budget: seconds the scan of each loader's sample sizes may take (default 10).
        train: ``False``: at ``fit``, search only the evaluation batch size (evaluation-only trials of
            ``validation_step``, applied where ``eval_batch_size`` says; needs it), not the training batch size.
        on_oom: ``"split"``: a training batch that runs out of memory is redone in micro-batches for the rest of
            ``fit``, without a restart (:mod:`batchfinder.lightning.guard`); None (default): no guard.

    After a search :attr:`result` holds the :class:`~batchfinder.SearchResult` (:attr:`results` one per stage).
    """

    def __init__(
        self,
        *,
        mode: str = "binsearch",
        safety: float = 0.8,
        init_batch_size: int = 16,
        max_batch_size: int | None = None,
        steps_per_trial: int = MIN_STEPS_PER_TRIAL,
        multiple_of: int = 1,
        max_trials: int | None = None,
        time_budget: float | None = None,
        device: DeviceLike | Sequence[DeviceLike] | Callable[[int], DeviceLike] = None,
        memory_limit: int | str | None = None,
        batch_arg_name: str | None = None,
        validate: bool = True,
        eval_batch_size: bool | str = False,
        target_batch_size: int | None = None,
        stages: str | Sequence[str] = "fit",
        distributed: bool | None = None,
        progress: ProgressLike = False,
        log_results: bool = True,
        confirm_steps: int = MIN_STEPS_PER_TRIAL,
        sample_size: SampleSize | dict[str, SampleSize] | None = None,
        scan_budget: float = DEFAULT_SCAN_BUDGET,
        train: bool = True,
        on_oom: str | None = None,
    ) -> None:
        super().__init__()
        self.options = SearchOptions.from_arguments(locals())
        self.on_oom = check_on_oom(on_oom)
        if batch_arg_name is not None and (not isinstance(batch_arg_name, str) or not batch_arg_name.isidentifier()):
            raise ValueError(f"batch_arg_name={batch_arg_name!r} must be an attribute name such as 'batch_size'")
        if not isinstance(eval_batch_size, (bool, str)):
            raise TypeError(
                f"eval_batch_size must be True, False or an attribute name, not {type(eval_batch_size).__name__}"
            )
        if isinstance(eval_batch_size, str) and not eval_batch_size.isidentifier():
            raise ValueError(f"eval_batch_size={eval_batch_size!r} must be True, False or an attribute name")
        stage_list = [stages] if isinstance(stages, str) else list(stages)
        if not stage_list or any(s not in _STAGES for s in stage_list):
            raise ValueError(f"stages={stages!r}: each stage must be one of {list(_STAGES)}")
        if not train and "fit" in stage_list and not eval_batch_size:
            raise ValueError("train=False searches only the evaluation batch size at fit: pass eval_batch_size=True")
        check_sample_size_option(sample_size)
        self.sample_size = sample_size
        self.scan_budget = check_scan_budget(scan_budget)
        if memory_limit is not None and device is not None and not isinstance(device, (str, torch.device)):
            raise ValueError("memory_limit applies to CUDA devices named by string or torch.device only")
        self.device = device
        self.memory_limit = memory_limit
        self.batch_arg_name = batch_arg_name or "batch_size"
        self._batch_arg_name_given = batch_arg_name is not None
        self.validate = validate
        self.eval_batch_arg_name: str | None = (
            eval_batch_size if isinstance(eval_batch_size, str) else ("eval_batch_size" if eval_batch_size else None)
        )
        self.stages = tuple(stage_list)
        self.log_results = log_results
        self.result: SearchResult | None = None
        """The latest search's result (the same :class:`~batchfinder.SearchResult` as the function returns)."""
        self.results: dict[str, SearchResult] = {}
        """The latest result of each stage that searched."""

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for ``ddp_spawn``: a simulated GPU travels as its capacity (each process gets a fresh one)."""
        state = self.__dict__.copy()
        if isinstance(self.device, SimulatedGPU):
            state["device"] = f"sim:{self.device.capacity_bytes}:{self.device.allocator}"
        return state

    # -- checks before any trial -------------------------------------------------------------------------------
    def _resolve_device(self, trainer: pl.Trainer) -> DeviceBackend:
        device = self.device
        if isinstance(device, (list, tuple)):
            if len(device) <= trainer.global_rank:
                raise ValueError(f"device lists {len(device)} devices (one per rank); this is rank {trainer.global_rank}")
            device = device[trainer.global_rank]
        elif callable(device) and not isinstance(device, (DeviceBackend, str, torch.device)):
            device = device(trainer.global_rank)
        if device is None:
            root = trainer.strategy.root_device
            if root.type == "cuda":
                return CudaDevice(root, memory_limit=self.memory_limit)
            raise ValueError(
                f"the trainer runs on {root} and BatchFinder measures GPU memory: pass "
                "BatchFinder(device=batchfinder.SimulatedGPU('16GiB')) to search for a GPU of that size on this machine"
            )
        return resolve_device(device, memory_limit=self.memory_limit)

    def _targets(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str, name: str, *, evaluation: bool) -> Targets:
        explicit = (name == self.batch_arg_name and self._batch_arg_name_given) or (
            evaluation and name == self.eval_batch_arg_name and name != "eval_batch_size"
        )
        return find_targets(trainer, module, stage, name, evaluation=evaluation, explicit=explicit)

    def _eval_stage_name(self) -> str:
        return self.eval_batch_arg_name or self.batch_arg_name

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the strategy, the device and where the batch size goes, before any trial runs."""
        if stage not in self.stages:
            return
        with agreeing_ranks(self.options.distributed):  # a check failing on one rank reaches the others
            check_strategy(trainer)
            self._resolve_device(trainer)
            if stage != "fit":
                self._targets(trainer, pl_module, stage, self._eval_stage_name(), evaluation=True)
                return
            self._targets(trainer, pl_module, stage, self.batch_arg_name, evaluation=False)
            if self.eval_batch_arg_name is not None:
                self._targets(trainer, pl_module, stage, self.eval_batch_arg_name, evaluation=True)
            if self.options.target_batch_size is not None:
                if not pl_module.automatic_optimization:
                    raise ValueError(
                        "target_batch_size needs automatic optimization: under manual optimization the training_step "
                        "decides when the optimizer steps, so accumulate there"
                    )
                if any(type(c).__name__ == "GradientAccumulationScheduler" for c in trainer.callbacks):
                    raise ValueError(
                        "target_batch_size sets trainer.accumulate_grad_batches, which a GradientAccumulationScheduler "
                        "callback would override; use one or the other"
                    )
            if self.on_oom is not None:  # refused now, not after a search whose answer the guard could not use
                if self.options.target_batch_size is not None:
                    raise ValueError(
                        "on_oom='split' needs accumulate_grad_batches=1, and target_batch_size reaches its target with "
                        "gradient accumulation: use one or the other"
                    )
                check_guardable(trainer, pl_module)
            if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
                raise ValueError("training_step takes a dataloader_iter: it chooses its own batches, so there is no "
                                 "batch to size")

    # -- hooks -------------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "fit" in self.stages:
            self._search_fit(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "validate" in self.stages and not trainer.sanity_checking and trainer.state.fn == "validate":
            self._search_eval(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._search_eval(trainer, pl_module, "test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "predict" in self.stages:
            self._search_eval(trainer, pl_module, "predict")

    # -- searches ----------------------------------------------------------------------------------------------------
    def _validation_loaders(self, trainer: pl.Trainer, module: pl.LightningModule) -> list[DataLoader]:
        if not is_overridden("validation_step", module) or trainer.limit_val_batches == 0:
            return []
        source = data_source(trainer, "fit", validation_of_fit=True)
        if source is None or not source.is_defined():
            return []
        return [check_loader(loader, "validation") for loader in flatten_loaders(source.dataloader())]

    def _search_fit(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        with agreeing_ranks(self.options.distributed):  # from the first check on, a failure reaches the others
            check_strategy(trainer)
            if not self.options.train and self.eval_batch_arg_name is not None:
                targets = self._targets(trainer, module, "fit", self.eval_batch_arg_name, evaluation=True)
                if not (loaders := self._validation_loaders(trainer, module)):
                    raise ValueError(
                        "train=False searches the evaluation batch size, but the run has no validation data"
                    )
                return self._evaluation_search(trainer, module, "fit", targets, loaders, "validation_step")
            targets = self._targets(trainer, module, "fit", self.batch_arg_name, evaluation=False)
            eval_targets = (
                self._targets(trainer, module, "fit", self.eval_batch_arg_name, evaluation=True)
                if self.eval_batch_arg_name is not None
                else None
            )
            device = self._resolve_device(trainer)
            wrapped = trainer.strategy.model
            steps = LightningSteps(trainer, module, device, "validation_step")
            with isolated(trainer, module, steps), _autocast_as_on(device):
                source = training_source(
                    data_source(trainer, "fit").dataloader(), module, sample_size=self.sample_size,
                    scan_budget=self.scan_budget,
                )
                val_loaders = self._validation_loaders(trainer, module) if (self.validate or eval_targets) else []
                eval_source = evaluation_source(val_loaders, module, scan_budget=self.scan_budget) if val_loaders else None
                steps.eval_loaders = len(val_loaders)
                optimizers = list(trainer.optimizers)
                spec = (
                    OptimizerSpec(lambda: optimizers[0], optimizers[0], type(optimizers[0]).__name__) if optimizers else None
                )
                workload = Workload(
                    module,
                    source,
                    steps.loss_step,
                    spec,
                    train_step=steps.train_step,
                    eval_step=steps.eval_step if eval_source is not None else None,
                    eval_source=eval_source,
                    validate=self.validate,
                    search_evaluation=eval_targets is not None,
                    extra_optimizers=optimizers[1:],
                    extra_state=trial_state(trainer, module),
                    ddp=wrapped if isinstance(wrapped, nn.parallel.DistributedDataParallel) else None,
                    accumulation_steps=_accumulation_of(trainer),
                )
                result = search(workload, device, self.options)
            if eval_targets is not None and result.eval_batch_size is None:
                logger.warning("no validation data to search an evaluation batch size with: %s is left as it is",
                               self.eval_batch_arg_name)
            if eval_targets is not None and result.eval_batch_size is not None:
                targets.apply(result.micro_batch_size, skip=(data_source(trainer, "fit", validation_of_fit=True),))
                eval_targets.apply(result.eval_batch_size)
            else:
                targets.apply(result.micro_batch_size)
            if self.options.target_batch_size is not None:
                trainer.accumulate_grad_batches = result.accumulation_steps
            self._report(trainer, result, "fit")

    def _search_eval(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        with agreeing_ranks(self.options.distributed):  # from the first check on, a failure reaches the others
            check_strategy(trainer)
            targets = self._targets(trainer, module, stage, self._eval_stage_name(), evaluation=True)
            self._resolve_device(trainer)
            loop = {"validate": trainer.validate_loop, "test": trainer.test_loop, "predict": trainer.predict_loop}[stage]
            combined = loop._combined_loader
            loaders = list(combined.flattened) if combined is not None else flatten_loaders(loop._data_source.dataloader())
            loaders = [check_loader(loader, stage) for loader in loaders]
            if not loaders:
                raise ValueError(f"there is no {stage} dataloader to search a batch size with")
            self._evaluation_search(trainer, module, stage, targets, loaders, _EVAL_HOOKS[stage])
            reload_evaluation_loop(loop)

    def _evaluation_search(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str, targets: Targets,
                           loaders: list[DataLoader], hook: str) -> None:
        """An evaluation-only search of ``hook`` over ``loaders``, applied to ``targets`` and reported as ``stage``."""
        device = self._resolve_device(trainer)
        steps = LightningSteps(trainer, module, device, hook, eval_loaders=len(loaders))
        with isolated(trainer, module, steps), _autocast_as_on(device):
            workload = Workload(
                module,
                None,
                None,
                None,
                eval_step=steps.eval_step,
                eval_source=evaluation_source(loaders, module, scan_budget=self.scan_budget),
                extra_state=trial_state(trainer, module),
            )
            result = search(workload, device, self.options)
        targets.apply(result.batch_size)
        self._report(trainer, result, stage)

    # -- reporting ---------------------------------------------------------------------------------------------------
    def _report(self, trainer: pl.Trainer, result: SearchResult, stage: str) -> None:
        # The trials ran the trainer's precision plugin (its autocast, its loss scaling): the result says which.
        for searched in (result, result.evaluation):
            if searched is not None:
                searched.precision = str(trainer.precision)
        self.result = result
        self.results[stage] = result
        logger.info("BatchFinder (%s, rank %d):\n%s", stage, trainer.global_rank, result)
        if not self.log_results:
            return
        log_result(trainer, result, stage)
