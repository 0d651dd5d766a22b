"""find_batch_size(train=False): the largest inference batch, against a forward loop tried size by size."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.training.host import host_side_loading


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 2048), nn.ReLU(), nn.Dropout(0.1), nn.Linear(2048, 10))


def _data(count: int = 400) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(count, 32, generator=g), torch.randint(0, 10, (count,), generator=g))


def _forward_loop_fits(model: nn.Module, inputs: torch.Tensor, size: int, capacity: str, steps: int = 2) -> bool:
    """A caller's inference loop at ``size`` on a fresh simulated GPU: each batch moved to the device, the model's
    output kept until the next batch's output replaces it."""
    gpu = bf.SimulatedGPU(capacity)
    model.eval()
    try:
        with gpu.resident(model, None), gpu, torch.inference_mode():
            output = None
            for _ in range(steps):
                with host_side_loading():  # the host batch is not device memory
                    host = inputs[:size].clone()
                batch = gpu.to_device(host)
                output = model(batch)
            del batch, output
    except torch.OutOfMemoryError:
        return False
    finally:
        model.train()
    return True


def test_the_inference_maximum_is_the_largest_size_a_forward_loop_fits_and_above_the_training_maximum():
    data = _data()
    model = _model()
    before = copy.deepcopy(model.state_dict())
    result = bf.find_batch_size(model, data, device="sim:4MiB", train=False)
    brute = [size for size in range(1, len(data) + 1) if _forward_loop_fits(_model(), data.tensors[0], size, "4MiB")]
    assert brute and result.max_batch_size == max(brute)
    assert result.max_batch_size + 1 not in brute
    assert result.train is False and result.batch_size == int(0.8 * result.max_batch_size)
    assert result.confirmations and result.confirmations[-1].fits
    assert str(result).startswith("inference batch size search")
    training = bf.find_batch_size(model, data, device="sim:4MiB", optimizer=torch.optim.SGD)
    assert result.max_batch_size > training.max_batch_size
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_model_is_left_in_the_mode_it_was_in_and_runs_in_eval_mode_under_inference_mode():
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(32, 10)

        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return self.linear(x)

    model = Probe().eval()
    bf.find_batch_size(model, _data(64), device="sim:64MiB", train=False, max_trials=2)
    assert not model.training
    assert seen[-1] == (False, True)
    model.train()
    trial = bf.try_batch_size(model, _data(64), 32, device="sim:64MiB", train=False)
    assert trial.fits and trial.steps == 2 and model.training


def test_variable_length_inference_runs_on_the_largest_samples():
    lengths = [4 + (i * 7) % 60 for i in range(300)]
    g = torch.Generator().manual_seed(0)
    samples = [torch.randn(n, 32, generator=g) for n in lengths]

    def collate(batch):
        return torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)

    loader = torch.utils.data.DataLoader(samples, batch_size=8, collate_fn=collate)
    result = bf.find_batch_size(_model(), loader, device="sim:32MiB", train=False)
    assert result.data_scan is not None and result.data_scan.varies
    longest = collate(sorted(samples, key=len, reverse=True))
    assert _forward_loop_fits(_model(), longest, result.max_batch_size, "32MiB")
    assert not _forward_loop_fits(_model(), longest, result.max_batch_size + 1, "32MiB")


def test_training_arguments_are_refused_for_inference():
    model, data = _model(), _data(32)
    with pytest.raises(ValueError, match="runs no optimizer"):
        bf.find_batch_size(model, data, device="sim:64MiB", train=False, optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="computes no loss"):
        bf.find_batch_size(model, data, device="sim:64MiB", train=False, loss_fn=nn.functional.mse_loss)
    with pytest.raises(ValueError, match="target_batch_size"):
        bf.find_batch_size(model, data, device="sim:64MiB", train=False, target_batch_size=64)
    with pytest.raises(TypeError, match="train must be True"):
        bf.find_batch_size(model, data, device="sim:64MiB", train="no")


def test_the_estimate_and_prediction_for_inference_match_the_simulated_search():
    data = _data()
    model = _model()
    result = bf.find_batch_size(model, data, device="sim:4MiB", train=False, confirm_steps=0)
    prediction = bf.predict_max_batch_size(model, data[0], capacity="4MiB", train=False)
    assert prediction.max_batch_size == result.max_batch_size
    for size in (16, result.max_batch_size):
        estimate = bf.estimate_memory(model, data[0], size, train=False)
        trial = bf.try_batch_size(model, data, size, device="sim:1GiB", train=False)
        assert (estimate.peak, estimate.peak_reserved) == (trial.peak_bytes, trial.peak_reserved_bytes)
        assert estimate.gradients == estimate.optimizer_state == 0
    training = bf.estimate_memory(model, data[0], 16, optimizer=torch.optim.SGD)
    assert bf.estimate_memory(model, data[0], 16, train=False).peak < training.peak
    with pytest.raises(ValueError, match="runs no optimizer"):
        bf.predict_max_batch_size(model, data[0], capacity="4MiB", train=False, optimizer=torch.optim.SGD)


def test_the_command_line_sizes_inference(capsys):
    from batchfinder.cli import main

    assert main(["predict", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--capacity", "16MiB", "--inference"]) == 0
    predicted = capsys.readouterr().out
    assert main(["find", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--device", "sim:16MiB", "--inference",
                 "--samples", "2000", "--json"]) == 0
    import json

    found = json.loads(capsys.readouterr().out)
    assert found["train"] is False and f"largest batch size that fits: {found['max_batch_size']} " in predicted
    assert main(["find", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--device", "sim:16MiB", "--inference",
                 "--optimizer", "sgd"]) != 0


def test_guided_mode_for_inference_says_that_it_bisected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    data = TensorDataset(torch.randn(4096, 16), torch.randint(0, 4, (4096,)))
    result = bf.find_batch_size(model, data, train=False, mode="guided", device="sim:4MiB")
    assert result.mode == "binsearch"
    assert "mode='guided' predicts training memory: inference sizes were bisected" in result.notes
