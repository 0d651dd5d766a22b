"""PyTorch Lightning integration: the :class:`BatchFinder` callback.

>>> import batchfinder as bf
>>> from batchfinder.lightning import BatchFinder
>>> finder = BatchFinder(device=bf.SimulatedGPU("64MiB"))      # on a CUDA trainer: BatchFinder()
>>> trainer = pl.Trainer(callbacks=[finder], max_epochs=1)     # doctest: +SKIP
>>> trainer.fit(model, datamodule=dm)                          # doctest: +SKIP
>>> finder.result.batch_size, finder.result.max_batch_size    # doctest: +SKIP

At the start of ``fit`` the callback searches the batch size with the same engine, modes, safety factor and trial
reporting as :func:`~batchfinder.find_batch_size`, using the LightningModule itself: its ``training_step``, the
optimizers and learning-rate schedulers of ``configure_optimizers`` (several optimizers under manual optimization),
its ``optimizer_step``/``optimizer_zero_grad``/``backward``/gradient-clipping hooks and the trainer's precision plugin
(autocast, gradient scaler). Each trial also runs ``validation_step`` at the same batch size (``validate=True``), so
a size whose validation does not fit is never recommended; ``eval_batch_size=True`` also searches a separate
evaluation batch size. ``stages`` adds searches at the start of ``validate``, ``test`` and ``predict``.

Where the result goes: ``model.<batch_arg_name>``, ``model.hparams.<batch_arg_name>``, ``datamodule.<...>`` and
``datamodule.hparams.<...>`` (every one that exists), and dataloaders passed to ``fit()`` directly are rebuilt with
the new batch size (same sampler, collate_fn, workers and other settings, see :mod:`batchfinder.loaders`). With
``target_batch_size`` the micro-batch goes there and ``trainer.accumulate_grad_batches`` gets the accumulation
steps. The result (largest size, recommendation, trial table) is logged to the trainer's loggers and to the
``batchfinder`` Python logger, and kept in :attr:`BatchFinder.result`.

The search leaves no trace: training starts from exactly the state it would have had without the callback, i.e.
weights, buffers, gradients, train/eval flags, optimizer state and hyperparameters, learning-rate schedulers, the
gradient scaler, torchmetrics states, RNG states (torch, CUDA, Python, NumPy), global step, epoch and loop
progress (no loop runs during the search), callbacks (none is called during trials) and loggers (trials log
nothing: ``self.log`` is silenced and loggers are replaced by a dummy). Nothing is written to disk.

Distributed training: under ``strategy="ddp"`` (and ``ddp_spawn``/``ddp_fork``) every rank runs each trial at the
same size and the ranks agree after each trial (see :mod:`batchfinder.distributed`): a size fits only if it fitted
on every rank, so every rank applies the same batch size. Trials run on the unwrapped LightningModule, so no
collective runs inside a trial (``SyncBatchNorm`` normalises locally, ``manual_backward`` does not prepare DDP's
reducer), while DDP's gradient buckets are charged. Collectives the user's own step code runs (``self.all_gather``,
``self.log(..., sync_dist=True)`` is silenced, torchmetrics with ``dist_sync_on_step=True``) are not made safe.
Sharded strategies (FSDP, DeepSpeed, model parallel) and XLA are refused with the reason.

Not modelled: a user ``transfer_batch_to_device`` override (batches move with ``.to``-like semantics),
dataloader hooks that cache their loaders (they keep the old batch size), the profiler records the hooks that trials
call.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

try:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.loggers.logger import DummyLogger
    from pytorch_lightning.utilities.model_helpers import is_overridden
    from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature
except ImportError:  # pragma: no cover - the unified ``lightning`` package
    import lightning.pytorch as pl  # type: ignore[no-redef]
    from lightning.pytorch.callbacks import Callback  # type: ignore[no-redef]
    from lightning.pytorch.loggers.logger import DummyLogger  # type: ignore[no-redef]
    from lightning.pytorch.utilities.model_helpers import is_overridden  # type: ignore[no-redef]
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature  # type: ignore[no-redef]

from .accumulation import validate_target_batch_size
from .accounting import host_side_loading
from .batching import BatchSource
from .cuda import CudaDevice
from .devices import DeviceBackend, DeviceLike, resolve_device
from .distributed import ddp_bucket_bytes, resolve_agreement
from .engine import (
    STRATEGIES,
    ProgressLike,
    SearchContext,
    SearchResult,
    _validate_search,
    open_session,
    run_search,
)
from .loaders import rebuild_dataloaders
from .optimizers import OptimizerSpec
from .simulated import SimulatedGPU
from .state import RngState
from .trial import TrialSession
from .validation import MIN_STEPS_PER_TRIAL, check_steps_per_trial

__all__ = ["BatchFinder"]

logger = logging.getLogger("batchfinder")

_STAGES = ("fit", "validate", "test", "predict")
_EVAL_HOOKS = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
_REFUSED_STRATEGIES = {
    "FSDPStrategy": "it shards parameters, gradients and optimizer state across ranks and gathers them with "
    "collectives inside forward and backward, so a trial's memory depends on the sharding and one rank running out "
    "of memory would leave the others waiting",
    "DeepSpeedStrategy": "DeepSpeed's engine partitions optimizer state (ZeRO) and owns the backward pass and the "
    "optimizer step, with collectives inside them; use DeepSpeed's own autotuner",
    "ModelParallelStrategy": "tensor and fully-sharded parallelism spread each layer over several devices, with "
    "collectives inside forward and backward",
    "XLAStrategy": "XLA compiles a graph per batch size and does not report out-of-memory errors that a process can "
    "recover from",
    "SingleDeviceXLAStrategy": "XLA compiles a graph per batch size and does not report out-of-memory errors that a "
    "process can recover from",
}


# -- where the batch size lives ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Holder:
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


def _holds_batch_size(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _find_holders(trainer: pl.Trainer, module: pl.LightningModule, name: str) -> list[_Holder]:
    """Every place ``name`` is kept: model attribute, model.hparams, datamodule attribute, datamodule.hparams."""
    holders: list[_Holder] = []
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
            holders.append(_Holder(owner, name, False, f"{label}.{name}"))
        hparams = getattr(owner, "hparams", None)
        if isinstance(hparams, Mapping) and name in hparams:
            if not _holds_batch_size(hparams[name]):
                raise ValueError(f"{label}.hparams.{name} is {hparams[name]!r}, not a batch size (a whole number)")
            holders.append(_Holder(hparams, name, True, f"{label}.hparams.{name}"))
    return holders


def _data_source(trainer: pl.Trainer, stage: str, *, validation_of_fit: bool = False) -> Any:
    """Lightning's record of where a stage's dataloaders come from (a module's hook or loaders given directly)."""
    if stage == "fit":
        return trainer.fit_loop.epoch_loop.val_loop._data_source if validation_of_fit else trainer.fit_loop._data_source
    loops = {"validate": trainer.validate_loop, "test": trainer.test_loop, "predict": trainer.predict_loop}
    return loops[stage]._data_source


def _passed_directly(source: Any) -> bool:
    """True when the loaders were passed to fit()/test()/... rather than returned by a ``*_dataloader`` hook."""
    return source is not None and source.instance is not None and not source.is_module()


def _flatten_loaders(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    flattened = getattr(loaders, "flattened", None)  # a CombinedLoader
    if flattened is not None and not isinstance(loaders, (DataLoader, Mapping, list, tuple)):
        return list(flattened)
    if isinstance(loaders, Mapping):
        return [leaf for value in loaders.values() for leaf in _flatten_loaders(value)]
    if isinstance(loaders, (list, tuple)):
        return [leaf for value in loaders for leaf in _flatten_loaders(value)]
    return [loaders]


def _check_loader(loader: Any, what: str) -> DataLoader:
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"the {what} dataloader is a {type(loader).__name__}, not a torch DataLoader: batches of any size are built "
            "from a DataLoader's dataset and collate_fn"
        )
    return loader


# -- batches -------------------------------------------------------------------------------------------------------
class _HookedSource:
    """A :class:`BatchSource` whose host batches pass through ``on_before_batch_transfer``, as Lightning's do."""

    def __init__(self, source: Any, hook: Callable[[Any], Any]) -> None:
        self.source = source
        self.hook = hook
        self.length = source.length

    def batch(self, batch_size: int) -> Any:
        with host_side_loading():  # host memory, also when a simulated GPU is measuring around the search
            return self.hook(self.source.batch(batch_size))


class _StructuredSource:
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


class _PerLoader:
    """Evaluation batches, one per dataloader. Not a pytree: each moves to the device only when its step runs."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches


class _EvalSource:
    """Evaluation batches of a requested size for every evaluation dataloader (capped at each dataset's length)."""

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources
        self.length = max(source.length for source in sources)

    def batch(self, batch_size: int) -> _PerLoader:
        return _PerLoader([source.batch(min(batch_size, source.length)) for source in self.sources])


def _batch_source(loader: DataLoader, module: pl.LightningModule, dataloader_idx: int) -> _HookedSource:
    return _HookedSource(BatchSource(loader), lambda batch: module.on_before_batch_transfer(batch, dataloader_idx))


# -- steps ---------------------------------------------------------------------------------------------------------
def _loss_of(output: Any) -> torch.Tensor | None:
    if output is None or isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        loss = output.get("loss")
        if loss is None:
            raise ValueError("training_step returned a dict without a 'loss' key (automatic optimization needs one)")
        return loss
    raise TypeError(f"training_step returned {type(output).__name__}: automatic optimization needs a loss tensor, a "
                    "dict with 'loss', or None")


def _step_args(hook: Callable[..., Any], batch: Any, batch_idx: int, dataloader_idx: int | None) -> list[Any]:
    args = [batch]
    if is_param_in_hook_signature(hook, "batch_idx", min_args=2):
        args.append(batch_idx)
        if dataloader_idx is not None:
            args.append(dataloader_idx)
    return args


class _LightningSteps:
    """A LightningModule's training and evaluation steps as trial steps, the way Lightning's loops run them."""

    def __init__(self, trainer: pl.Trainer, module: pl.LightningModule, device: DeviceBackend, eval_hook: str) -> None:
        self.trainer = trainer
        self.module = module
        self.device = device
        self.precision = trainer.precision_plugin
        self.eval_hook = eval_hook
        self.eval_loaders = 1

    # training ---------------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The precision plugin's backward (loss scaling, ``backward`` hook) without the strategy's DDP preparation."""
        loss = self.precision.pre_backward(loss, self.module)
        self.precision.backward(loss, self.module, optimizer, *args, **kwargs)
        return self.precision.post_backward(loss, self.module)

    def forward(self, batch: Any, batch_idx: int) -> Any:
        module = self.module
        with self.precision.train_step_context():
            return module.training_step(*_step_args(module.training_step, batch, batch_idx, None))

    def train_step(self, model: nn.Module, batch: Any, index: int) -> None:
        """One training step as Lightning's loop runs it (automatic or manual optimization)."""
        module = self.module
        batch = module.on_after_batch_transfer(batch, 0)
        if not module.automatic_optimization:
            self.forward(batch, index)
            return
        epoch = self.trainer.current_epoch
        optimizer = self.trainer.optimizers[0]
        lightning_optimizer = module.optimizers(use_pl_optimizer=True)
        if isinstance(lightning_optimizer, list):
            lightning_optimizer = lightning_optimizer[0]

        def closure() -> torch.Tensor | None:
            loss = _loss_of(self.forward(batch, index))
            module.optimizer_zero_grad(epoch, index, optimizer)  # Lightning zeroes after the forward pass
            if loss is None:
                return None
            return self.backward(loss, optimizer)

        module.optimizer_step(epoch, index, lightning_optimizer, closure)

    def loss_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training step's loss (for search modes that model memory from a forward pass)."""
        loss = _loss_of(self.forward(self.module.on_after_batch_transfer(batch, 0), 0))
        if loss is None:
            raise ValueError("training_step returned None (manual optimization?): no loss to measure")
        return loss

    # evaluation -------------------------------------------------------------------------------------------------
    def eval_step(self, model: nn.Module, batches: Any) -> None:
        """One step of ``validation_step``/``test_step``/``predict_step`` per evaluation dataloader, in turn."""
        module = self.module
        hook = getattr(module, self.eval_hook)
        context = {
            "validation_step": self.precision.val_step_context,
            "test_step": self.precision.test_step_context,
            "predict_step": self.precision.predict_step_context,
        }[self.eval_hook]
        items = batches.batches if isinstance(batches, _PerLoader) else [batches]
        for index, host_batch in enumerate(items):
            batch = module.on_after_batch_transfer(self.device.to_device(host_batch), index)
            with context():
                output = hook(*_step_args(hook, batch, 0, index if self.eval_loaders > 1 else None))
            del batch, output


# -- leaving no trace ------------------------------------------------------------------------------------------------
_METRIC_FIELDS = ("_update_count", "_computed", "_forward_cache", "_is_synced", "_cache", "_should_unsync")
_MISSING = object()


def _copy_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is restored by reference
        return value


def _is_metric(module: nn.Module) -> bool:
    return isinstance(getattr(module, "_defaults", None), dict) and hasattr(module, "_update_count")


@contextlib.contextmanager
def _attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set an instance attribute for the length of the block; the previous one (or none) comes back."""
    previous = owner.__dict__.get(name, _MISSING)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if previous is _MISSING:
            owner.__dict__.pop(name, None)
        else:
            owner.__dict__[name] = previous


_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules"})


def _copy_containers(value: Any) -> Any:
    """A copy of nested lists, tuples, dicts and sets whose leaves are the very same objects."""
    if isinstance(value, list):
        return [_copy_containers(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy_containers(v) for k, v in value.items()}
    if isinstance(value, set):
        return set(value)
    return value


def _restore_containers(live: Any, saved: Any) -> Any:
    """Put the saved contents back into ``live`` in place (so references held elsewhere see them); returns the
    object to keep."""
    if isinstance(live, list) and isinstance(saved, list):
        live[:] = saved
    elif isinstance(live, dict) and isinstance(saved, dict):
        live.clear()
        live.update(saved)
    elif isinstance(live, set) and isinstance(saved, set):
        live.clear()
        live.update(saved)
    else:
        return saved
    return live


class _ModuleAttributes:
    """Every module's own Python attributes (counters, histories, lists of step outputs, caches), put back after
    the trials: rebound attributes get their object back, lists/dicts/sets their contents, new attributes go."""

    def __init__(self, module: nn.Module) -> None:
        self.saved = [
            (m, {k: (v, _copy_containers(v)) for k, v in vars(m).items() if k not in _MODULE_INTERNALS})
            for m in module.modules()
        ]

    def restore(self) -> None:
        for module, attributes in self.saved:
            live = vars(module)
            for key in [k for k in live if k not in attributes and k not in _MODULE_INTERNALS]:
                del live[key]
            for key, (original, contents) in attributes.items():
                live[key] = _restore_containers(original, contents)


@contextlib.contextmanager
def _untouched(trainer: pl.Trainer, module: pl.LightningModule, steps: _LightningSteps) -> Iterator[None]:
    """Isolate the trials from the trainer: no callback is called, nothing is logged, and every piece of state a
    trial can change outside the model and optimizers (schedulers, gradient scaler, optimizer attributes, metric
    states, RNG, the module's current hook name) is put back on exit."""
    rng = RngState.capture()
    schedulers = [(c.scheduler, copy.deepcopy(c.scheduler.state_dict())) for c in trainer.lr_scheduler_configs]
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scaler_state = {k: _copy_value(v) for k, v in vars(scaler).items()} if scaler is not None else None
    optimizer_attributes = [
        (optimizer, {k: v for k, v in vars(optimizer).items() if k not in ("state", "param_groups", "defaults")})
        for optimizer in trainer.optimizers
    ]
    metrics = [
        (m, {k: _copy_value(v) for k, v in vars(m).items() if k in m._defaults or k in _METRIC_FIELDS})
        for m in module.modules()
        if _is_metric(m)
    ]
    attributes = _ModuleAttributes(module)
    callbacks = trainer.callbacks
    loggers = trainer.loggers

    def silent(*args: Any, **kwargs: Any) -> None:
        return None

    try:
        trainer.callbacks = []
        if loggers:
            trainer.loggers = [DummyLogger()]
        with contextlib.ExitStack() as stack:
            stack.enter_context(_attribute(module, "log", silent))
            stack.enter_context(_attribute(module, "log_dict", silent))
            stack.enter_context(
                _attribute(module, "manual_backward", lambda loss, *a, **k: steps.backward(loss, None, *a, **k))
            )
            yield
    finally:
        trainer.callbacks = callbacks
        trainer.loggers = loggers
        attributes.restore()
        for scheduler, state in schedulers:
            scheduler.load_state_dict(copy.deepcopy(state))
        if scaler is not None and scaler_state is not None:
            for key in [k for k in vars(scaler) if k not in scaler_state]:
                delattr(scaler, key)
            vars(scaler).update(scaler_state)
        for optimizer, attributes in optimizer_attributes:
            extra = [k for k in vars(optimizer) if k not in attributes and k not in ("state", "param_groups", "defaults")]
            for key in extra:
                delattr(optimizer, key)
            vars(optimizer).update(attributes)
        for metric, saved in metrics:
            for key, value in saved.items():
                object.__setattr__(metric, key, _copy_value(value))
        rng.restore()


# -- the callback ----------------------------------------------------------------------------------------------
class BatchFinder(Callback):
    """Find the batch size at the start of ``fit`` (and optionally of validate/test/predict) and apply it.

    Args:
        mode: search mode, as for :func:`~batchfinder.find_batch_size` (``"binsearch"``, ``"power"``, ...).
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
    ) -> None:
        super().__init__()
        if not isinstance(mode, str):
            raise TypeError(f"mode must be a string, not {type(mode).__name__}")
        # A mode registered after this callback is built is checked again in setup().
        _validate_search(mode if mode in STRATEGIES else "binsearch", init_batch_size, max_batch_size, safety,
                         multiple_of, max_trials, time_budget)
        check_steps_per_trial(steps_per_trial)
        validate_target_batch_size(target_batch_size)
        if batch_arg_name is not None and (not isinstance(batch_arg_name, str) or not batch_arg_name.isidentifier()):
            raise ValueError(f"batch_arg_name={batch_arg_name!r} must be an attribute name such as 'batch_size'")
        if isinstance(eval_batch_size, str) and not eval_batch_size.isidentifier():
            raise ValueError(f"eval_batch_size={eval_batch_size!r} must be True, False or an attribute name")
        if not isinstance(eval_batch_size, (bool, str)):
            raise TypeError(
                f"eval_batch_size must be True, False or an attribute name, not {type(eval_batch_size).__name__}"
            )
        stage_list = [stages] if isinstance(stages, str) else list(stages)
        unknown = [s for s in stage_list if s not in _STAGES]
        if unknown or not stage_list:
            raise ValueError(f"stages={stages!r}: each stage must be one of {list(_STAGES)}")
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError("distributed must be True, False or None")
        if memory_limit is not None and device is not None and not isinstance(device, (str, torch.device)):
            raise ValueError("memory_limit applies to CUDA devices named by string or torch.device only")
        self.mode = mode
        self.safety = safety
        self.init_batch_size = init_batch_size
        self.max_batch_size = max_batch_size
        self.steps_per_trial = steps_per_trial
        self.multiple_of = multiple_of
        self.max_trials = max_trials
        self.time_budget = time_budget
        self.device = device
        self.memory_limit = memory_limit
        self.batch_arg_name = batch_arg_name or "batch_size"
        self._batch_arg_name_given = batch_arg_name is not None
        self.validate = validate
        self.eval_batch_arg_name: str | None = (
            eval_batch_size if isinstance(eval_batch_size, str) else ("eval_batch_size" if eval_batch_size else None)
        )
        self.target_batch_size = target_batch_size
        self.stages = tuple(stage_list)
        self.distributed = distributed
        self.progress = progress
        self.log_results = log_results
        self.result: SearchResult | None = None
        """The latest search's result (the same :class:`~batchfinder.SearchResult` as the function returns)."""
        self.results: dict[str, SearchResult] = {}
        """The latest result of each stage that searched."""

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for ``ddp_spawn``: a simulated GPU travels as its capacity (each process gets a fresh one)."""
        state = self.__dict__.copy()
        if isinstance(self.device, SimulatedGPU):
            state["device"] = f"sim:{self.device.capacity_bytes}"
        return state

    # -- checks before any trial -------------------------------------------------------------------------------
    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        names = [cls.__name__ for cls in type(strategy).__mro__]
        for name, reason in _REFUSED_STRATEGIES.items():
            if name in names:
                raise ValueError(f"BatchFinder does not support the {type(strategy).__name__} strategy: {reason}.")
        if not any(name in names for name in _SUPPORTED_STRATEGIES):
            raise ValueError(
                f"BatchFinder does not support the {type(strategy).__name__} strategy: it runs single-device and DDP "
                "training (ddp, ddp_spawn, ddp_fork, ddp_notebook), where every device holds a whole model replica and "
                "no collective needs to run inside a trial"
            )

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

    def _targets(
        self, trainer: pl.Trainer, module: pl.LightningModule, stage: str, name: str, *, evaluation: bool
    ) -> tuple[list[_Holder], list[Any]]:
        """Where a batch size for ``stage`` goes: attribute holders, and the data sources whose loaders were passed
        directly (to rebuild). Raises before any trial when there is nowhere to put it."""
        holders = _find_holders(trainer, module, name)
        if stage == "fit":
            sources = [_data_source(trainer, "fit", validation_of_fit=True)] if evaluation else [
                _data_source(trainer, "fit"), _data_source(trainer, "fit", validation_of_fit=True)
            ]
        else:
            sources = [_data_source(trainer, stage)]
        direct = [s for s in sources if _passed_directly(s)]
        explicit = (name == self.batch_arg_name and self._batch_arg_name_given) or (
            evaluation and name == self.eval_batch_arg_name and name != "eval_batch_size"
        )
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
            for loader in _flatten_loaders(sources[0].instance):
                _check_loader(loader, "training")
        return holders, direct

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the strategy, the device and where the batch size goes, before any trial runs."""
        if stage not in self.stages:
            return
        self._check_strategy(trainer)
        self._resolve_device(trainer)
        if self.mode not in STRATEGIES:
            raise ValueError(f"mode={self.mode!r} is not a search mode; choose one of {sorted(STRATEGIES)}")
        if stage == "fit":
            self._targets(trainer, pl_module, stage, self.batch_arg_name, evaluation=False)
            if self.eval_batch_arg_name is not None:
                self._targets(trainer, pl_module, stage, self.eval_batch_arg_name, evaluation=True)
            if self.target_batch_size is not None:
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
            if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
                raise ValueError("training_step takes a dataloader_iter: it chooses its own batches, so there is no "
                                 "batch to size")
        else:
            self._targets(trainer, pl_module, stage, self._eval_stage_name(), evaluation=stage != "fit")

    def _eval_stage_name(self) -> str:
        return self.eval_batch_arg_name or self.batch_arg_name

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
    def _search_kwargs(self) -> dict[str, Any]:
        return dict(
            mode=self.mode,
            init_batch_size=self.init_batch_size,
            max_batch_size=self.max_batch_size,
            safety=self.safety,
            multiple_of=self.multiple_of,
            max_trials=self.max_trials,
            time_budget=self.time_budget,
            progress=self.progress,
        )

    def _validation_loaders(self, trainer: pl.Trainer, module: pl.LightningModule) -> list[DataLoader]:
        if not is_overridden("validation_step", module) or trainer.limit_val_batches == 0:
            return []
        source = _data_source(trainer, "fit", validation_of_fit=True)
        if source is None or not source.is_defined():
            return []
        return [_check_loader(loader, "validation") for loader in _flatten_loaders(source.dataloader())]

    def _search_fit(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._check_strategy(trainer)
        holders, direct = self._targets(trainer, module, "fit", self.batch_arg_name, evaluation=False)
        eval_targets = (
            self._targets(trainer, module, "fit", self.eval_batch_arg_name, evaluation=True)
            if self.eval_batch_arg_name is not None
            else None
        )
        device = self._resolve_device(trainer)
        agreement = resolve_agreement(self.distributed)
        wrapped = trainer.strategy.model
        ddp = wrapped if isinstance(wrapped, nn.parallel.DistributedDataParallel) else None
        reserved = ddp_bucket_bytes(ddp) if ddp is not None and device.torch_device.type != "cuda" else []
        steps = _LightningSteps(trainer, module, device, "validation_step")
        started = time.perf_counter()
        with _untouched(trainer, module, steps):
            train_loaders = _data_source(trainer, "fit").dataloader()
            source = self._train_source(train_loaders, module)
            val_loaders = self._validation_loaders(trainer, module) if (self.validate or eval_targets) else []
            eval_source = (
                _EvalSource([_batch_source(loader, module, i) for i, loader in enumerate(val_loaders)])
                if val_loaders
                else None
            )
            steps.eval_loaders = len(val_loaders)
            optimizers = list(trainer.optimizers)
            spec = (
                OptimizerSpec(lambda: optimizers[0], optimizers[0], type(optimizers[0]).__name__) if optimizers else None
            )
            session = TrialSession(
                module,
                source,  # type: ignore[arg-type]
                steps.loss_step,
                spec,
                device,
                steps_per_trial=self.steps_per_trial,
                train_step=steps.train_step,
                eval_step=steps.eval_step if eval_source is not None and (self.validate or eval_targets) else None,
                eval_source=eval_source,  # type: ignore[arg-type]
                extra_optimizers=optimizers[1:],
                reserved_bytes=reserved,
            )
            if not self.validate and eval_source is not None:
                session.eval_step = None  # trials train only; the evaluation search below turns it back on
            context = SearchContext(module, source, device, spec, steps.loss_step, self.steps_per_trial)  # type: ignore[arg-type]
            world = agreement.world_size if agreement is not None else 1
            per_rank_target = None if self.target_batch_size is None else math.ceil(self.target_batch_size / world)
            with open_session(session, agreement):
                result = run_search(
                    session, context, **self._search_kwargs(), target_batch_size=per_rank_target, agreement=agreement,
                    started=started,
                )
                if eval_targets is not None and eval_source is not None:
                    session.eval_step = steps.eval_step
                    evaluation = run_search(
                        session,
                        context,
                        **{**self._search_kwargs(), "init_batch_size": min(result.max_batch_size, eval_source.length)},
                        agreement=agreement,
                        phase="eval",
                        length=eval_source.length,
                    )
                    result.eval_max_batch_size = evaluation.max_batch_size
                    result.eval_batch_size = evaluation.batch_size
                    result.eval_trials = evaluation.trials
            result.target_batch_size = self.target_batch_size
            result.seconds = time.perf_counter() - started
        if eval_targets is not None and result.eval_batch_size is None:
            logger.warning("no validation data to search an evaluation batch size with: %s is left as it is",
                           self.eval_batch_arg_name)
        self._apply_fit(trainer, result, holders, direct, eval_targets)
        self._report(trainer, result, "fit")

    def _train_source(self, loaders: Any, module: pl.LightningModule) -> Any:
        flat = [_check_loader(loader, "training") for loader in _flatten_loaders(loaders)]
        if not flat:
            raise ValueError("the training dataloader hook returned nothing to build batches from")
        if isinstance(loaders, DataLoader):
            return _batch_source(loaders, module, 0)
        structure = getattr(loaders, "iterables", loaders)
        sources = {id(loader): BatchSource(loader) for loader in flat}
        return _HookedSource(_StructuredSource(structure, sources), lambda batch: module.on_before_batch_transfer(batch, 0))

    def _apply_fit(
        self,
        trainer: pl.Trainer,
        result: SearchResult,
        holders: list[_Holder],
        direct: list[Any],
        eval_targets: tuple[list[_Holder], list[Any]] | None,
    ) -> None:
        size = result.micro_batch_size or result.batch_size
        eval_size = result.eval_batch_size
        for holder in holders:
            holder.set(size)
        val_source = _data_source(trainer, "fit", validation_of_fit=True)
        for source in direct:
            new_size = eval_size if (source is val_source and eval_size is not None) else size
            source.instance = rebuild_dataloaders(source.instance, new_size)
        if eval_targets is not None and eval_size is not None:
            eval_holders, eval_direct = eval_targets
            for holder in eval_holders:
                holder.set(eval_size)
            for source in eval_direct:
                if source is val_source and source not in direct:
                    source.instance = rebuild_dataloaders(source.instance, eval_size)
        if self.target_batch_size is not None:
            trainer.accumulate_grad_batches = result.accumulation_steps

    def _search_eval(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        self._check_strategy(trainer)
        name = self._eval_stage_name()
        holders, direct = self._targets(trainer, module, stage, name, evaluation=True)
        device = self._resolve_device(trainer)
        agreement = resolve_agreement(self.distributed)
        loop = {"validate": trainer.validate_loop, "test": trainer.test_loop, "predict": trainer.predict_loop}[stage]
        combined = loop._combined_loader
        loaders = list(combined.flattened) if combined is not None else _flatten_loaders(loop._data_source.dataloader())
        loaders = [_check_loader(loader, stage) for loader in loaders]
        if not loaders:
            raise ValueError(f"there is no {stage} dataloader to search a batch size with")
        steps = _LightningSteps(trainer, module, device, _EVAL_HOOKS[stage])
        steps.eval_loaders = len(loaders)
        started = time.perf_counter()
        with _untouched(trainer, module, steps):
            eval_source = _EvalSource([_batch_source(loader, module, i) for i, loader in enumerate(loaders)])
            session = TrialSession(
                module,
                eval_source,  # type: ignore[arg-type]
                None,
                None,
                device,
                eval_step=steps.eval_step,
                eval_source=eval_source,  # type: ignore[arg-type]
            )
            context = SearchContext(module, eval_source, device, None, steps.loss_step)  # type: ignore[arg-type]
            with open_session(session, agreement):
                result = run_search(session, context, **self._search_kwargs(), agreement=agreement, phase="eval",
                                    started=started)
        for holder in holders:
            holder.set(result.batch_size)
        for source in direct:
            source.instance = rebuild_dataloaders(source.instance, result.batch_size)
        self._reload(loop)
        self._report(trainer, result, stage)

    @staticmethod
    def _reload(loop: Any) -> None:
        """Make a running evaluation loop iterate loaders built with the new batch size."""
        loop._combined_loader = None
        loop.setup_data()
        fetcher = getattr(loop, "_data_fetcher", None)
        combined = loop._combined_loader
        if fetcher is not None and combined is not None:
            combined.limits = loop.max_batches
            fetcher.setup(combined)
            iter(fetcher)

    # -- reporting ---------------------------------------------------------------------------------------------------
    def _report(self, trainer: pl.Trainer, result: SearchResult, stage: str) -> None:
        self.result = result
        self.results[stage] = result
        logger.info("BatchFinder (%s, rank %d):\n%s", stage, trainer.global_rank, result)
        if not self.log_results:
            return
        prefix = "batchfinder" if stage == "fit" else f"batchfinder/{stage}"
        metrics: dict[str, float] = {
            f"{prefix}/max_batch_size": float(result.max_batch_size),
            f"{prefix}/batch_size": float(result.batch_size),
            f"{prefix}/trials": float(result.num_trials),
            f"{prefix}/seconds": float(result.seconds),
        }
        if result.target_batch_size is not None:
            metrics[f"{prefix}/micro_batch_size"] = float(result.micro_batch_size or result.batch_size)
            metrics[f"{prefix}/accumulate_grad_batches"] = float(result.accumulation_steps)
            metrics[f"{prefix}/effective_batch_size"] = float(result.effective_batch_size)
        if result.eval_batch_size is not None and result.eval_max_batch_size is not None:
            metrics[f"{prefix}/eval_max_batch_size"] = float(result.eval_max_batch_size)
            metrics[f"{prefix}/eval_batch_size"] = float(result.eval_batch_size)
        hyperparameters = {
            prefix: {
                "max_batch_size": result.max_batch_size,
                "batch_size": result.batch_size,
                "safety": result.safety,
                "mode": result.mode,
                "device": result.device,
                "stop_reason": result.stop_reason.value,
                "trial_table": result.table(),
            }
        }
        for lightning_logger in trainer.loggers:
            lightning_logger.log_hyperparams(hyperparameters)
            lightning_logger.log_metrics(metrics, step=trainer.global_step)
