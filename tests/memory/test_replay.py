"""One recorded trace replayed at any batch size: exact where memory is affine in B, refused where it is not."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
import batchfinder.memory.estimate as estimate_module
from batchfinder.memory.estimate import Estimator
from batchfinder.memory.replay import P1, P2, record, replay_obstacle
from batchfinder.search.strategies import StopReason
from tests.helpers import DictLossModel, PartlyFrozen, SmallCNN, TinyTransformer, small_mlp


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens)).mean(dim=1)


class Contrastive(nn.Module):
    """Scores every sample against every other: a B x B matrix, memory quadratic in the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x)
        return (z @ z.T).logsumexp(dim=1)


class Chunked(nn.Module):
    """Processes the batch in chunks of 256: how many allocations a step makes depends on the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.layer(chunk).relu() for chunk in x.split(256)])


def _cases() -> list[tuple[str, nn.Module, object, object]]:
    torch.manual_seed(0)
    return [
        ("mlp", nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)), (1, 8, 8), torch.optim.Adam),
        ("cnn with batchnorm", SmallCNN(), (3, 16, 16), torch.optim.SGD),
        ("transformer", TinyTransformer(), (torch.randint(0, 100, (12,)), torch.tensor(1)), torch.optim.AdamW),
        ("tied weights", Tied(), (torch.randint(0, 50, (6,)),), torch.optim.Adam),
        ("partly frozen", PartlyFrozen(), (torch.randn(48), torch.tensor(2)), torch.optim.Adam),
        ("dict input, own loss", DictLossModel(), {"input_ids": torch.randint(0, 50, (12,)),
                                                   "labels": torch.randint(0, 50, (12,))}, torch.optim.Adam),
    ]


@pytest.mark.parametrize("name", [case[0] for case in _cases()])
def test_replays_equal_traces_to_the_byte_at_every_size(name):
    _, model, sample, optimizer = next(case for case in _cases() if case[0] == name)
    for reserved, capacity in ((False, None), (True, 24 * 2**20)):
        estimator = Estimator.create(model, sample, optimizer=optimizer, reserved=reserved, allocator_capacity=capacity)
        log = record(estimator.trainer)
        assert log.unsuitable is None, log.unsuitable
        for size in (2, 3, 17, 64, 257, 1000):
            replay = log.replay(size, capacity)
            try:
                trace = estimator.trainer.trace(size, breakdown=False)
            except torch.OutOfMemoryError:
                assert replay.overflows, size  # the allocator of that capacity runs out in both
                continue
            assert not replay.overflows
            assert (replay.peak, replay.peak_reserved, replay.peak_phase, replay.phase_peaks) == (
                trace.peak, trace.peak_reserved, trace.peak_phase, trace.phase_peaks
            ), (name, size)


def test_a_prediction_costs_one_trace_and_matches_tracing_every_size(monkeypatch):
    torch.manual_seed(0)
    model = SmallCNN()
    replayed = bf.predict_max_batch_size(model, (3, 32, 32), capacity="48MiB", optimizer=torch.optim.Adam)
    assert replayed.traces == 1 and replayed.method == "one trace, replayed at each size"
    assert replayed.estimate.peak_reserved == replayed.peak_bytes  # the breakdown, traced when read, agrees
    monkeypatch.setattr(estimate_module.Estimator, "_replay", lambda self, size: None)
    traced = bf.predict_max_batch_size(model, (3, 32, 32), capacity="48MiB", optimizer=torch.optim.Adam)
    assert traced.traces > 3
    assert (traced.max_batch_size, traced.peak_bytes, traced.next_peak_bytes) == (
        replayed.max_batch_size, replayed.peak_bytes, replayed.next_peak_bytes
    )


@pytest.mark.parametrize("model", [Contrastive(), Chunked()], ids=["quadratic", "chunked"])
def test_memory_that_is_not_affine_in_the_batch_size_is_traced_per_size_and_stays_exact(model):
    estimator = Estimator.create(model, (16,), optimizer=torch.optim.SGD, loss_fn=lambda out, _: out.mean())
    log = record(estimator.trainer)
    assert log.unsuitable is not None and "not an affine function of the batch size" in log.unsuitable
    prediction = bf.predict_max_batch_size(model, (16,), capacity="1MiB", optimizer=torch.optim.SGD, allocator="ideal",
                                           step_fn=lambda m, batch: m(batch[0]).mean())
    assert prediction.method.startswith("a trace per size: the forward and backward passes of training step 2")
    step = lambda m, batch: m(batch[0]).mean()  # noqa: E731
    at = [bf.estimate_memory(model, (16,), size, optimizer=torch.optim.SGD, step_fn=step).peak
          for size in (prediction.max_batch_size, prediction.max_batch_size + 1)]
    assert at[0] <= 2**20 < at[1]  # what tracing each size says
    data = TensorDataset(torch.randn(20_000, 16), torch.zeros(20_000))
    device = bf.SimulatedGPU("1MiB", allocator="ideal")
    guided = bf.find_batch_size(model, data, device=device, mode="guided", optimizer=torch.optim.SGD, step_fn=step,
                                confirm_steps=0)
    binsearch = bf.find_batch_size(model, data, device=device, optimizer=torch.optim.SGD, step_fn=step, confirm_steps=0)
    # A recorded trial at 2 and 3 samples holds one chunk and looks affine (the quadratic one does not, and falls back
    # to tracing each size): the trial at the predicted size does not reach the predicted peaks, so the search
    # closes its bracket with real trials, and stays exact.
    assert guided.max_batch_size == binsearch.max_batch_size and guided.trial_for(guided.max_batch_size).fits
    assert guided.stop_reason == StopReason.BRACKET_CLOSED and guided.trial_for(guided.max_batch_size + 1) is not None


def test_batch_size_one_is_traced_because_size_one_dimensions_copy_less():
    torch.manual_seed(0)
    estimator = Estimator.create(TinyTransformer(), (torch.randint(0, 100, (12,)), torch.tensor(1)))
    assert estimator.peak(2) > 0 and estimator.calls == 1 and estimator.replayable
    estimator.peak(1)
    assert estimator.calls == 2  # batch size 1 is traced, not replayed


def test_guided_search_records_once_and_says_how_it_predicted():
    model = small_mlp()
    data = TensorDataset(torch.randn(8000, 1, 8, 8), torch.randint(0, 10, (8000,)))
    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"), mode="guided")
    binsearch = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"))
    assert result.max_batch_size == binsearch.max_batch_size and result.num_ooms == 0 and result.num_trials == 1
    assert result.prediction_method == "one recorded trial (batch sizes 2 and 3), replayed at each size"
    assert result.stop_reason == StopReason.PREDICTION_CONFIRMED and result.smallest_failure == result.max_batch_size + 1
    assert "is predicted to run out of memory (not tried)" in result.why_stopped()
    assert result.confirmations[-1].replayed and result.confirmations[-1].fits
    assert "prediction: largest" in str(result) and result.as_dict()["prediction_method"] == result.prediction_method


def test_batches_of_plain_values_are_not_made_at_a_billion_samples():
    assert replay_obstacle((torch.zeros(1, 3), ["a caption"])) is not None
    assert replay_obstacle({"x": torch.zeros(1, 3), "y": torch.zeros(1)}) is None
    assert P1 != P2 and all(p % d for p in (P1, P2) for d in range(2, 1000))  # two primes


def _dataset_of(sample: object, length: int) -> list:
    """``length`` samples shaped like ``sample`` (same shapes and dtypes, varied values)."""
    torch.manual_seed(1)

    def varied(value: object) -> object:
        if isinstance(value, dict):
            return {key: varied(item) for key, item in value.items()}
        if isinstance(value, tuple):
            return tuple(varied(item) for item in value)
        if value.is_floating_point():
            return torch.randn_like(value)
        return torch.randint_like(value, 0, max(int(value.max()) + 1, 2))

    return [varied(sample) for _ in range(length)]


@pytest.mark.parametrize("name", [case[0] for case in _cases()])
def test_a_recorded_real_trial_replays_what_trials_measure_to_the_byte(name):
    from batchfinder.engine.trial import TrialSession
    from batchfinder.training.batching import BatchSource
    from batchfinder.training.optimizers import resolve_optimizer
    from batchfinder.training.steps import make_step

    _, model, sample, optimizer = next(case for case in _cases() if case[0] == name)
    shape = isinstance(sample, tuple) and all(isinstance(n, int) for n in sample)
    data = _dataset_of((torch.randn(sample), torch.tensor(1)) if shape else sample, 1200)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    device = bf.SimulatedGPU("24MiB")
    session = TrialSession(model, BatchSource(data), make_step(), resolve_optimizer(optimizer, model), device)
    with session:
        log = session.record_allocations()
        assert log is not None and log.unsuitable is None, log and log.unsuitable
        for size in (2, 3, 17, 64, 257, 1000):
            replay = log.replay(size, device.capacity_bytes)
            trial = session.run(size)
            assert trial.fits == (not replay.overflows), (name, size)
            if trial.fits:
                assert (replay.peak, replay.peak_reserved) == (trial.peak_bytes, trial.peak_reserved_bytes), (name, size)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # state restored
    assert device.memory_allocated() == 0  # the recording charged nothing to the device
