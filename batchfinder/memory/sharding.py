"""Predicting the memory of one rank of a sharded (FSDP2, ``fully_shard``) job without a cluster.

>>> import torch, batchfinder as bf
>>> from torch import nn
>>> from batchfinder.estimate import Sharding
>>> model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
>>> est = bf.estimate_memory(model, (1024,), 64, sharding=Sharding(world_size=64, wrap=nn.Linear))     # doctest: +SKIP
>>> est.sharded.world_size, est.parameters                                                   # doctest: +SKIP

:class:`Sharding` describes the job: how many ranks, which modules are wrapped with ``fully_shard`` (the root always
is),
``reshard_after_forward`` and FSDP's ``MixedPrecisionPolicy``. Given an *unsharded* model, the estimator traces one
rank's training step: a copy of the model is made of fake tensors (no memory, no values), sharded with PyTorch's own
``fully_shard`` on a *fake* process group of ``world_size`` ranks (``torch.distributed``'s ``"fake"`` backend:
collectives that move nothing), and the step runs under the simulated GPU's accounting. So the figures are what
that rank holds: its shards of the parameters, gradients and optimizer state (each padded as FSDP pads them: every
rank holds ``ceil(rows / world_size)`` rows of each parameter, rank 0 never less than any other,
``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``), the all-gathered parameters of the units in use, the
reduce-scatter buffers, the batch and the activations.

What stays as it was: the user's model (the copy is sharded, never the model) and ``torch.distributed``: the fake
process group is opened for each trace and destroyed after it. When the process already has a process group (a
``torchrun`` job), the prediction refuses rather than replace it: ``torch.distributed`` has one default group per
process, and the fake one needs ``world_size`` ranks.

The step follows FSDP2's code on the CPU: the order of all-gathers, frees and reduce-scatters is the one FSDP's
Python code issues. On CUDA, FSDP2 runs the all-gathers and reduce-scatters on streams of their own and keeps
their buffers until the next unit's are used (``torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py``); the
caching allocator keeps those streams' blocks apart. That overlap is not modelled here: the 0.8 safety factor of the
recommendation covers it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..training.optimizers import OptimizerLike, OptimizerSpec, resolve_optimizer
from .accounting import tensor_storages
from .breakdown import ShardedMemory
from .tracing import FakeTrainer

__all__ = ["Sharding", "ShardedTrainer", "check_sharding", "check_unsharded", "check_no_process_group", "fake_world",
           "fsdp_wrapper", "is_dtensor"]

logger = logging.getLogger(__name__)

WrapSpec = type | tuple[type, ...] | Callable[[nn.Module], bool] | None


@dataclass(frozen=True)
class Sharding:
    """One rank of a job that shards the model with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Args:
        world_size: ranks the parameters, gradients and optimizer state are sharded over (at least 1).
        wrap: which modules are units of their own (``fully_shard(module)`` for each, before the root): a module class
            (e.g. ``TransformerBlock``), a tuple of classes, or a callable ``module -> bool``; None: only the root.
            The root (the whole model) is always sharded last, as ``fully_shard(model)``.
        reshard_after_forward: as ``fully_shard``'s argument, for every unit and the root: True frees each unit's
            gathered parameters after its forward (gathered again in backward), False keeps them until backward;
            None (default): FSDP's default (True for the units, False for the root).
        mixed_precision: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (``param_dtype``: the dtype of the
            gathered parameters and of the computation; ``reduce_dtype``: of the gradients' reduce-scatter); None:
            the parameters' own dtype.
        rank: the rank traced (default 0, which holds the largest shard of every parameter).
    """

    world_size: int
    wrap: WrapSpec = None
    reshard_after_forward: bool | None = None
    mixed_precision: Any = None
    rank: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(
                f"Sharding(world_size={self.world_size!r}): world_size is the number of ranks (GPUs) the model is "
                "sharded over, a whole number of at least 1, e.g. Sharding(world_size=8)"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"Sharding(rank={self.rank!r}): the rank traced must be a whole number from 0 to world_size - 1 = "
                f"{self.world_size - 1} (rank 0, the default, holds the largest shards)"
            )
        if self.reshard_after_forward not in (None, True, False):
            raise TypeError(
                f"Sharding(reshard_after_forward={self.reshard_after_forward!r}): give True, False or None (FSDP's "
                "default)"
            )
        wrap = self.wrap
        classes = wrap if isinstance(wrap, tuple) else (wrap,)
        if wrap is not None and not (
            all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes)
            or (callable(wrap) and not isinstance(wrap, type))
        ):
            raise TypeError(
                f"Sharding(wrap={wrap!r}): give a module class (e.g. wrap=nn.TransformerEncoderLayer), a tuple of "
                "module classes, or a callable module -> bool that picks the modules sharded as units of their own"
            )
        if self.mixed_precision is not None:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            if not isinstance(self.mixed_precision, MixedPrecisionPolicy):
                raise TypeError(
                    f"Sharding(mixed_precision=...) takes FSDP's policy, e.g. torch.distributed.fsdp."
                    f"MixedPrecisionPolicy(param_dtype=torch.bfloat16), not {type(self.mixed_precision).__name__}"
                )

    def picks(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` (named ``name`` in the model, ``""`` for the root) is a unit of its own."""
        if not name or self.wrap is None:
            return False
        if isinstance(self.wrap, (type, tuple)):
            return isinstance(module, self.wrap)
        return bool(self.wrap(module))

    def units(self, model: nn.Module) -> list[str]:
        """The names of the modules of ``model`` wrapped as units of their own (the root not included); raises a
        ValueError when ``wrap`` is given and picks none."""
        names = [name for name, module in model.named_modules() if self.picks(name, module)]
        if self.wrap is not None and not names:
            kinds = sorted({type(m).__name__ for _, m in model.named_modules()})
            raise ValueError(
                f"Sharding(wrap={_describe_wrap(self.wrap)}) picks no module of {type(model).__name__}, whose modules "
                f"are of the classes {kinds}: name the class of its blocks (e.g. wrap={kinds[-1]}), or wrap=None to "
                "shard the model as one unit"
            )
        return names

    def describe(self) -> str:
        """E.g. ``"FSDP2 over 8 ranks (rank 0), 7 units wrapped by Linear and the root"``."""
        policy = self.mixed_precision
        dtypes = ""
        if policy is not None:
            dtypes = f", parameters gathered in {policy.param_dtype or 'their own dtype'}, gradients reduced in " \
                f"{policy.reduce_dtype or policy.param_dtype or 'their own dtype'}"
        reshard = "" if self.reshard_after_forward is None else f", reshard_after_forward={self.reshard_after_forward}"
        wrap = _describe_wrap(self.wrap)
        return f"FSDP2 over {self.world_size} ranks (rank {self.rank}), wrap={wrap}{reshard}{dtypes}"


def _describe_wrap(wrap: WrapSpec) -> str:
    if wrap is None:
        return "None"
    if isinstance(wrap, type):
        return wrap.__name__
    if isinstance(wrap, tuple):
        return "(" + ", ".join(c.__name__ for c in wrap) + ")"
    return getattr(wrap, "__name__", type(wrap).__name__)


def check_sharding(sharding: Any, model: nn.Module) -> None:
    """Refuse, before any trace, a ``sharding`` argument that is not a :class:`Sharding`, a model already sharded, a
    process group already initialised, and a wrap that picks no module of ``model``."""
    if not isinstance(sharding, Sharding):
        raise TypeError(
            f"sharding must be a batchfinder.estimate.Sharding(world_size=..., wrap=...), not {type(sharding).__name__}"
        )
    check_unsharded(model)
    check_no_process_group(sharding)
    sharding.units(model)


def check_unsharded(model: nn.Module) -> None:
    """Refuse a model that is sharded already (its parameters DTensors, or FSDP's wrappers): the sharding
    description applies to the unsharded model."""
    sharded = [name for name, p in model.named_parameters() if is_dtensor(p)]
    wrappers = [name or type(model).__name__ for name, m in model.named_modules() if fsdp_wrapper(m)]
    if sharded or wrappers:
        found = f"fully_shard/FSDP applied to {wrappers[:3]}" if wrappers else f"DTensor parameters {sharded[:3]}"
        raise ValueError(
            f"sharding=...: the model is sharded already ({found}). Pass the model as it is before fully_shard (the "
            "prediction shards a copy of it as the Sharding describes), or search the sharded model itself with "
            "find_batch_size on every rank"
        )


def fsdp_wrapper(module: nn.Module) -> str | None:
    """``"FSDPModule"`` for a module ``fully_shard`` was applied to (FSDP2), ``"FullyShardedDataParallel"`` for an
    FSDP1 wrapper, None otherwise (found by class name: nothing of ``torch.distributed`` is imported)."""
    for cls in type(module).__mro__:
        if cls.__name__ in ("FSDPModule", "FullyShardedDataParallel"):
            return cls.__name__
    return None


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``DTensor`` (a sharded parameter); ``torch.distributed.tensor`` is not imported when it never was
    (no tensor can be one then)."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


# -- the fake process group ------------------------------------------------------------------------------------------
def check_no_process_group(sharding: Sharding) -> None:
    """Refuse to run where ``torch.distributed`` is unavailable or already has a process group (see the module
    documentation)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("sharding=... needs torch.distributed, which this PyTorch build lacks")
    if dist.is_initialized():
        raise ValueError(
            f"sharding=...: torch.distributed is already initialised in this process (backend "
            f"{dist.get_backend()}, {dist.get_world_size()} rank(s)). The prediction needs the process's default "
            f"group to be a fake one of {sharding.world_size} ranks and does not replace yours: predict in a process "
            "without a process group (before init_process_group, or outside torchrun), or search the sharded model "
            "with find_batch_size on every rank"
        )


@contextlib.contextmanager
def fake_world(sharding: Sharding) -> Iterator[Any]:
    """A fake process group of ``sharding.world_size`` ranks as this process's default group, as rank
    ``sharding.rank``, and a 1-D CPU device mesh over it; destroyed on exit. Refuses to replace a process group the
    process has already."""
    import torch.distributed as dist

    check_no_process_group(sharding)
    from torch._C._distributed_c10d import FakeStore
    from torch.distributed.device_mesh import init_device_mesh

    if "fake" not in dist.Backend.backend_list:  # older PyTorch registers it on import of its testing module
        import importlib

        importlib.import_module("torch.testing._internal.distributed.fake_pg")

    dist.init_process_group("fake", store=FakeStore(), rank=sharding.rank, world_size=sharding.world_size)
    try:
        yield init_device_mesh("cpu", (sharding.world_size,))
    finally:
        dist.destroy_process_group()


def _fake_copy(model: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``convert``'s fake twins (the model's own tensors are
    swapped out for the copy and put back: neither read nor copied)."""
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    memo: dict[int, Any] = {}
    try:
        for module in model.modules():
            for slots in (module._parameters, module._buffers):
                for key, value in list(slots.items()):
                    if value is not None:
                        fake = convert(value)
                        memo[id(fake)] = fake
                        swapped.append((slots, key, value))
                        slots[key] = fake
        return copy.deepcopy(model, memo)
    finally:
        for slots, key, value in reversed(swapped):
            slots[key] = value


def _twin_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, sharded: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of the class and settings of ``optimizer`` (over ``model``) over ``sharded``'s parameters."""
    if optimizer.state:
        raise ValueError(
            "sharding=...: the optimizer instance has state already; the sharded rank's state is not a copy of it. "
            f"Pass the optimizer class instead (optimizer=torch.optim.{type(optimizer).__name__})"
        )
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params = list(sharded.parameters())
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [params[index[id(p)]] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    return type(optimizer)(groups, **optimizer.defaults)


class ShardedTrainer(FakeTrainer):
    """A :class:`~batchfinder.memory.tracing.FakeTrainer` that traces rank ``sharding.rank`` of ``sharding``: each
    trace shards a fake copy of the model with ``fully_shard`` on a fake process group (:func:`fake_world`) and runs
    the steps on it. ``optimizer_arg`` is the user's ``optimizer`` argument (resolved over the copy);
    :attr:`sharded` the per-trace :class:`~batchfinder.memory.breakdown.ShardedMemory`, by batch size."""

    def __init__(self, *args: Any, sharding: Sharding, optimizer_arg: OptimizerLike = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sharding = sharding
        self.optimizer_arg = optimizer_arg
        self.unit_names = sharding.units(self.model)
        self.sharded: dict[int, ShardedMemory] = {}

    def _trace_steps(
        self, batch_size: int, mode: Any, convert: Any, recorder: Any, ledger: Any, step_sizes: Any = None
    ) -> Any:
        user_model, user_optimizer = self.model, self.optimizer
        with fake_world(self.sharding) as mesh:
            with mode:
                copied = _fake_copy(user_model, convert)
                gathered = _shard(copied, self.sharding, mesh)
            for tensor in [*copied.parameters(), *copied.buffers()]:
                convert.memo[id(tensor)] = tensor  # the sharded copy is fake already: the trace uses it as it is
            spec: OptimizerSpec | None = None
            if user_optimizer is not None:
                bound = user_optimizer.bound
                if bound is not None:
                    twin = _twin_optimizer(bound, user_model, copied)
                    spec = OptimizerSpec(lambda: twin, None, user_optimizer.label)
                else:
                    spec = resolve_optimizer(self.optimizer_arg, copied)
                    spec = OptimizerSpec(spec.factory, None, user_optimizer.label)
            watch = _GatheredAtPeak(ledger, copied)
            self.model, self.optimizer = copied, spec
            try:
                trace = super()._trace_steps(batch_size, mode, convert, recorder, ledger, step_sizes)
            finally:
                self.model, self.optimizer = user_model, user_optimizer
                watch.close()
        self.sharded[trace.batch_size] = ShardedMemory(
            world_size=self.sharding.world_size,
            rank=self.sharding.rank,
            description=self.sharding.describe(),
            units=len(gathered),
            unsharded_parameters=sum(gathered.values()),
            largest_unit=max(gathered, key=gathered.__getitem__),
            largest_unit_bytes=max(gathered.values()),
            gathered_at_peak=watch.at_peak,
        )
        return trace


def _shard(model: nn.Module, sharding: Sharding, mesh: Any) -> dict[str, int]:
    """Apply ``fully_shard`` to the units and the root of ``model`` (a fake copy); returns each unit's gathered
    parameter bytes (unsharded, padded to ``world_size`` equal shards, in the gathered dtype, rounded as the allocator
    rounds the all-gather's buffer), by unit name (``"(root)"`` for what the root gathers itself)."""
    from torch.distributed.fsdp import fully_shard

    options: dict[str, Any] = {"mesh": mesh}
    if sharding.reshard_after_forward is not None:
        options["reshard_after_forward"] = sharding.reshard_after_forward
    if sharding.mixed_precision is not None:
        options["mp_policy"] = sharding.mixed_precision
    dtype = sharding.mixed_precision.param_dtype if sharding.mixed_precision is not None else None
    owned: dict[int, str] = {}
    modules = dict(model.named_modules())
    for name in sharding.units(model):
        for param in modules[name].parameters():
            owned.setdefault(id(param), name)
    sizes: dict[str, int] = {}
    world = sharding.world_size
    for param in model.parameters():
        unit = owned.get(id(param), "(root)")
        rows = param.shape[0] if param.dim() else 1
        padded = -(-rows // world) * world * (param.numel() // max(rows, 1))
        itemsize = (dtype if dtype is not None and param.is_floating_point() else param.dtype).itemsize
        sizes[unit] = sizes.get(unit, 0) + padded * itemsize
    for name in sharding.units(model):
        fully_shard(modules[name], **options)
    fully_shard(model, **options)
    return {unit: -(-size // 512) * 512 for unit, size in sizes.items()}


class _GatheredAtPeak:
    """Follows ``ledger``'s total: at each new high, the bytes of the gathered (unsharded, plain-tensor) parameters of
    ``model`` that are held then."""

    def __init__(self, ledger: Any, model: nn.Module) -> None:
        from torch.distributed.tensor import DTensor

        self.ledger, self.model, self.dtensor = ledger, model, DTensor
        self.best = 0
        self.at_peak = 0
        self._charge = ledger.charge
        ledger.charge = self.charge

    def charge(self, storages: Any) -> int:
        added = self._charge(storages)
        total = self.ledger.allocated
        if total > self.best:
            self.best = total
            params = [p for p in self.model.parameters() if not isinstance(p, self.dtensor)]
            held = {id(s): s for s in tensor_storages(params)}
            self.at_peak = sum(self.ledger.charged_bytes(s) for s in held.values())
        return added

    def close(self) -> None:
        self.ledger.charge = self._charge
        self.model = None  # type: ignore[assignment]

