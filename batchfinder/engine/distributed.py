"""Searching on several ranks at once: agreement between ranks, and trials that cannot deadlock.

When ``torch.distributed`` is initialised, every rank runs the same search. :class:`RankAgreement` keeps the ranks
in lock step with one small collective before and one after each trial:

* before a trial the ranks agree on the batch size to try and on whether to stop (a time budget may run out on one
  rank first: then every rank stops);
* after a trial they agree on the outcome: it *fits only if it fitted on every rank* (the fits flags are reduced
  with a minimum), and the largest peak is what every rank's strategy learns, so that every rank proposes the same
  next size and ends with the same recommendation;
* a rank whose trial raised anything other than out-of-memory still takes part in that collective (it reports the
  failure instead of a result) before re-raising, and the other ranks then raise :class:`RankFailedError` instead
  of waiting for it.

The collectives run *between* trials, never inside one. Trials run on the unwrapped module (``ddp.module``):
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
* Sharded strategies (FSDP, DeepSpeed ZeRO) change the memory of parameters, gradients and optimizer state with the
  number of ranks and gather parameters with collectives inside forward and backward; they are refused
  (:func:`check_supported_wrapper`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import BatchFinderError, RankFailedError

__all__ = [
    "RankAgreement",
    "resolve_agreement",
    "unwrap_ddp",
    "ddp_bucket_bytes",
    "local_batch_norm",
    "check_supported_wrapper",
]


def _distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class RankAgreement:
    """Agreement between the ranks of a process group during a search (see the module documentation).

    Every method is a collective: every rank of ``group`` must call the same methods in the same order, which the
    search loop guarantees because each call depends only on values the ranks already agreed on.
    """

    def __init__(self, group: Any = None) -> None:
        if not _distributed_ready():
            raise RuntimeError("torch.distributed is not initialised: there are no ranks to agree with")
        dist = torch.distributed
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # The ranks agree over the CPU, on a gloo group of their own when the given group is not one: a collective
        # on a GPU would run on whichever device is current (not the searched one), and after an illegal memory
        # access or a device-side assert the CUDA context of the failing rank is poisoned, so it could not report
        # its failure there and the other ranks would wait until the watchdog fires.
        self._owned_group: Any = None
        if "gloo" in str(dist.get_backend(group)).lower():
            self.group = group
        else:
            ranks = None if group is None else dist.get_process_group_ranks(group)
            try:
                self._owned_group = dist.new_group(ranks=ranks, backend="gloo")
            except Exception as exc:
                raise BatchFinderError(
                    f"the ranks could not open the CPU (gloo) group batchfinder agrees over ({type(exc).__name__}: "
                    f"{exc}). gloo connects the ranks over TCP, which a cluster that only allows NCCL's transport "
                    "may block: make the ranks reachable over TCP (GLOO_SOCKET_IFNAME names the network interface), "
                    "or pass distributed=False and search on one rank alone"
                ) from exc
            self.group = self._owned_group
        self._device = torch.device("cpu")

    def close(self) -> None:
        """Release the gloo group this agreement created (a collective: every rank calls it)."""
        if self._owned_group is not None:
            group, self._owned_group = self._owned_group, None
            torch.distributed.destroy_process_group(group)

    # -- collectives ----------------------------------------------------------------------------------------------
    def _slots(self, values: Sequence[int]) -> list[list[int]]:
        """All-reduce (sum) a vector in which each rank fills its own slots: returns every rank's ``values``."""
        width = len(values)
        vector = torch.zeros(self.world_size * width, dtype=torch.int64, device=self._device)
        vector[self.rank * width : (self.rank + 1) * width] = torch.tensor(list(values), dtype=torch.int64)
        torch.distributed.all_reduce(vector, op=torch.distributed.ReduceOp.SUM, group=self.group)
        flat = vector.cpu().tolist()
        return [flat[r * width : (r + 1) * width] for r in range(self.world_size)]

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank."""
        return any(row[0] for row in self._slots([int(bool(flag))]))

    def smallest(self, values: Sequence[int | None]) -> list[int | None]:
        """Each of ``values``, the smallest over the ranks (None where every rank has None): what every rank then
        uses, e.g. the guided mode's memory budget, which differs by a few MiB between real GPUs."""
        unset = 2**62
        rows = self._slots([unset if v is None else int(v) for v in values])
        least = [min(column) for column in zip(*rows)]
        return [None if v == unset else v for v in least]

    def check(self, ok: bool, what: str) -> None:
        """Agree that every rank got through ``what``; raise :class:`RankFailedError` on the others if one did not.

        The rank that failed calls this with ``ok=False`` and then raises its own exception.
        """
        failed = [r for r, (flag,) in enumerate(self._slots([int(bool(ok))])) if not flag]
        if failed and ok:
            raise RankFailedError(
                f"rank(s) {failed} failed during {what}; rank {self.rank} stops as well so that no rank waits for a "
                "collective the others never enter (see the failing rank's error)"
            )

    def agree_next(
        self, size: int | None, stop: enum.Enum | None, reasons: Sequence[enum.Enum]
    ) -> tuple[int | None, enum.Enum | None]:
        """Agree on the next batch size (None: the search is over) and on whether a budget stops the search.

        ``reasons`` lists the stop reasons a rank may bring (their position is their code); the first one any rank
        brings wins. Raises :class:`RankFailedError` when the ranks' strategies proposed different sizes.
        """
        code = 0 if stop is None else list(reasons).index(stop) + 1
        rows = self._slots([0 if size is None else size, code])
        sizes = {row[0] for row in rows}
        codes = [row[1] for row in rows if row[1]]
        if codes:
            return size, reasons[min(codes) - 1]
        if len(sizes) > 1:
            raise RankFailedError(
                f"the ranks proposed different batch sizes ({sorted(sizes)}); every rank must search the same model "
                "with the same arguments"
            )
        return size, None

    def agree_outcome(self, fits: bool, peak_bytes: int, failed: bool, what: str) -> tuple[bool, int, list[int]]:
        """Agree on a trial's outcome: it fits only when it fitted on every rank; the peak is the largest.

        Returns ``(fits, peak_bytes, ranks_out_of_memory)``. A rank whose trial raised passes ``failed=True`` and
        re-raises afterwards; the other ranks raise :class:`RankFailedError` here.
        """
        rows = self._slots([int(bool(fits)), int(peak_bytes), int(bool(failed))])
        broken = [r for r, row in enumerate(rows) if row[2]]
        if broken and not failed:
            raise RankFailedError(
                f"rank(s) {broken} raised during {what}; rank {self.rank} stops as well so that no rank waits for a "
                "collective the others never enter (see the failing rank's error)"
            )
        out_of_memory = [r for r, row in enumerate(rows) if not row[0]]
        return not out_of_memory, max(row[1] for row in rows), out_of_memory

    def agree_trial(self, trial: Any, what: str) -> tuple[Any, int]:
        """The :class:`~batchfinder.result.Trial` with the agreed ``fits`` (this rank's peaks and timings kept), and
        the largest reserved peak over the ranks."""
        fits, peak, out_of_memory = self.agree_outcome(trial.fits, trial.peak_reserved_bytes, False, what)
        if fits == trial.fits:
            return trial, peak
        others = [r for r in out_of_memory if r != self.rank]
        return (
            dataclasses.replace(
                trial,
                fits=False,
                seconds_per_step=None,
                error=f"out of memory on rank(s) {others} (this rank, {self.rank}, fitted)",
            ),
            peak,
        )

    def __repr__(self) -> str:
        return f"RankAgreement(rank={self.rank}, world_size={self.world_size})"


def resolve_agreement(distributed: bool | None) -> RankAgreement | None:
    """The agreement the search uses: ``None`` (automatic) when ``torch.distributed`` is initialised with several
    ranks, ``True`` to insist on it, ``False`` for none (each rank searches on its own, e.g. when only one rank
    searches)."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None (automatic), not {type(distributed).__name__}")
    if distributed is False:
        return None
    if not _distributed_ready():
        if distributed:
            raise ValueError("distributed=True but torch.distributed is not initialised (call init_process_group first)")
        return None
    agreement = RankAgreement()
    return agreement if agreement.world_size > 1 or distributed else None


# -- wrappers -----------------------------------------------------------------------------------------------------
_SHARDED_WRAPPERS = ("FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine", "PipelineEngine")


def check_supported_wrapper(model: Any) -> None:
    """Refuse sharded wrappers (FSDP, DeepSpeed) with a reason; ``DataParallel`` with a pointer to DDP."""
    for cls in type(model).__mro__:
        if cls.__name__ in _SHARDED_WRAPPERS or cls.__name__.startswith("FSDP"):
            raise ValueError(
                f"{type(model).__name__} shards parameters, gradients and optimizer state across ranks and gathers "
                "them with collectives inside forward and backward: its memory depends on the number of ranks and a "
                "trial that runs out of memory on one rank would leave the others waiting. Sharded models are not "
                "supported; search the unsharded model on one GPU (an upper bound on the memory per rank) or use DDP"
            )
    if isinstance(model, nn.DataParallel):
        raise ValueError(
            "torch.nn.DataParallel splits each batch across GPUs in one process, so the batch size per GPU is not "
            "the batch size of the loader; search model.module on one GPU, or use DistributedDataParallel"
        )


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
    """``(module, ddp)`` for a ``DistributedDataParallel`` model, ``(model, None)`` otherwise."""
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
