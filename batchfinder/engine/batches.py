"""The device batches of a trial's steps, and releasing what a failed backward pass left with autograd."""

from __future__ import annotations

from typing import Any

import torch

from ..devices.base import DeviceBackend
from ..training.host import host_side_loading

__all__ = ["DeviceBatches", "flush_autograd"]


def flush_autograd(device: DeviceBackend) -> None:
    """Run a trivial backward pass on ``device``'s autograd thread: the graph of a backward pass that raised (out
    of memory) is only released by the next backward there, and until then holds the failed step's activations."""
    with host_side_loading():
        leaf = torch.ones((), device=device.torch_device, requires_grad=True)
        (leaf * 1.0).backward()
    del leaf


class DeviceBatches:
    """The device batch of each step: one batch moved once and reused (a trial), or, for a list of host batches (the
    confirmation run), each step's own, moved before the previous one is dropped as a training loop does (the last
    one again for any extra step)."""

    def __init__(self, device: DeviceBackend, host: Any, per_step: bool) -> None:
        self.device = device
        self.host = host
        self.per_step = per_step
        self.index = -1
        self.current: Any = None if self.per_step else device.to_device(host)

    def get(self, index: int) -> Any:
        if self.per_step:
            index = min(index, len(self.host) - 1)
            if index != self.index:
                self.current = self.device.to_device(self.host[index])  # the previous batch goes after this one arrives
                self.index = index
        return self.current
