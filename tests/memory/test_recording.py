"""The recorded trial (:mod:`batchfinder.memory.recording`, made by ``TrialSession.record_allocations``): one recording
on entry stands for a later one, none where it cannot stand for the trials, and none is kept after a search."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from tests.helpers import alive, three_guided_searches


def test_the_recording_made_as_the_model_check_on_entry_is_the_one_a_later_call_makes():
    from batchfinder.engine.trial import TrialSession
    from batchfinder.training.batching import BatchSource
    from batchfinder.training.optimizers import resolve_optimizer
    from batchfinder.training.steps import make_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 4))
    data = TensorDataset(torch.randn(500, 32), torch.randint(0, 4, (500,)))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    spec = resolve_optimizer(torch.optim.Adam, model)
    device = bf.SimulatedGPU("8MiB")
    with TrialSession(model, BatchSource(data), make_step(), spec, device, record_on_entry=True) as session:
        on_entry = session.record_allocations()  # handed over once
        later = session.record_allocations()  # recorded now
        assert on_entry is not None and later is not None and on_entry is not later
        for size in (2, 3, 40, 333):
            first, second = on_entry.replay(size, device.capacity_bytes), later.replay(size, device.capacity_bytes)
            assert (first.peak, first.peak_reserved) == (second.peak, second.peak_reserved)
            trial = session.run(size)
            assert (trial.peak_bytes, trial.peak_reserved_bytes) == (first.peak, first.peak_reserved)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert device.memory_allocated() == 0


def test_no_recording_where_it_cannot_stand_for_the_trials():
    from batchfinder.engine.trial import TrialSession
    from batchfinder.training.batching import BatchSource
    from batchfinder.training.optimizers import resolve_optimizer
    from batchfinder.training.steps import make_step

    model = nn.Sequential(nn.Linear(8, 4))
    data = TensorDataset(torch.randn(100, 8), torch.randint(0, 4, (100,)))
    spec = resolve_optimizer(torch.optim.SGD, model)
    with TrialSession(model, BatchSource(data), make_step(), spec, bf.SimulatedGPU("8MiB", allocator="ideal")) as session:
        assert session.record_allocations() is not None
    with TrialSession(model, BatchSource(data), make_step(), spec, bf.SimulatedGPU("8MiB"), precision="16-mixed") as session:
        assert session.record_allocations() is None  # a gradient scaler may skip steps
    tiny = TensorDataset(torch.randn(2, 8), torch.randint(0, 4, (2,)))
    with TrialSession(model, BatchSource(tiny), make_step(), spec, bf.SimulatedGPU("8MiB")) as session:
        assert session.record_allocations() is None  # fewer samples than the recording's second size


def test_guided_search_frees_every_recording(monkeypatch):
    import batchfinder.memory.recording

    ledgers: list[weakref.ref] = []

    class Watched(batchfinder.memory.recording.RecordingLedger):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            ledgers.append(weakref.ref(self))

    monkeypatch.setattr(batchfinder.memory.recording, "RecordingLedger", Watched)
    three_guided_searches()
    assert len(ledgers) == 3  # one recorded trial per search, replayed at every size
    assert alive(ledgers) == 0  # the model's parameters, charged to each, do not keep them alive
