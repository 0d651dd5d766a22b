"""TrainingState (batchfinder/training/state.py): what a trial may change, captured in host memory and put back bit
for bit: weights and buffers (into the very same tensors), gradients, the optimizer's state and hyperparameters, every
module's train/eval flag, buffer slots, the RNG states, and the extras a front end adds."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from batchfinder.training.state import AttributeSnapshot, StateDictSnapshot, TrainingState
from tests.helpers import SmallCNN, assert_unchanged, snapshot


def _trained() -> tuple[SmallCNN, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """A CNN with BatchNorm after one Adam step (so the optimizer has state), gradients set and mixed modes."""
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    nn.functional.cross_entropy(model(x), y).backward()  # gradients the user has not applied yet
    model.eval()
    model.features[1].train()
    random.seed(3)
    np.random.seed(4)
    return model, optimizer, x, y


def _train_differently(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """What a trial does to the user's state, and more."""
    model.train()
    for _ in range(3):
        nn.functional.cross_entropy(model(x * 2), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.param_groups[0]["added"] = True
    torch.rand(10), random.random(), np.random.rand(3)


def test_restore_puts_everything_back_bit_for_bit_into_the_same_tensors():
    model, optimizer, x, y = _trained()
    before = snapshot(model, optimizer)
    pointers = [t.data_ptr() for t in (*model.parameters(), *model.buffers())]
    moments = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    state = TrainingState.capture(model, [optimizer])
    _train_differently(model, optimizer, x, y)
    assert not torch.equal(before.tensors["head.weight"], model.head.weight)  # the steps did change it
    state.restore()
    assert_unchanged(before, model, optimizer)  # values, gradients, modes, optimizer state, every RNG
    assert [t.data_ptr() for t in (*model.parameters(), *model.buffers())] == pointers  # written in place
    assert all(optimizer.state[p]["exp_avg"] is m for p, m in zip(model.parameters(), moments))
    assert "added" not in optimizer.param_groups[0] and optimizer.param_groups[0]["lr"] == 1e-3


def test_the_torch_rng_draws_the_same_numbers_again():
    model, optimizer, _, _ = _trained()
    state = TrainingState.capture(model, [optimizer])
    first = (torch.rand(5), random.random(), np.random.rand(2))
    state.restore()
    again = (torch.rand(5), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])


def test_between_trials_gradients_stay_cleared_and_the_final_restore_puts_them_back():
    model, optimizer, x, y = _trained()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    state = TrainingState.capture(model, [optimizer])
    state.clear_gradients()
    assert all(p.grad is None for p in model.parameters())  # trials start from none
    _train_differently(model, optimizer, x, y)
    nn.functional.cross_entropy(model(x), y).backward()
    state.restore(final=False)
    assert all(p.grad is None for p in model.parameters())
    state.restore(final=True)
    assert all(torch.equal(p.grad, gradients[name]) for name, p in model.named_parameters())


def test_optimizer_state_created_after_the_capture_is_dropped():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    state = TrainingState.capture(model, [optimizer])
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    assert optimizer.state  # Adam's moments now exist
    state.restore()
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def test_a_buffer_a_module_replaced_is_put_back_at_the_final_restore():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    original = model[1].running_mean
    state = TrainingState.capture(model)
    model[1].running_mean = torch.ones(4)  # as a device backend placing its own copy in the slot
    state.restore(final=False)
    assert model[1].running_mean is not original  # between trials the slot keeps what the device put there
    state.restore(final=True)
    assert model[1].running_mean is original and torch.equal(original, torch.zeros(4))


def test_without_values_only_modes_optimizers_and_rng_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    state = TrainingState.capture(model, values=False)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.eval()
    drawn = torch.rand(3)
    state.restore()
    assert model.training and model[1].training
    assert torch.equal(torch.rand(3), drawn)  # the RNG is back
    assert not torch.equal(model[0].weight, model[0].weight - 1.0) and state.values == []  # values were not copied


def test_extras_are_captured_and_restored_with_the_rest():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    class Holder:
        pass

    holder = Holder()
    holder.history = [1, 2]
    holder.count = 7
    history = holder.history
    state = TrainingState.capture(model, [optimizer], extras=[lambda: StateDictSnapshot(scheduler),
                                                              lambda: AttributeSnapshot(holder)])
    optimizer.step()
    scheduler.step()
    holder.history.append(3)
    holder.count = 8
    holder.added = "new"
    state.restore()
    assert scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 0.1
    assert holder.history is history and holder.history == [1, 2] and holder.count == 7
    assert not hasattr(holder, "added")  # attributes added since are removed
