"""Which Lightning strategies the callback can search under, and why the others are refused.

Single-device training and DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) are supported: every device
holds a whole model replica and no collective needs to run inside a trial. Sharded strategies and XLA are refused
before any trial, with the reason and what to do instead: ``FSDPStrategy`` (FSDP1), ``DeepSpeedStrategy`` and
``ModelParallelStrategy``. A model sharded with FSDP2 (``fully_shard``) is searched with
:func:`batchfinder.find_batch_size` on every rank, before ``trainer.fit``.
"""

from __future__ import annotations

from .framework import pl

__all__ = ["check_strategy"]

_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
_FSDP2_INSTEAD = (
    "batchfinder searches models sharded with FSDP2 (torch.distributed.fsdp.fully_shard) through "
    "batchfinder.find_batch_size, called on every rank before trainer.fit"
)
_REFUSED_STRATEGIES = {
    "FSDPStrategy": "it wraps the model in FSDP1 (FullyShardedDataParallel), whose unit states are left half-gathered "
    "when a trial runs out of memory inside forward or backward, so the next trial (or your training) would hang or "
    f"fail. What is missing is a way to return FSDP1 to a clean state after an out-of-memory error; {_FSDP2_INSTEAD}",
    "DeepSpeedStrategy": "DeepSpeed's engine partitions optimizer state (ZeRO) and owns the backward pass and the "
    "optimizer step, with collectives inside them that batchfinder cannot make every rank agree on before they "
    f"start, so one rank running out of memory would leave the others waiting. Use DeepSpeed's own autotuner, or "
    f"shard with FSDP2: {_FSDP2_INSTEAD}",
    "ModelParallelStrategy": "the callback does not run trials under it yet: it would have to apply your "
    "configure_model() sharding and its tensor parallelism (collectives inside each layer) before a trial, and "
    "batchfinder guards the collectives of FSDP2 only. For data-parallel sharding alone (fully_shard, "
    f"tensor_parallel_size=1), {_FSDP2_INSTEAD}",
    "XLAStrategy": "XLA compiles a graph per batch size and does not report out-of-memory errors that a process can "
    "recover from",
    "SingleDeviceXLAStrategy": "XLA compiles a graph per batch size and does not report out-of-memory errors that a "
    "process can recover from",
}


def check_strategy(trainer: pl.Trainer) -> None:
    """A ValueError saying why, unless the trainer's strategy is single-device or DDP."""
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
