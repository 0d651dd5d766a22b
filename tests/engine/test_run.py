"""The one search entry (batchfinder.engine.run): what a whole call shows the user."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchfinder as bf
from tests.helpers import classification_data


class WarnsInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("the user's own forward warns", UserWarning)
        return self.linear(x)


@pytest.mark.parametrize("call", ["find", "try"])
def test_a_warning_of_the_users_forward_is_shown_once_per_call(call: str) -> None:
    torch.manual_seed(0)
    data = classification_data(256, (8,), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning that reaches the user is counted
        if call == "find":
            bf.find_batch_size(WarnsInForward(), data, optimizer=torch.optim.SGD, device="sim:4MiB")
        else:
            bf.try_batch_size(WarnsInForward(), data, 64, optimizer=torch.optim.SGD, device="sim:4MiB")
    assert [str(w.message) for w in caught].count("the user's own forward warns") == 1
