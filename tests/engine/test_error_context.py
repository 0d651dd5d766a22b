"""An error of the user's code inside a search keeps its type and says where it happened: the batch size, the phase
of the step, what to check, and the trials before it (kept on the exception)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import batchfinder as bf
from batchfinder.errors import LossTypeError


class RaisesAtSize(nn.Module):
    """A linear model whose forward (or backward) raises from a batch size on."""

    def __init__(self, threshold: int = 100, where: str = "forward", error: type[Exception] = ValueError) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 4)
        self.threshold = threshold
        self.where = where
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.threshold:
            if self.where == "forward":
                raise self.error(f"the user's model refuses {x.shape[0]} rows")
            return _FailingBackward.apply(self.layer(x))
        return self.layer(x)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise ArithmeticError("the user's backward fails")


class UsersOwnError(Exception):
    """An exception type of the user's, which must come out as it is."""


def _data(n: int = 512) -> TensorDataset:
    return TensorDataset(torch.randn(n, 16), torch.randint(0, 4, (n,)))


def _find(model: nn.Module, **kwargs):
    kwargs.setdefault("device", "sim:64MiB")
    return bf.find_batch_size(model, _data(), **kwargs)


def _text(exc: BaseException) -> str:
    return "\n".join([str(exc), *getattr(exc, "__notes__", [])])


def test_error_at_a_large_size_names_the_size_the_phase_and_the_trials_before_it():
    with pytest.raises(ValueError, match="refuses 128 rows") as caught:
        _find(RaisesAtSize(100), init_batch_size=16)
    exc = caught.value
    assert type(exc) is ValueError
    text = _text(exc)
    assert "trial at batch size 128" in text and "forward pass" in text
    assert "16, 32 and 64 fitted (largest 64)" in text
    assert "Check that the dataset" not in text  # the model ran on smaller batches of the same data
    assert exc.batchfinder_batch_size == 128
    assert exc.batchfinder_phase == "forward"
    assert [t.batch_size for t in exc.batchfinder_trials] == [16, 32, 64]
    assert all(t.fits for t in exc.batchfinder_trials)
    assert len([n for n in exc.__notes__ if n.startswith("batchfinder:")]) == 1


def test_error_in_backward_says_backward_and_the_step():
    with pytest.raises(ArithmeticError, match="backward fails") as caught:
        _find(RaisesAtSize(100, where="backward"), init_batch_size=16)
    text = _text(caught.value)
    assert "batch size 128 (training step 1 of 2), in the backward pass" in text


def test_one_trial_names_its_size():
    with pytest.raises(ValueError) as caught:
        bf.try_batch_size(RaisesAtSize(100), _data(), 200, device="sim:64MiB")
    assert "trial at batch size 200" in _text(caught.value)
    assert caught.value.batchfinder_batch_size == 200


def test_the_probe_keeps_the_users_exception_type():
    with pytest.raises(UsersOwnError) as caught:
        _find(RaisesAtSize(1, error=UsersOwnError))
    text = _text(caught.value)
    assert "checking the model on a batch of 2" in text and "forward pass" in text


def test_a_loss_that_is_not_a_scalar_names_loss_fn_not_the_dataset():
    def per_sample(out, y):
        return F.cross_entropy(out, y, reduction="none")

    with pytest.raises(LossTypeError) as caught:
        _find(RaisesAtSize(10**6), loss_fn=per_sample)
    text = _text(caught.value)
    assert str(caught.value).startswith("loss_fn returned Tensor[2]")
    assert "Check loss_fn" in text
    assert "Check that the dataset" not in text


def test_an_optimizer_factory_with_the_wrong_signature_names_optimizer():
    with pytest.raises(TypeError, match="positional argument") as caught:
        _find(RaisesAtSize(10**6), optimizer=lambda: torch.optim.SGD)
    text = _text(caught.value)
    assert "creating the optimizer from the optimizer argument" in text and "Check optimizer" in text
    assert "Check that the dataset" not in text


def test_an_error_in_loss_fn_at_a_trial_names_loss_fn_and_the_size():
    def loss_fn(out, y):
        if out.shape[0] >= 64:
            raise KeyError("label smoothing table")
        return F.cross_entropy(out, y)

    with pytest.raises(KeyError) as caught:
        _find(RaisesAtSize(10**6), loss_fn=loss_fn, init_batch_size=16)
    text = _text(caught.value)
    assert "trial at batch size 64" in text and "in loss_fn" in text
    assert caught.value.batchfinder_phase == "loss_fn"


def test_a_step_fn_error_names_step_fn():
    def step_fn(model, batch):
        raise RuntimeError("custom step broke")

    with pytest.raises(RuntimeError, match="custom step broke") as caught:
        _find(RaisesAtSize(10**6), step_fn=step_fn)
    assert "in step_fn" in _text(caught.value)


def _collate_up_to_99(samples):
    """A collate_fn that cannot build batches of 100 samples or more."""
    if len(samples) >= 100:
        raise LookupError(f"cannot collate {len(samples)} samples")
    return torch.utils.data.default_collate(samples)


def test_an_error_while_building_a_batch_says_collate():
    loader = torch.utils.data.DataLoader(_data(), batch_size=8, collate_fn=_collate_up_to_99)
    with pytest.raises(LookupError, match="cannot collate 128 samples") as caught:
        bf.find_batch_size(RaisesAtSize(10**6), loader, device="sim:64MiB", init_batch_size=16)
    text = _text(caught.value)
    assert "trial at batch size 128" in text and "building the batch from the dataset" in text
    assert [t.batch_size for t in caught.value.batchfinder_trials] == [16, 32, 64]


class _MissingSamples(Dataset):
    """Samples from index 100 on cannot be loaded."""

    def __len__(self) -> int:
        return 512

    def __getitem__(self, index: int):
        if index >= 100:
            raise LookupError(f"sample {index} is missing")
        return torch.randn(16), 0


def test_an_error_while_measuring_sample_sizes_names_the_sample():
    with pytest.raises(LookupError, match="is missing") as caught:
        bf.find_batch_size(RaisesAtSize(10**6), _MissingSamples(), device="sim:64MiB")
    text = _text(caught.value)
    assert "__getitem__ for sample" in text and "measuring the samples' sizes" in text
