"""The user's state under faults (issue 22): RNG states and samplers left alone by augmenting data, optimizer state
under true half precision.

Each test here failed before its fix: the sample scan ran before the state was captured, a custom batch sampler was
iterated itself, true precisions did not cast the optimizer's state.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import batchfinder as bf

DEVICE = "sim:64MiB"


class AugmentingDataset(Dataset):
    """Fixed-size samples with an "augmentation" that draws from one (or every) random generator."""

    def __init__(self, source: str, length: int = 1200) -> None:
        self.source = source
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.zeros(16)
        if self.source in ("torch", "all"):
            x = x + 0.01 * torch.randn(16)
        if self.source in ("random", "all"):
            x = x + 0.01 * random.random()
        if self.source in ("numpy", "all"):
            x = x + 0.01 * float(np.random.rand())
        return x, index % 4


class VaryingAugmentingDataset(AugmentingDataset):
    """Samples of varying length: the scan measures every one of them (about 1,100 ``__getitem__`` calls)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = super().__getitem__(index)
        return x[: 4 + index % 12], y


def _pad_collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.zeros(len(samples), 16)
    for row, (x, _) in enumerate(samples):
        xs[row, : x.numel()] = x
    return xs, torch.tensor([y for _, y in samples])


def _rng_states() -> tuple[torch.Tensor, Any, Any]:
    numpy_state = np.random.get_state()
    return torch.get_rng_state().clone(), random.getstate(), (numpy_state[0], numpy_state[1].copy(), *numpy_state[2:])


def _assert_same(before: tuple[torch.Tensor, Any, Any], after: tuple[torch.Tensor, Any, Any]) -> None:
    assert torch.equal(before[0], after[0]), "torch's RNG state changed"
    assert before[1] == after[1], "Python's random state changed"
    assert before[2][0] == after[2][0] and np.array_equal(before[2][1], after[2][1]) and before[2][2:] == after[2][2:], (
        "NumPy's RNG state changed"
    )


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("source", ["torch", "random", "numpy"])
@pytest.mark.parametrize("entry", ["find", "try"])
def test_an_augmenting_dataset_leaves_every_rng_state_unchanged(source: str, entry: str) -> None:
    data, model = AugmentingDataset(source), _model()
    before = _rng_states()
    if entry == "find":
        bf.find_batch_size(model, data, device=DEVICE, max_trials=3)
    else:
        bf.try_batch_size(model, data, 8, device=DEVICE)
    _assert_same(before, _rng_states())


def test_the_scan_of_varying_samples_leaves_the_rng_states_unchanged() -> None:
    loader = DataLoader(VaryingAugmentingDataset("all"), batch_size=8, collate_fn=_pad_collate)
    model = _model()
    before = _rng_states()
    result = bf.find_batch_size(model, loader, device=DEVICE, max_trials=3)
    assert result.data_scan is not None and result.data_scan.varies
    _assert_same(before, _rng_states())


class _InterruptingDataset(AugmentingDataset):
    """Raises KeyboardInterrupt at the ``at``-th ``__getitem__`` call (inside the sample scan)."""

    def __init__(self, at: int) -> None:
        super().__init__("all")
        self.at = at
        self.calls = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        x, y = super().__getitem__(index)
        return x[: 4 + index % 12], y


def test_ctrl_c_during_the_scan_leaves_the_rng_states_unchanged() -> None:
    data = _InterruptingDataset(at=300)
    loader = DataLoader(data, batch_size=8, collate_fn=_pad_collate)
    model = _model()
    before = _rng_states()
    with pytest.raises(KeyboardInterrupt):
        bf.find_batch_size(model, loader, device=DEVICE)
    assert data.calls == 300
    _assert_same(before, _rng_states())


class EpochBatchSampler:
    """A batch sampler with its own ``random.Random`` and epoch counter, as a user writes one (no ``generator``)."""

    def __init__(self, length: int, batch_size: int, seed: int = 0) -> None:
        self.length = length
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.epoch = 0

    def __iter__(self):
        self.epoch += 1
        order = list(range(self.length))
        self.rng.shuffle(order)
        for start in range(0, self.length, self.batch_size):
            yield order[start : start + self.batch_size]

    def __len__(self) -> int:
        return (self.length + self.batch_size - 1) // self.batch_size


def test_a_custom_batch_sampler_keeps_its_own_rng_and_epoch_counter() -> None:
    data = VaryingAugmentingDataset("torch", length=256)
    sampler = EpochBatchSampler(len(data), 8, seed=5)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=_pad_collate)
    rng_before = sampler.rng.getstate()
    expected_first = next(iter(EpochBatchSampler(len(data), 8, seed=5)))
    bf.find_batch_size(_model(), loader, device=DEVICE, max_trials=3, confirm_steps=2)
    assert sampler.epoch == 0
    assert sampler.rng.getstate() == rng_before
    assert next(iter(sampler)) == expected_first  # the user's first training batch is the one it would have been


def _trained_model_and_optimizer(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, Dataset]:
    torch.manual_seed(0)
    model = _model()
    optimizer = (
        torch.optim.Adam(model.parameters()) if kind == "adam" else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer, torch.utils.data.TensorDataset(x, y)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_true_precision_casts_existing_optimizer_state_and_back(precision: str, kind: str) -> None:
    model, optimizer, data = _trained_model_and_optimizer(kind)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}
    objects = {id(p): {k: id(v) for k, v in s.items()} for p, s in optimizer.state.items()}
    result = bf.find_batch_size(model, data, optimizer=optimizer, device=DEVICE, precision=precision, max_trials=4)
    assert result.max_batch_size > 0
    assert bf.try_batch_size(model, data, 8, optimizer=optimizer, device=DEVICE, precision=precision).fits
    for param, entries in optimizer.state.items():
        for key, value in entries.items():
            saved = state[id(param)][key]
            if torch.is_tensor(saved):
                assert value.dtype == saved.dtype and torch.equal(value, saved), key
                assert id(value) == objects[id(param)][key], f"{key} was replaced"
            else:
                assert value == saved
    assert all(torch.equal(weights[k], v) and v.dtype == weights[k].dtype for k, v in model.state_dict().items())
