"""Searching on several ranks at once: agreement between ranks, and trials that cannot deadlock.

When ``torch.distributed`` is initialised, every rank runs the same search. :class:`RankAgreement` keeps the ranks
in lock step with one small collective before and one after each trial:

* before a trial the ranks agree on the batch size to try and on whether to stop (a time budget may run out on one
  rank first: then every rank stops);
* after a trial they agree on the outcome: it *fits only if it fitted on every rank* (the fits flags are reduced
  with a minimum), and the largest peak is what every rank's strategy learns, so that every rank proposes the same
  next size and ends with the same recommendation;
* a rank that fails anywhere (a bad argument, the data scan, the probe, a trial, the confirmation, Ctrl-C, an exit)
  reaches the others at their next collective, and they raise :class:`~batchfinder.RankFailedError` instead of
  waiting for it (:mod:`batchfinder.engine.ranks`: how the ranks exchange outcomes, failures and time limits; this
  module re-exports :class:`RankAgreement`, :func:`resolve_agreement`, :func:`agreeing_ranks` and
  :func:`agrees_across_ranks`).

For DDP the collectives run *between* trials, never inside one. Trials run on the unwrapped module (``ddp.module``):
``DistributedDataParallel``'s forward (buffer broadcast, bucket rebuilding) and its backward hooks (gradient
all-reduce) are collectives that a rank which has just run out of memory would never enter, so they are not run.
``SyncBatchNorm`` layers gather statistics from every rank in their forward; during trials they run as plain batch
normalisation (:func:`local_batch_norm`).

What this accounts for, and what it does not:

* DDP's gradient buckets (one flat buffer per bucket, as large as the gradients it holds, alive for the whole of
  training) are charged on devices that do not already hold them (:func:`ddp_bucket_bytes`). On a real GPU the DDP
  wrapper already allocated them on the device before the search, so they are part of the baseline. With
  ``gradient_as_bucket_view=True`` the gradients live inside the buckets, so the buckets cost nothing beyond the
  gradients that the trial allocates anyway; on a real GPU the trial is then conservative by one gradient copy.
* Not accounted for: NCCL/gloo communication buffers and streams (outside PyTorch's allocator), the temporary
  copies made while an all-reduce runs, and the statistics SyncBatchNorm gathers (a few values per channel and rank).
* Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) are searched as they are, their trials running
  the sharded steps with their all-gathers and reduce-scatters: the ranks run one round of agreement immediately
  before every collective of a trial, so that a rank that runs out of memory makes every rank leave the trial
  there (:mod:`batchfinder.engine.sharded`). FSDP1 (``FullyShardedDataParallel``) and DeepSpeed's engines are
  refused with a reason (:func:`check_supported_wrapper`).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .ranks import RankAgreement, active_agreement, agreeing_ranks, agrees_across_ranks, resolve_agreement
from .sharded import check_sharded_model

__all__ = [
    "RankAgreement",
    "resolve_agreement",
    "agreeing_ranks",
    "agrees_across_ranks",
    "unwrap_ddp",
    "ddp_bucket_bytes",
    "local_batch_norm",
    "check_supported_wrapper",
    "check_reducer_untouched",
]


# -- wrappers -----------------------------------------------------------------------------------------------------
_DEEPSPEED_ENGINES = ("DeepSpeedEngine", "PipelineEngine", "DeepSpeedHybridEngine")


def check_reducer_untouched(ddp: Any) -> None:
    """Refuse a ``DistributedDataParallel(static_graph=True)`` wrapper that has not finished its first iteration.

    Trials run on ``ddp.module``, but the reducer's gradient hooks sit on the parameters themselves, so they fire in
    every trial's backward. For a static graph, PyTorch's ``Reducer::autograd_hook``
    (``torch/csrc/distributed/c10d/reducer.cpp``) counts the hooks of the first iteration (``num_bwd_calls_``,
    ``numGradHooksTriggeredMap_``) *before* it checks whether hooks are expected; those counts decide how the first
    real iteration reduces, so a search before it would break it. Once the first iteration ran (DDP's ``_DDPSink``
    sets ``_static_graph_delay_allreduce_enqueued``, ``torch/nn/parallel/distributed.py``), the hooks return early
    and trials are safe. Wrappers that are not PyTorch's DDP (a plan of one) are not checked.
    """
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return
    if getattr(ddp, "static_graph", False) and not getattr(ddp, "_static_graph_delay_allreduce_enqueued", False):
        raise ValueError(
            "the model is wrapped in DistributedDataParallel(static_graph=True) that has not run its first training "
            "iteration yet: DDP counts the gradient hooks of that first iteration to plan its static graph, and the "
            "search's trials would add to that count and break your first real iteration. Search the model before "
            "wrapping it (find_batch_size(model, ...) on every rank), after one training step, or wrap it with "
            "static_graph=False"
        )


def check_supported_wrapper(model: Any) -> None:
    """Check the wrapper of a model a search gets: a model sharded with FSDP2 (``fully_shard``) passes the checks of
    :func:`~batchfinder.engine.sharded.check_sharded_model`; FSDP1, DeepSpeed's engines and ``DataParallel`` are
    refused with a reason and what to do instead."""
    if isinstance(model, nn.Module) and check_sharded_model(model, agreement=active_agreement()):
        return
    for cls in type(model).__mro__:
        if cls.__name__ in _DEEPSPEED_ENGINES:
            raise ValueError(
                f"{type(model).__name__} is a DeepSpeed engine: batchfinder does not search DeepSpeed models (ZeRO "
                "shards parameters, gradients and optimizer state and gathers them inside its own engine, whose "
                "collectives a trial that runs out of memory on one rank could not stop). Search the model before "
                "deepspeed.initialize (an upper bound on the memory per rank), or shard it with PyTorch's FSDP2 "
                "(torch.distributed.fsdp.fully_shard), which batchfinder searches on every rank"
            )
    if isinstance(model, nn.DataParallel):
        raise ValueError(
            "torch.nn.DataParallel splits each batch across GPUs in one process, so the batch size per GPU is not "
            "the batch size of the loader; search model.module on one GPU, or use DistributedDataParallel"
        )


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
    """``(module, ddp)`` for a ``DistributedDataParallel`` model, ``(model, None)`` otherwise (a model sharded with
    ``fully_shard`` is searched as it is: its trials run the sharded steps)."""
    check_supported_wrapper(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, model
    return model, None


def _reducer_parameters(ddp: nn.parallel.DistributedDataParallel) -> list[nn.Parameter]:
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for module_name, module in ddp.module.named_modules():
        for name, param in module.named_parameters(recurse=False):
            fqn = f"{module_name}.{name}" if module_name else name
            if param.requires_grad and fqn not in ignored and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def ddp_bucket_bytes(ddp: nn.parallel.DistributedDataParallel) -> list[int]:
    """Bytes of each gradient bucket ``ddp`` holds beyond the gradients themselves (empty with
    ``gradient_as_bucket_view=True``, where gradients are views into the buckets).

    The buckets together are as large as the trainable parameters; they are split as DDP splits them once it has
    rebuilt its buckets (a small first bucket, then ``bucket_cap_mb``).
    """
    if getattr(ddp, "gradient_as_bucket_view", False):
        return []
    params = _reducer_parameters(ddp)
    if not params:
        return []
    sizes = [p.numel() * p.element_size() for p in params]
    cap = int(getattr(ddp, "bucket_bytes_cap", 25 * 1024 * 1024))
    first = int(getattr(torch.distributed, "_DEFAULT_FIRST_BUCKET_BYTES", 1024 * 1024))
    try:
        indices, _ = torch.distributed._compute_bucket_assignment_by_size(params, [min(first, cap), cap])
    except (AttributeError, RuntimeError, TypeError):
        return [sum(sizes)]
    return [sum(sizes[i] for i in bucket) for bucket in indices if bucket]


@contextlib.contextmanager
def local_batch_norm(model: nn.Module) -> Iterator[int]:
    """Within this block every ``SyncBatchNorm`` of ``model`` normalises with its own rank's statistics (no
    collective); yields how many layers it changed. Their own forward comes back on exit."""
    from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm

    layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for layer in layers:
            patched.append((layer, layer.__dict__.get("forward", _MISSING)))
            layer.forward = types.MethodType(_BatchNorm.forward, layer)  # type: ignore[method-assign]
        yield len(layers)
    finally:
        for layer, previous in patched:
            if previous is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous  # type: ignore[method-assign]


_MISSING = object()
