"""Sharded models: searching a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) on every rank.

Trials run the real sharded steps on the ``FSDPModule`` itself: each unit's parameters are all-gathered before its
forward and again in backward, gradients are reduce-scattered, and the optimizer steps on the sharded (``DTensor``)
state. Every rank tries the same size and a size fits only when it fitted on every rank
(:class:`~batchfinder.engine.ranks.RankAgreement`, between trials).

**No rank waits on another, by construction.** Inside a trial the collectives are the danger: a rank that runs out
of memory in the forward pass never reaches the next all-gather, where the others would wait for it forever. For
the length of every trial (and of the model check on entry), :class:`CollectiveCheckpoints` wraps the collective
functions FSDP2 and ``DTensor`` call (``torch.distributed.all_gather_single``, ``reduce_scatter_single``,
``all_reduce``, ... as called in ``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``, and the functional
collectives of ``torch/distributed/_functional_collectives.py`` that ``DTensor`` redistributes with,
``torch/distributed/tensor/placement_types.py``), so that immediately before each one the ranks run one round of
:meth:`~batchfinder.engine.ranks.RankAgreement.trial_round` on the agreement's own CPU (gloo) group:

* a rank still in its trial says so; when every rank does, they all enter the real collective (the ranks run the
  same steps, so they are at the same collective);
* a rank that left its trial (it ran out of memory, even while allocating a collective's output buffer, which is
  why the round sits immediately before the call and not in a module hook; or it simply finished) says so with its
  outcome at every round until every rank has left;
* a rank that meets a rank that left leaves its trial as if it had run out of memory ("rank N ran out of memory at
  batch size B"): the trial is recovered from as an out-of-memory one, and the rank joins the rounds of those that
  left;
* a rank that fails (any other error, Ctrl-C, an exit) sends a failure record, as between trials: the others raise
  :class:`~batchfinder.RankFailedError` after restoring the user's state.

Every round is one all-reduce on every rank, so the exchange numbers of the agreement stay aligned whatever number
of rounds a trial took.

**Recovery.** A rank that left a trial in the middle of a forward or backward pass leaves FSDP2's state as it was:
units in the forward or pre-backward state, unsharded parameters, all-gather and reduce-scatter states, the flag of
a queued post-backward callback (``torch/distributed/fsdp/_fully_shard/_fsdp_state.py``: ``FSDPState``,
``_fsdp_param_group.py``: ``FSDPParamGroup``). :func:`reset_sharded_state` returns every unit to its idle, resharded
state (``FSDPModule.reset_iter_state``, which waits for in-flight collectives, reshards every group and clears the
per-iteration trackers), and drops the unsharded gradients; it runs in the recovery after a trial's ``except``
block, as part of restoring the user's state (:class:`ShardedReset`).

Checks (:func:`check_sharded_model`): FSDP1 (``FullyShardedDataParallel``), models with some parameters sharded and
others not, meshes that do not span the process group, and 2-D meshes (HSDP) are refused with a reason.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..memory.recording import RECORDED_SIZES
from ..memory.replay import AllocationLog
from ..memory.sharding import fsdp_wrapper, is_dtensor
from ..result import Trial
from ..training.host import host_side_loading
from .ranks import RankAgreement, active_agreement
from .trial import TrialSession

__all__ = [
    "is_sharded",
    "check_sharded_model",
    "reset_sharded_state",
    "ShardedReset",
    "CollectiveCheckpoints",
    "ShardedTrialSession",
]

logger = logging.getLogger(__name__)

_DIST_COLLECTIVES = (
    "all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce",
    "all_reduce_coalesced", "all_gather", "reduce_scatter", "broadcast", "reduce", "gather", "scatter",
    "all_to_all", "all_to_all_single", "barrier", "all_gather_object", "broadcast_object_list",
)
"""Collectives of ``torch.distributed`` wrapped during a trial (those it has; FSDP2 calls the first five)."""
_FUNCTIONAL_COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "all_gather_tensor", "all_gather_tensor_autograd", "all_gather_single",
    "all_gather_into_tensor_coalesced", "reduce_scatter_tensor", "reduce_scatter_tensor_autograd",
    "reduce_scatter_single", "reduce_scatter_tensor_coalesced", "all_to_all_single", "all_to_all_single_autograd",
    "broadcast", "permute_tensor",
)
"""Functional collectives (``torch.distributed._functional_collectives``) wrapped during a trial: those ``DTensor``
redistributes with (gradient clipping's norm of sharded gradients, a ``full_tensor()``)."""

_FITTED, _OUT_OF_MEMORY, _FOLLOWED = 1, 2, 3
"""How a rank left its trial (the first number of its records): finished and fitted; out of memory or over the
memory limit; left because another rank did."""


# -- what a sharded model is ------------------------------------------------------------------------------------
def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` is sharded with FSDP2 (``fully_shard`` was applied to it: an ``FSDPModule``)."""
    return fsdp_wrapper(model) == "FSDPModule"


def check_sharded_model(model: nn.Module, *, agreement: RankAgreement | None = None) -> bool:
    """Check a model that may be sharded; True when it is sharded with FSDP2 (``fully_shard`` at its root).

    Raises ``ValueError`` naming the problem, with the model untouched, for FSDP1 (``FullyShardedDataParallel``)
    anywhere in the model, parameters sharded in some modules but not at the root (``fully_shard`` was not applied
    to the model itself), parameters the root left unsharded, a 2-D mesh (HSDP), and a mesh that does not span the
    ranks that search together (``agreement``'s, else the default process group).
    """
    if any(fsdp_wrapper(m) == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(
            "the model is wrapped in FullyShardedDataParallel (FSDP1), which shards parameters, gradients and "
            "optimizer state in a way batchfinder does not search: shard it with FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard on each block, then on the model), whose trials every rank leaves "
            "together when one runs out of memory"
        )
    names = [name for name, p in model.named_parameters() if is_dtensor(p)]
    if not is_sharded(model):
        units = [name for name, m in model.named_modules() if fsdp_wrapper(m) == "FSDPModule"]
        if names or units:
            where = f"the modules {units[:3]}" if units else f"the parameters {names[:3]}"
            raise ValueError(
                f"some of the model's parameters are sharded ({where}) but the model itself is not: call "
                "fully_shard(model) on the root module too, after the blocks, so that every parameter is sharded "
                "and the root's forward drives the all-gathers"
            )
        return False
    plain = [name for name, p in model.named_parameters() if not is_dtensor(p)]
    if plain:
        raise ValueError(
            f"the model is sharded with fully_shard, but {len(plain)} of its parameters are not ({plain[:3]}, e.g. "
            "left out with ignored_params): batchfinder searches models whose every parameter is sharded. Shard "
            "them too (leave them out of ignored_params)"
        )
    if not torch.distributed.is_initialized():
        raise ValueError("the model is sharded with fully_shard, but torch.distributed is not initialised")
    group = agreement.group if agreement is not None else None
    world = torch.distributed.get_world_size()
    expected = sorted(torch.distributed.get_process_group_ranks(group)) if group is not None else list(range(world))
    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters()}  # type: ignore[attr-defined]
    for mesh in meshes.values():
        if mesh.ndim != 1:
            raise ValueError(
                f"the model is sharded over a {mesh.ndim}-D device mesh (HSDP: replicated across one dimension, "
                "sharded across the other); batchfinder searches models sharded over a 1-D mesh only (fully_shard "
                "with the default mesh, or init_device_mesh(device_type, (world_size,)))"
            )
        ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
        if ranks != expected:
            raise ValueError(
                f"the model is sharded over a device mesh of the ranks {ranks}, but the search runs on the ranks "
                f"{expected} of the process group: shard the model over a mesh of every rank that searches "
                "(fully_shard's default mesh), or call the search on exactly the mesh's ranks"
            )
    return True


# -- recovery ---------------------------------------------------------------------------------------------------
def reset_sharded_state(model: nn.Module) -> None:
    """Return every FSDP2 unit of ``model`` (the root ``FSDPModule``) to its idle, resharded state after a forward
    or backward pass that stopped midway: ``FSDPModule.reset_iter_state`` (``torch/distributed/fsdp/_fully_shard/
    _fully_shard.py``; it waits for in-flight collectives, reshards every parameter group, sets every state and
    group to ``TrainingState.IDLE`` and clears ``iter_forward_root``, the post-forward order, the all-gather and
    reduce-scatter states and the flag of the queued post-backward callback, ``_fsdp_state.py``), and the unsharded
    parameters' gradients (``FSDPParam``'s unsharded parameter and accumulated gradient, ``_fsdp_param.py``), which a
    backward pass that stopped before its reduce-scatter leaves behind. It also frees every parameter's all-gather
    outputs (``FSDPParam.free_unsharded_param``, which resizes their storages to 0 as ``to_sharded`` does): a trial
    that ran out of memory inside a unit's unshard, after ``alloc_all_gather_outputs`` gave the outputs their memory
    but before the group reached its unsharded state (``FSDPParamGroup.wait_for_unshard``), leaves the group
    "sharded" with its outputs allocated, and ``reshard`` skips a sharded group (``_to_sharded``), so the next trial
    would start with that unit's gathered parameters held. Does nothing for a model that never ran."""
    state = model._get_fsdp_state()  # type: ignore[operator]
    if getattr(state, "_is_root", None) is None:
        return  # lazy initialisation has not run: no step ran, nothing to reset
    reset = getattr(model, "reset_iter_state", None)
    if reset is None:
        raise RuntimeError(
            "this PyTorch's FSDPModule has no reset_iter_state(): a sharded model cannot be returned to its idle "
            "state after a trial that stopped midway; upgrade PyTorch to search sharded models"
        )
    reset()
    for fsdp_state in state._state_ctx.all_states:
        for group in fsdp_state._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None
                fsdp_param.unsharded_accumulated_grad = None
                free = getattr(fsdp_param, "free_unsharded_param", None)
                if free is not None:
                    free()  # all-gather outputs of a unit that never reached its unsharded state


class ShardedReset:
    """A snapshot extra (:mod:`batchfinder.training.state`) whose ``restore()`` is :func:`reset_sharded_state`: it
    runs wherever the user's state is restored, after a trial's ``except`` block and on the session's exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def restore(self) -> None:
        reset_sharded_state(self.model)


# -- the rounds before every collective --------------------------------------------------------------------------
class _RankLeftTrial(torch.OutOfMemoryError):
    """Raised at a collective of a trial when another rank left it (ran out of memory): this rank leaves the trial
    as if it had run out of memory itself, and recovers the same way."""


class CollectiveCheckpoints:
    """One round of :meth:`~batchfinder.engine.ranks.RankAgreement.trial_round` immediately before every collective
    that a trial calls (see the module documentation); the rounds after a rank left its trial, until every rank has.

    :meth:`trial` opens a trial: the collective functions are wrapped for its length and put back on exit.
    """

    def __init__(self, agreement: RankAgreement) -> None:
        self.agreement = agreement
        self.rounds = 0
        """Rounds run so far, in and after trials (every rank runs the same number)."""
        self._size: int | None = None
        self._depth = 0
        self._followed = False

    @contextlib.contextmanager
    def trial(self, batch_size: int) -> Iterator[list[bool]]:
        """The block of one trial at ``batch_size``; yields a one-item list in which the block puts whether the trial
        fitted on this rank (False when it does not set it). On a normal exit this rank's outcome is sent until
        every rank has left its trial; an exception leaving the block propagates (the front end's
        :func:`~batchfinder.engine.ranks.agreeing_ranks` reports it to the other ranks)."""
        if self._size is not None:
            raise RuntimeError("a trial of a sharded model is already open (a bug in batchfinder)")
        fitted = [False]
        self._size, self._followed = batch_size, False
        patched = self._install()
        try:
            yield fitted
        finally:
            self._uninstall(patched)
            self._size = None
        outcome = _FOLLOWED if self._followed else (_FITTED if fitted[0] else _OUT_OF_MEMORY)
        self._leave(outcome, batch_size)

    def _leave(self, outcome: int, size: int) -> None:
        while True:
            self.rounds += 1
            with host_side_loading():  # the round's few bytes are host memory, charged to no device
                rows = self.agreement.trial_round(True, (outcome, size), f"the end of the trial at batch size {size}")
            if all(left for left, _ in rows):
                return

    def before(self, name: str) -> None:
        """The round before the collective ``name``; raises when another rank left the trial."""
        size = self._size if self._size is not None else 0
        self.rounds += 1
        with host_side_loading():
            rows = self.agreement.trial_round(False, (0, size), f"the {name} in the trial at batch size {size}")
        left = [(rank, values) for rank, (gone, values) in enumerate(rows) if gone]
        if not left:
            return
        finished = [rank for rank, values in left if values[0] == _FITTED]
        if finished:
            raise RuntimeError(
                f"rank {finished[0]} finished the trial at batch size {size} while rank {self.agreement.rank} waited "
                f"at a collective ({name}) that it never called: the ranks ran different steps. Every rank must run "
                "the same model on batches of the same shapes"
            )
        self._followed = True
        first = next((rank for rank, values in left if values[0] == _OUT_OF_MEMORY), left[0][0])
        logger.info("rank %d leaves the trial at batch size %d before the %s: rank %d left it", self.agreement.rank,
                    size, name, first)
        raise _RankLeftTrial(f"rank {first} ran out of memory at batch size {size}")

    def _install(self) -> list[tuple[Any, str, Any]]:
        import torch.distributed._functional_collectives as funcol

        patched: list[tuple[Any, str, Any]] = []
        try:
            for module, names in ((torch.distributed, _DIST_COLLECTIVES), (funcol, _FUNCTIONAL_COLLECTIVES)):
                for name in names:
                    original = getattr(module, name, None)
                    if callable(original):
                        setattr(module, name, self._wrap(original, name))
                        patched.append((module, name, original))
        except BaseException:
            self._uninstall(patched)
            raise
        return patched

    @staticmethod
    def _uninstall(patched: Sequence[tuple[Any, str, Any]]) -> None:
        for module, name, original in reversed(patched):
            setattr(module, name, original)

    def _wrap(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        checkpoints = self
        what = name.replace("_", "-").replace("-single", "").replace("-tensor", "")

        @functools.wraps(original)
        def collective(*args: Any, **kwargs: Any) -> Any:
            own = checkpoints.agreement.group
            if checkpoints._depth or checkpoints._size is None or (own is not None and kwargs.get("group") is own):
                return original(*args, **kwargs)  # the agreement's own exchange, or a collective inside a collective
            checkpoints.before(what)
            checkpoints._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                checkpoints._depth -= 1

        return collective


# -- the session -------------------------------------------------------------------------------------------------
class ShardedTrialSession(TrialSession):
    """A :class:`~batchfinder.engine.trial.TrialSession` on a model sharded with ``fully_shard``: each trial and
    the model check on entry run inside :meth:`CollectiveCheckpoints.trial` when ranks agree, and FSDP2's state is
    reset wherever the user's state is restored (:class:`ShardedReset`). A recorded trial (the guided mode's
    input) is not made: its single-rank ledger does not stand for a sharded step."""

    def __init__(self, model: nn.Module, *args: Any, extra_state: Sequence[Any] = (), **kwargs: Any) -> None:
        agreement = active_agreement()
        if agreement is None and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError(
                "the model is sharded with fully_shard, so its trials gather parameters from every rank: every rank "
                "must search together. Leave distributed at its default (None) and call the search on every rank"
            )
        super().__init__(model, *args, extra_state=[*extra_state, lambda: ShardedReset(model)], **kwargs)
        self.checkpoints = CollectiveCheckpoints(agreement) if agreement is not None else None

    def _guarded(self, batch_size: int) -> contextlib.AbstractContextManager[list[bool]]:
        if self.checkpoints is None:
            return contextlib.nullcontext([False])
        return self.checkpoints.trial(batch_size)

    def _probe(self) -> None:
        with self._guarded(min(2, self.source.length)) as fitted:
            super()._probe()
            fitted[0] = True

    def run(self, batch_size: int, **kwargs: Any) -> Trial:
        with self._guarded(batch_size) as fitted:
            trial = super().run(batch_size, **kwargs)
            fitted[0] = trial.fits
        return trial

    def record_allocations(self, sizes: tuple[int, int] = RECORDED_SIZES) -> AllocationLog | None:
        return None

    def _can_record(self, sizes: tuple[int, int]) -> bool:
        return False
