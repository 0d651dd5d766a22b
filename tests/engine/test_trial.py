"""The trial runner (batchfinder/engine/trial.py): real training steps at one batch size, measured; an out-of-memory
error ends a trial as "does not fit" and is recovered from, any other error propagates with its own type; the
user's state is restored between trials, also the state a front end adds (a gradient scaler); steps skipped by a
gradient scaler are followed until the optimizer has its state; activation checkpointing as people train with it."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.devices.cuda import CudaDevice
from batchfinder.engine.options import SearchOptions
from batchfinder.engine.run import search
from batchfinder.engine.trial import TrialSession
from batchfinder.engine.workload import Workload
from batchfinder.memory.accounting import round_allocation
from batchfinder.search.checks import MIN_STEPS_PER_TRIAL
from batchfinder.training.batching import BatchSource
from batchfinder.training.optimizers import resolve_optimizer
from batchfinder.training.state import AttributeSnapshot
from batchfinder.training.steps import make_step
from tests.helpers import Deep, assert_unchanged, classification_data, requires_cuda, snapshot


def _data(n: int = 4096) -> TensorDataset:
    return classification_data(n, (64,), 10)


def _small() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)), classification_data(512, (32,), 4)


def _session(model: nn.Module, data: Any, device: bf.SimulatedGPU, step: Any = None, **kwargs: Any) -> TrialSession:
    return TrialSession(model, BatchSource(data), make_step(step_fn=step), resolve_optimizer(torch.optim.SGD, model),
                        device, **kwargs)


class Boom(Exception):
    """An error of the user's own step."""


# -- one trial: what it measures, how it fails, what it leaves ----------------------------------------------------
def test_a_trial_that_fits_records_its_peak_steps_and_time_and_restores_the_weights():
    model, data = _small()
    before = snapshot(model)
    device = bf.SimulatedGPU("64MiB", allocator="ideal")
    parameters = sum(round_allocation(p.numel() * 4) for p in model.parameters())
    with _session(model, data, device) as session:
        small = session.run(16)
        assert small.fits and small.error is None and small.batch_size == 16
        assert small.steps == MIN_STEPS_PER_TRIAL == 2
        assert small.seconds_per_step is not None and small.seconds_per_step > 0
        assert small.baseline_bytes == parameters  # the resident model (SGD keeps no state)
        assert small.peak_bytes > small.baseline_bytes and small.peak_reserved_bytes == small.peak_bytes  # no cache
        assert small.leaked_bytes == 0 and device.memory_allocated() == parameters
        assert_unchanged(before, model)  # the trial's SGD steps were undone
        large = session.run(256, steps=3)
        assert large.fits and large.steps == 3 and large.peak_bytes > small.peak_bytes  # more samples, more memory
    assert device.memory_allocated() == 0  # the model left the device with the session
    assert_unchanged(before, model)


def test_an_out_of_memory_trial_does_not_fit_says_why_and_leaves_nothing_allocated():
    model, data = _small()
    before = snapshot(model)
    device = bf.SimulatedGPU("256KiB", allocator="ideal")
    with _session(model, data, device) as session:
        failed = session.run(512)
        assert not failed.fits and failed.seconds_per_step is None
        assert failed.error is not None and failed.error.startswith("CUDA out of memory. Tried to allocate")
        assert "\n" not in failed.error and failed.requested_bytes  # the first line, which says how much it asked for
        assert failed.peak_bytes + failed.requested_bytes > device.capacity_bytes
        assert failed.leaked_bytes == 0 and device.memory_allocated() == failed.baseline_bytes  # recovered
        assert session.run(8).fits  # and the next trial runs as if nothing had happened
    assert device.memory_allocated() == 0
    assert_unchanged(before, model)


def test_an_error_that_is_not_out_of_memory_propagates_with_its_own_type():
    model, data = _small()
    before = snapshot(model)
    device = bf.SimulatedGPU("64MiB", allocator="ideal")

    def step(m: nn.Module, batch: Any) -> torch.Tensor:
        if len(batch[0]) > 2:  # the model check on entry runs at a batch of 2
            raise Boom("a bug in the step")
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    with _session(model, data, device, step=step) as session:
        with pytest.raises(Boom, match="a bug in the step"):
            session.run(32)
    assert device.memory_allocated() == 0
    assert_unchanged(before, model)


def test_a_session_is_a_context_manager_and_knows_its_phases():
    model, data = _small()
    session = _session(model, data, bf.SimulatedGPU("64MiB"))
    with pytest.raises(RuntimeError, match="must be used as a context manager"):
        session.run(4)
    with session, pytest.raises(ValueError, match="phase must be 'train' or 'eval'"):
        session.run(4, phase="test")
    with pytest.raises(ValueError, match="needs a training step"):
        TrialSession(model, BatchSource(data), None, None, bf.SimulatedGPU("64MiB"))


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_evaluation_batches_are_cast_to_a_true_precision_as_training_batches_are(precision):
    model, data = _small()
    before = snapshot(model)
    forward = lambda module, batch: module(batch[0])  # noqa: E731
    device = bf.SimulatedGPU("64MiB")
    inference = TrialSession(model, BatchSource(data), None, None, device, eval_step=forward, precision=precision,
                             inference=True)
    with inference:  # the probe's evaluation batch of 2, then the trial's
        assert inference.run(16, phase="eval").fits
    trains = _session(model, data, device, eval_step=forward, eval_source=BatchSource(data), precision=precision)
    with trains:  # the training step at 2 that an evaluation trial of a training session runs first
        assert trains.run(16, phase="eval").fits
    assert_unchanged(before, model)


def test_trials_record_the_reserved_peak_and_reports_show_it():
    class CachingGPU(bf.SimulatedGPU):
        """A simulated GPU whose allocator keeps 2 MiB cached beyond what tensors hold."""

        def max_memory_reserved(self) -> int:
            return self.max_memory_allocated() + 2 * 2**20

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    trial = bf.try_batch_size(model, data, 32, device=CachingGPU("8MiB", allocator="ideal"))
    assert trial.fits and trial.peak_reserved_bytes == trial.peak_bytes + 2 * 2**20
    plain = bf.try_batch_size(model, data, 32, device=bf.SimulatedGPU("8MiB", allocator="ideal"))
    assert plain.peak_reserved_bytes == plain.peak_bytes  # no cache: reserved is allocated
    result = bf.find_batch_size(model, data, device=CachingGPU("8MiB", allocator="ideal"), max_trials=2)
    assert "reserved" in result.table().splitlines()[0]
    assert result.as_dict()["trials"][0]["peak_reserved_bytes"] == result.trials[0].peak_reserved_bytes


# -- state a front end adds: a gradient scaler between trials ------------------------------------------------------
def _scaled_workload(extra_state: list[Any]) -> tuple[Workload, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    data = TensorDataset(torch.randn(256, 16), torch.randint(0, 4, (256,)))
    spec = resolve_optimizer(torch.optim.Adam, model)
    optimizer = spec.create()
    scaler = torch.amp.GradScaler("cpu")

    def train_step(m: nn.Module, batch: Any, index: int) -> None:
        loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # e.g. before gradient clipping
        torch.empty(len(batch[0]) * 4096, dtype=torch.uint8)  # memory after unscale_: large batches run out here
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    workload = Workload(model, BatchSource(data), None, spec, train_step=train_step, extra_optimizers=[optimizer],
                        extra_state=[lambda: AttributeSnapshot(scaler, deep=True), *extra_state])
    return workload, scaler


def test_a_trial_that_runs_out_of_memory_after_unscale_does_not_break_the_next_one():
    workload, scaler = _scaled_workload([])
    before = {k: v for k, v in vars(scaler).items() if k != "_per_optimizer_states"}
    result = search(workload, bf.SimulatedGPU("1MiB", allocator="ideal"), SearchOptions())
    assert result.num_ooms >= 1 and result.trials[-1].fits is not None  # every trial after an OOM ran
    assert {k: v for k, v in vars(scaler).items() if k != "_per_optimizer_states"}.keys() == before.keys()
    assert not scaler._per_optimizer_states  # as before the search


def test_without_resetting_the_scaler_the_next_trial_would_fail():
    workload, _ = _scaled_workload([])
    workload.extra_state = []  # what Lightning's callback did before: the scaler's stage survives a failed trial
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        search(workload, bf.SimulatedGPU("1MiB", allocator="ideal"), SearchOptions())


# -- steps skipped by a gradient scaler ---------------------------------------------------------------------------
def _trial_with_skipped_steps(skipped: int) -> bf.Trial:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    data = TensorDataset(torch.randn(64, 64), torch.randint(0, 4, (64,)))
    spec = resolve_optimizer(torch.optim.Adam, model)
    optimizer = spec.create()
    calls: list[object] = []

    def train_step(m: nn.Module, batch: Any, index: int) -> None:
        calls.append(batch)
        nn.functional.cross_entropy(m(batch[0]), batch[1]).backward()
        if sum(b is batch for b in calls) > skipped:  # as a GradScaler skips steps whose gradients hold inf
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    workload = Workload(model, BatchSource(data), None, spec, train_step=train_step, extra_optimizers=[optimizer])
    # The CPU's per-tensor Adam step, whose state creation is this model's peak: a trial that skipped steps reaches it
    # too. (CUDA's foreach step peaks lower here, and the peak is then the second step's backward, with the state.)
    device = bf.SimulatedGPU("64MiB", allocator="ideal", kernels="cpu")
    result = search(workload, device, SearchOptions(init_batch_size=64))
    return result.trials[0]


def test_a_trial_runs_on_until_skipped_steps_have_created_the_optimizers_state(caplog):
    normal = _trial_with_skipped_steps(0)
    skipped = _trial_with_skipped_steps(3)  # both of a 2-step trial's steps would be skipped: no Adam state
    assert normal.steps == 2
    assert skipped.steps == 4  # steps went on until a step was taken and Adam's moments existed
    assert skipped.peak_bytes == normal.peak_bytes  # the optimizer state's memory is measured after all
    never = _trial_with_skipped_steps(100)
    assert never.steps == 2 + 8 and "still has no state" in caplog.text


# -- the same on a real GPU, with float16 autocast -----------------------------------------------------------------
def _fp16_workload(
    samples: int, *, init_scale: float = 2.0**16, backoff_factor: float = 0.5, clip_then_allocate: bool = False
) -> tuple[Workload, Any]:
    """An fp16 training step with a GradScaler; with ``clip_then_allocate`` it unscales and clips, then allocates
    64 KiB per sample (so large batches run out of memory after ``unscale_``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10)).cuda()
    spec = resolve_optimizer(torch.optim.Adam, model)
    optimizer = spec.create()
    scaler = torch.amp.GradScaler("cuda", init_scale=init_scale, backoff_factor=backoff_factor)

    def train_step(m: nn.Module, batch: Any, index: int) -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
        scaler.scale(loss).backward()
        if clip_then_allocate:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            torch.empty(len(batch[0]) * 64 * 1024, dtype=torch.uint8, device="cuda")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    data = TensorDataset(torch.randn(samples, 64), torch.randint(0, 10, (samples,)))
    workload = Workload(model, BatchSource(data), None, spec, train_step=train_step, extra_optimizers=[optimizer],
                        extra_state=[lambda: AttributeSnapshot(scaler, deep=True)])
    return workload, optimizer


@pytest.mark.cuda
@requires_cuda
def test_a_gradient_scaler_stage_does_not_survive_a_failed_trial():
    workload, _ = _fp16_workload(8192, clip_then_allocate=True)
    result = search(workload, CudaDevice("cuda", memory_limit="256MiB"), SearchOptions())
    assert result.num_ooms >= 1 and result.max_batch_size > 0


@pytest.mark.cuda
@requires_cuda
def test_skipped_steps_are_followed_until_the_optimizer_has_state(caplog):
    # At 2**40 the first backward overflows float16 for certain (the logits' gradient alone is 2**40 / 256 per unit
    # of probability, float16 ends at 65504): that step is skipped; the scale then drops to 2**24, then 2**8, where
    # steps go through. (At 2**18 this MLP's gradients stay finite, and nothing was skipped.)
    workload, optimizer = _fp16_workload(256, init_scale=2.0**40, backoff_factor=2.0**-16)
    result = search(workload, CudaDevice("cuda"), SearchOptions(init_batch_size=256, confirm_steps=0))
    first = result.trials[0]
    assert first.fits and 2 < first.steps <= 10  # steps went on past the skipped ones
    assert "still has no state" not in caplog.text  # until a step was taken and Adam's state existed
    assert not optimizer.state  # and the user's optimizer is as it was


# -- activation checkpointing, and a backward pass that ran out of memory ------------------------------------------
def test_non_reentrant_checkpointing_fits_more_and_is_estimated_exactly():
    torch.manual_seed(0)
    data = _data(16_384)
    plain = bf.find_batch_size(Deep(), data, device=bf.SimulatedGPU("32MiB", allocator="ideal"), confirm_steps=0)
    torch.manual_seed(0)
    checkpointed = Deep("non-reentrant")
    result = bf.find_batch_size(checkpointed, data, device=bf.SimulatedGPU("32MiB", allocator="ideal"), confirm_steps=0)
    assert result.max_batch_size > 2 * plain.max_batch_size and not result.notes
    trial = bf.try_batch_size(checkpointed, data, 1000, device=bf.SimulatedGPU("1GiB", allocator="ideal"))
    assert trial.peak_bytes == bf.estimate_memory(checkpointed, data, 1000).peak


@pytest.mark.parametrize("mode", ["binsearch", "guided"])  # guided: the model check is the recorded trial
def test_reentrant_checkpointing_that_computes_no_gradients_is_warned_about(caplog, mode):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="batchfinder"):
        result = bf.find_batch_size(
            Deep("reentrant"), _data(), device=bf.SimulatedGPU("16MiB"), confirm_steps=0, mode=mode
        )
    assert any("computes no gradients" in note for note in result.notes)
    assert any("use_reentrant=False" in record.getMessage() for record in caplog.records)


def test_a_backward_pass_that_ran_out_of_memory_does_not_keep_its_activations():
    """resnet50 at 16 runs out of memory inside loss.backward() on 1.5 GiB: the autograd engine keeps that graph (1.27
    GB of activations) until the next backward on its thread, so without a flush every later trial failed too."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    data = TensorDataset(torch.randn(16, 3, 224, 224), torch.randint(0, 10, (16,)))
    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("1536MiB"), confirm_steps=0, max_trials=2)
    first, second = result.trials
    assert (first.batch_size, first.fits, second.batch_size, second.fits) == (16, False, 8, True)
    assert first.leaked_bytes == 0
