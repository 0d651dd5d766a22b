"""The confirmation run (batchfinder/engine/confirmation.py): after a search, steps at the recommended size with the
allocator's cache kept; the recommendation lowered by the safety factor again while they run out of memory, at most
three sizes; the recorded trial replayed instead of run where the guided mode's prediction was confirmed."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.engine.confirmation import confirm
from batchfinder.engine.options import SearchOptions
from batchfinder.result import SearchResult, Trial
from batchfinder.search.strategies import StopReason
from tests.helpers import assert_unchanged, snapshot

MiB = 2**20


class _Session:
    """A trial session whose trials fit up to ``largest`` samples; it remembers what it was asked to run."""

    def __init__(self, largest: int) -> None:
        self.largest = largest
        self.runs: list[tuple[int, int | None, Any]] = []

    def run(self, batch_size: int, *, phase: str = "train", steps: int | None = None, host_batches: Any = None) -> Trial:
        self.runs.append((batch_size, steps, host_batches))
        fits = batch_size <= self.largest
        return Trial(batch_size=batch_size, fits=fits, peak_bytes=1000 * batch_size,
                     seconds_per_step=0.01 if fits else None, steps=steps if fits else 1,
                     error=None if fits else "CUDA out of memory. Tried to allocate 2.00 MiB.")


class _FixedSize:
    varies = False  # every batch of a size is alike: the confirmation repeats one


class _Strategy:
    def __init__(self, replay: tuple[bool, int, int, str] | None = None) -> None:
        self.replay = replay
        self.asked: list[int] = []

    def replay_trial(self, size: int) -> tuple[bool, int, int, str] | None:
        self.asked.append(size)
        return self.replay


def _result(batch_size: int = 100) -> SearchResult:
    trial = Trial(batch_size=125, fits=True, peak_bytes=125_000, seconds_per_step=0.01, steps=2, baseline_bytes=4096)
    return SearchResult(max_batch_size=125, batch_size=batch_size, trials=[trial], stop_reason=StopReason.BRACKET_CLOSED)


def test_a_size_that_holds_is_kept(caplog):
    session, result = _Session(largest=125), _result()
    with caplog.at_level(logging.WARNING, logger="batchfinder"):
        confirm(session, _FixedSize(), result, SearchOptions(confirm_steps=5), None, _Strategy())
    assert session.runs == [(100, 5, None)]  # one trial of confirm_steps steps at the recommended size
    assert result.batch_size == result.micro_batch_size == 100  # nothing lowered
    assert [t.fits for t in result.confirmations] == [True] and caplog.text == ""


def test_a_size_that_does_not_hold_is_lowered_by_the_safety_factor_until_one_does(caplog):
    session, result = _Session(largest=70), _result()
    with caplog.at_level(logging.WARNING, logger="batchfinder"):
        confirm(session, _FixedSize(), result, SearchOptions(confirm_steps=5), None, _Strategy())
    assert [size for size, _, _ in session.runs] == [100, 80, 64]  # x0.8 each time
    assert [t.fits for t in result.confirmations] == [False, False, True]
    assert result.batch_size == result.micro_batch_size == 64
    assert "batch size 100 ran out of memory when confirmed" in caplog.text and "recommending 64" in caplog.text


def test_multiple_of_is_kept_when_lowering():
    session, result = _Session(largest=70), _result(96)
    confirm(session, _FixedSize(), result, SearchOptions(confirm_steps=5, multiple_of=32), None, _Strategy())
    assert [size for size, _, _ in session.runs] == [96, 64]  # 0.8 x 96 = 76.8, down to a multiple of 32
    assert result.batch_size == 64


def test_three_sizes_that_do_not_hold_end_the_search():
    session, result = _Session(largest=10), _result()
    with pytest.raises(bf.SearchIncompleteError, match=r"recommended batch size 100 and 2 smaller one\(s\) ran out of "
                                                       r"memory when confirmed over 5 steps"):
        confirm(session, _FixedSize(), result, SearchOptions(confirm_steps=5), None, _Strategy())
    assert [size for size, _, _ in session.runs] == [100, 80, 64]
    assert result.batch_size == 100  # not lowered to a size that did not hold either


def test_a_size_that_cannot_be_lowered_ends_the_search_at_once():
    session, result = _Session(largest=0), _result(1)
    with pytest.raises(bf.SearchIncompleteError, match="recommended batch size 1 and 0 smaller one"):
        confirm(session, _FixedSize(), result, SearchOptions(confirm_steps=5), None, _Strategy())
    assert len(session.runs) == 1


def test_a_confirmed_prediction_is_replayed_not_run():
    session, result = _Session(largest=125), _result()
    strategy = _Strategy(replay=(True, 90_000, 2 * MiB, "backward"))
    confirm(session, _FixedSize(), result, SearchOptions(confirm_steps=2), None, strategy)  # as many steps as a trial
    assert session.runs == [] and strategy.asked == [100]
    (replayed,) = result.confirmations
    assert replayed.replayed and replayed.fits and replayed.steps == 2
    assert (replayed.peak_bytes, replayed.peak_reserved_bytes, replayed.baseline_bytes) == (90_000, 2 * MiB, 4096)
    more_steps = _result()
    confirm(session, _FixedSize(), more_steps, SearchOptions(confirm_steps=3), None, strategy)  # more than a trial
    assert session.runs == [(100, 3, None)] and not more_steps.confirmations[0].replayed


def test_a_confirmation_run_reports_its_reserved_peak_and_lowers_a_size_that_does_not_hold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    data = TensorDataset(torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,)))
    gpu = bf.SimulatedGPU("32MiB", allocator="caching")
    result = bf.find_batch_size(model, data, device=gpu, confirm_steps=5)
    (confirmation,) = result.confirmations
    assert confirmation.fits and confirmation.steps == 5 and confirmation.batch_size == result.batch_size
    assert result.confirmed_reserved_fraction == confirmation.peak_reserved_bytes / (32 * MiB) <= 1
    assert "confirmed: 5 steps at" in str(result) and result.as_dict()["confirmations"][0]["steps"] == 5

    # Memory that grows from step to step (a cache the step keeps): the trials' 2 steps fit, 6 steps do not.
    held: list[tuple[torch.Tensor, torch.Tensor]] = []

    def growing(m: nn.Module, batch: object) -> torch.Tensor:
        x, y = batch  # type: ignore[misc]
        if held and held[0][0] is not x:  # a new trial (a new batch): what the last one held goes
            held.clear()
        held.append((x, torch.zeros(len(x), 512)))  # 2 KiB per sample and step, kept for the rest of the trial
        return nn.functional.cross_entropy(m(x), y)

    lowered = bf.find_batch_size(model, data, device=bf.SimulatedGPU("32MiB", allocator="caching"), step_fn=growing,
                                 confirm_steps=4)
    assert len(lowered.confirmations) >= 2 and not lowered.confirmations[0].fits and lowered.confirmations[-1].fits
    assert lowered.batch_size == lowered.confirmations[-1].batch_size < lowered.confirmations[0].batch_size
    assert "lowered" in str(lowered)


def test_memory_that_grows_at_every_size_ends_the_search_with_the_users_state_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = TensorDataset(torch.randn(512, 16), torch.randint(0, 4, (512,)))
    before = snapshot(model)
    held: list[tuple[torch.Tensor, torch.Tensor]] = []

    def growing(m: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        if held and held[0][0] is not x:  # a new trial (a new batch): what the last one held goes
            held.clear()
        held.append((x, torch.zeros(64 * 1024)))  # 256 KiB per step whatever the batch size
        return nn.functional.cross_entropy(m(x), y)

    with pytest.raises(bf.SearchIncompleteError, match="and 2 smaller one.s. ran out of memory when confirmed over 60"):
        bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB", allocator="ideal"), step_fn=growing,
                           confirm_steps=60)
    held.clear()
    assert_unchanged(before, model)


def test_no_confirmation_without_confirm_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = TensorDataset(torch.randn(512, 16), torch.randint(0, 4, (512,)))
    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"), confirm_steps=0)
    assert result.confirmations == [] and "confirmed:" not in str(result)
