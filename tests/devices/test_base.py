"""What every device backend shares (batchfinder/devices/base.py): moving a model's tensors to the device and back."""

from __future__ import annotations

import torch
from torch import nn

from batchfinder.devices.base import swapped_data


def test_moving_a_model_keeps_the_same_tensors_and_shares_shared_buffers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    shared = torch.zeros(3)
    model[0].register_buffer("shared", shared)
    model[1].register_buffer("shared", shared)
    tensors = [*model.parameters(), *model.buffers()]
    pointers = [t.data_ptr() for t in tensors]
    converted: list[int] = []

    def to_new_memory(data: torch.Tensor) -> torch.Tensor:  # what .to("cuda") does, on the CPU: new storage
        converted.append(data.data_ptr())
        return data.clone()

    with swapped_data(model, to_new_memory):
        # Restores between trials write into these very objects, so they must be the ones the model uses.
        assert all(a is b for a, b in zip([*model.parameters(), *model.buffers()], tensors))
        assert all(t.data_ptr() != p for t, p in zip(tensors, pointers))
        assert model[0].shared is model[1].shared  # one buffer, moved once, not duplicated
        assert sorted(converted) == sorted(pointers)
        model[1].running_mean.add_(1.0)  # a trial's BatchNorm update lands in the moved copy
    assert [t.data_ptr() for t in tensors] == pointers
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # the original data is back, untouched
