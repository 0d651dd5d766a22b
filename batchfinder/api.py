"""The function front end: :func:`find_batch_size` and :func:`try_batch_size` over any ``nn.Module`` and dataset.

>>> import torch, batchfinder as bf
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
>>> data = torch.utils.data.TensorDataset(torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,)))
>>> result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"))   # doctest: +SKIP
>>> result.max_batch_size, result.batch_size, result.stop_reason                  # doctest: +SKIP

Each function checks the user's pieces, gathers them into a :class:`~batchfinder.engine.workload.Workload` (the
model unwrapped from DDP and ``torch.compile``, a :class:`~batchfinder.training.batching.BatchSource` over the
dataset, the step, the optimizer) and its arguments into :class:`~batchfinder.engine.options.SearchOptions`, and
calls the engine (:func:`batchfinder.engine.search`, :func:`batchfinder.engine.run.run_trial`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .devices.base import DeviceLike
from .devices.resolve import resolve_device
from .engine.distributed import agrees_across_ranks, unwrap_ddp
from .engine.options import ProgressLike, SearchOptions
from .engine.run import run_trial, search
from .engine.workload import Workload
from .result import SearchResult, Trial
from .search.checks import (
    MIN_STEPS_PER_TRIAL,
    check_positive_int,
    check_steps_per_trial,
)
from .training.batching import BatchSource
from .training.optimizers import OptimizerLike, resolve_optimizer
from .training.precision import StepPrecision, check_precision
from .training.state import preserved_rng
from .training.sample_sizes import DEFAULT_SCAN_BUDGET, SampleSize, check_scan_budget
from .training.steps import LossFn, StepFn, check_train, forward, make_step
from .training.validation import check_materialised, check_model

__all__ = ["find_batch_size", "try_batch_size"]

logger = logging.getLogger(__name__)


def _function_workload(
    model: nn.Module,
    dataset: Any,
    optimizer: OptimizerLike,
    loss_fn: LossFn | None,
    step_fn: StepFn | None,
    sample_size: SampleSize | None,
    scan_budget: float,
    precision: str,
    defer_fixed_check: bool = True,
    train: bool = True,
) -> Workload:
    """The user's pieces as a :class:`Workload`, each checked before anything runs (``defer_fixed_check``: see
    :class:`~batchfinder.training.batching.BatchSource`; a search looks further after it ran). ``train=False``: an
    inference workload, whose evaluation step :func:`_inference_step` gives once the device is known."""
    check_model(model)
    check_scan_budget(scan_budget)
    check_precision(precision)
    check_train(train, optimizer, loss_fn)
    model, notes = _uncompiled(model)
    module, ddp = unwrap_ddp(model)  # trials run on the unwrapped module: DDP's collectives could hang on an OOM
    check_materialised(module)
    step = make_step(loss_fn, step_fn) if train or step_fn is not None else None  # (checks step_fn)
    spec = resolve_optimizer(optimizer, module) if train else None
    source = BatchSource(dataset, sample_size=sample_size, scan_budget=scan_budget, defer_fixed_check=defer_fixed_check)
    if not train:
        return Workload(
            module, None, None, None, eval_source=source, inference=True, ddp=ddp, precision=precision, notes=notes
        )
    return Workload(module, source, step, spec, ddp=ddp, precision=precision, notes=notes)


def _inference_step(step_fn: StepFn | None, precision: str, device_type: str) -> Any:
    """``step(model, batch) -> output``: one forward pass as inference runs it (the trial calls it in eval mode under
    ``torch.inference_mode()`` and keeps its output until the next step's), under the precision's autocast."""
    run = step_fn if step_fn is not None else forward
    autocast = StepPrecision(precision, device_type).autocast

    def inference_step(model: nn.Module, batch: Any) -> Any:
        with autocast():
            return run(model, batch)

    return inference_step


def _with_device(workload: Workload, step_fn: StepFn | None, backend: Any) -> Workload:
    """The workload with what depends on the device: an inference workload's step (its autocast)."""
    if workload.inference:
        workload.eval_step = _inference_step(step_fn, workload.precision, backend.torch_device.type)
    return workload


def _uncompiled(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A ``torch.compile``'d model's original module (searched instead: the compiled one would recompile at every
    batch size, and its kernels run outside the memory accounting), with the note the result gives."""
    original = getattr(model, "_orig_mod", None)
    if not isinstance(original, nn.Module) or type(model).__name__ != "OptimizedModule":
        return model, []
    note = (
        "torch.compile: the original (uncompiled) module was searched, once per size, instead of recompiling at "
        "every size; compiled kernels fuse operations and usually hold less activation memory, so the size found "
        "is on the safe side for the compiled model (compile once more after changing the batch size, or mark the "
        "batch dimension dynamic)"
    )
    logger.info("%s", note)
    return original, [note]


@agrees_across_ranks  # from before the first check: a bad argument or a failing scan on one rank reaches the others
def find_batch_size(
    model: nn.Module,
    dataset: Any,
    *,
    optimizer: OptimizerLike = None,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
    device: DeviceLike = None,
    mode: str = "binsearch",
    init_batch_size: int = 16,
    max_batch_size: int | None = None,
    safety: float = 0.8,
    multiple_of: int = 1,
    steps_per_trial: int = MIN_STEPS_PER_TRIAL,
    max_trials: int | None = None,
    time_budget: float | None = None,
    progress: ProgressLike = False,
    memory_limit: int | str | None = None,
    target_batch_size: int | None = None,
    distributed: bool | None = None,
    confirm_steps: int = MIN_STEPS_PER_TRIAL,
    sample_size: SampleSize | None = None,
    scan_budget: float = DEFAULT_SCAN_BUDGET,
    precision: str = "32-true",
    train: bool = True,
) -> SearchResult:
    """Find the largest batch size ``model`` can train with on ``device`` by running real training steps (with
    ``train=False``: the largest inference batch, by running real forward passes).

    Args:
        model: any ``nn.Module``; its weights, buffers, gradients, train/eval mode, the optimizer's state and the
            RNG states are exactly as before when this returns, raises or is interrupted. A model on the ``meta``
            device is refused (materialise it first; :func:`~batchfinder.estimate_memory` accepts it).
        dataset: a map-style ``Dataset`` or a ``DataLoader``; samples are tensors, ``(input, target, ...)`` tuples or
            dicts of tensors (passed as ``model(**batch)``). Batch sizes never exceed ``len(dataset)``.
        optimizer: an optimizer class, a callable ``params -> optimizer``, or an optimizer bound to the model (its
            state is then part of the memory and is preserved). Default: Adam, which holds two states per parameter.
        loss_fn: ``loss_fn(output, target) -> loss`` instead of the default (cross-entropy / MSE / mean).
        step_fn: ``step_fn(model, batch) -> loss`` for full control of the forward pass (AMP, several inputs).
        device: ``"cuda"``, ``"cuda:N"``, a ``torch.device``, a :class:`~batchfinder.SimulatedGPU`, or
            ``"sim:16GiB"``. Default: the current CUDA GPU.
        mode: ``"binsearch"`` (double, then bisect to a resolution of 1), ``"power"`` (last doubling that fits) or
            ``"guided"`` (jump to the size the memory prediction gives, then verify it with real trials: on the
            simulated GPU usually one trial, whose peaks confirm the prediction to the byte).
        init_batch_size: first size tried (default 16); when it does not fit the search walks down.
        max_batch_size: never try more than this.
        safety: the recommendation is ``floor(safety * max_batch_size)`` (default 0.8).
        multiple_of: round the recommendation down to a multiple of this.
        steps_per_trial: training steps per trial, at least 2.
        max_trials: stop after this many trials and return the best size tried so far.
        time_budget: start no new trial after this many seconds (the first trial always runs; a running trial is
            not interrupted).
        progress: True to print a line per trial to standard error, or a callable receiving each ``Trial``.
        memory_limit: on CUDA, make the GPU behave like one with this much memory (e.g. ``"16GiB"``).
        target_batch_size: the effective batch size to reach with gradient accumulation: the result then also holds
            ``micro_batch_size`` (at most the recommended size) and ``accumulation_steps`` with
            ``micro_batch_size * accumulation_steps * world_size >= target_batch_size`` and the least waste
            (see :mod:`batchfinder.search.accumulation`). With several agreeing ranks the target is the global batch.
        distributed: ``None`` (default): when ``torch.distributed`` is initialised with several ranks, every rank
            must call this; they run each trial at the same size and a size fits only if it fitted on every rank, so
            all ranks return the same result (see :mod:`batchfinder.engine.distributed`). ``False``: this rank searches on
            its own. ``True``: require ``torch.distributed``. A ``DistributedDataParallel`` model is searched through
            its unwrapped module (no collective runs inside a trial) with its gradient buckets charged. A model
            sharded with FSDP2 (``fully_shard``) runs its real sharded steps, the ranks agreeing before every
            collective (:mod:`batchfinder.engine.sharded`); FSDP1 and DeepSpeed are refused. When one rank fails (any error, Ctrl-C, an exit), it raises its
            own error and the others :class:`~batchfinder.RankFailedError` within seconds (see
            :mod:`batchfinder.engine.ranks`).
        confirm_steps: after the search, run this many steps (default 2) at the recommended size in one trial, with
            the device's cache kept between them (so that what steps leave cached and fragmented shows); if it runs
            out of memory the recommendation is lowered by the safety factor again and confirmed
            (``result.confirmations``). On a caching allocator a smaller size does not always fit when a larger one
            does, so the recommended size is tried rather than assumed. When sample sizes vary the steps run on the
            first ``confirm_steps`` batches in the order your loader yields them (its sampler's order; shuffled
            without a loader), then on the worst-case batch. 0 turns this off.
        sample_size: how large each sample is, when sizes vary: a callable ``index -> number`` or a sequence with
            one number per sample (e.g. a list of lengths). Default: the number of elements of a sample's tensors.
            When sizes vary, a trial of size B runs on the B largest samples (collated with the loader's
            ``collate_fn``), which bounds every batch of B a shuffled epoch can draw.
        scan_budget: seconds the scan for the largest samples may take (default 10). Fixed-size data is recognised
            from 64 samples and not scanned; a partial scan is reported in ``result.data_scan`` and warned about.
        precision: ``"32-true"`` (default), ``"16-mixed"`` (forward under autocast to float16, loss scaled by a
            ``GradScaler``), ``"bf16-mixed"`` (autocast to bfloat16), ``"16-true"``/``"bf16-true"`` (parameters and
            floating inputs in half precision for the search; your model is cast back). On a simulated GPU mixed
            precision follows CUDA's autocast policies (:mod:`batchfinder.training.precision`), not the CPU's.
        train: ``False`` sizes inference (evaluation, embedding, batch prediction) instead of training: each trial
            runs ``steps_per_trial`` forward passes with the model in eval mode under ``torch.inference_mode()``, no
            optimizer and no gradients, and keeps each output until the next batch's output exists, as a loop that
            collects outputs does. ``step_fn(model, batch) -> output`` replaces the default forward; ``optimizer``,
            ``loss_fn`` and ``target_batch_size`` are refused. The search, safety factor, worst-case batches for
            variable-size data and the confirmation are the same; ``result.train`` is False. The model is left in
            the train/eval mode it was in.

    Returns:
        A :class:`~batchfinder.SearchResult`. Raises :class:`~batchfinder.NoBatchSizeFitsError` when batch size 1
        does not fit, and :class:`~batchfinder.SearchIncompleteError` when a budget ends the search before any size
        fitted.
    """
    options = SearchOptions.from_arguments(locals())
    with preserved_rng():  # captured before anything of the user's runs (the sample scan), restored on every exit
        workload = _function_workload(
            model, dataset, optimizer, loss_fn, step_fn, sample_size, scan_budget, precision, train=train
        )
        backend = resolve_device(device, memory_limit=memory_limit, model=workload.model)
        return search(_with_device(workload, step_fn, backend), backend, options)


def try_batch_size(
    model: nn.Module,
    dataset: Any,
    batch_size: int,
    *,
    optimizer: OptimizerLike = None,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
    device: DeviceLike = None,
    steps_per_trial: int = MIN_STEPS_PER_TRIAL,
    memory_limit: int | str | None = None,
    sample_size: SampleSize | None = None,
    scan_budget: float = DEFAULT_SCAN_BUDGET,
    precision: str = "32-true",
    train: bool = True,
) -> Trial:
    """Run one trial: does ``batch_size`` fit? Same arguments and guarantees as :func:`find_batch_size`
    (``train=False``: does an inference batch of ``batch_size`` fit?).

    ``batch_size`` may not exceed ``len(dataset)``. When sample sizes vary the trial runs on the ``batch_size``
    largest samples (the worst case of every batch of that size); ``trial.data_scan`` says what was scanned.
    Returns the :class:`~batchfinder.Trial`.
    """
    check_positive_int("batch_size", batch_size)
    check_steps_per_trial(steps_per_trial)
    options = SearchOptions.from_arguments(locals())
    with preserved_rng():  # captured before anything of the user's runs (the sample scan), restored on every exit
        workload = _function_workload(
            model, dataset, optimizer, loss_fn, step_fn, sample_size, scan_budget, precision, defer_fixed_check=False,
            train=train,
        )
        backend = resolve_device(device, memory_limit=memory_limit, model=workload.model)
        return run_trial(_with_device(workload, step_fn, backend), backend, options, batch_size)
