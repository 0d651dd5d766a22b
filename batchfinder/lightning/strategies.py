"""Which Lightning strategies the callback can search under, and why the others are refused.

Single-device training and DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) are supported: every device
holds a whole model replica and no collective needs to run inside a trial. Sharded strategies and XLA are refused
before any trial, with the reason.
"""

from __future__ import annotations

from .framework import pl

__all__ = ["check_strategy"]

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
