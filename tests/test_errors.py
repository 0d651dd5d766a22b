"""The error contract (batchfinder/errors.py): bad input gets a clear error and changes nothing; failures and
interrupts leave no trace; the one helper for the first line of an exception's message."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import batchfinder as bf
import batchfinder.cli
import batchfinder.loading
import batchfinder.memory.estimate
import batchfinder.memory.tracing
from batchfinder.errors import exception_first_line
from tests.helpers import assert_unchanged, make_case, snapshot

CAPACITY = "3.1MiB"


@pytest.fixture
def mlp():
    case = make_case("mlp")
    return case.model, case.dataset


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"safety": 0}, ValueError, r"safety=0 must be a number in \(0, 1\]"),
        ({"safety": 1.2}, ValueError, "safety=1.2"),
        ({"safety": -0.5}, ValueError, "safety"),
        ({"safety": "0.8"}, ValueError, "safety"),
        ({"init_batch_size": 0}, ValueError, "init_batch_size=0 must be at least 1"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size=0 must be at least 1"),
        ({"init_batch_size": 64, "max_batch_size": 32}, ValueError, "init_batch_size=64 is larger than max_batch_size=32"),
        ({"init_batch_size": 2.5}, TypeError, "init_batch_size must be a whole number"),
        ({"multiple_of": 0}, ValueError, "multiple_of=0 must be at least 1"),
        ({"steps_per_trial": 1}, ValueError, "at least 2"),
        ({"max_trials": 0}, ValueError, "max_trials"),
        ({"time_budget": -1}, ValueError, "time_budget"),
        ({"mode": "fastest"}, ValueError, "mode='fastest' is not a search mode"),
        ({"device": "sim:plenty"}, ValueError, "does not parse as a memory size"),
        ({"device": "cpu"}, ValueError, "SimulatedGPU"),
        ({"device": 3}, TypeError, "device must be"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be"),
        ({"optimizer": nn.Linear}, TypeError, "not a subclass of torch.optim.Optimizer"),
        ({"progress": "yes"}, TypeError, "progress"),
        ({"loss_fn": lambda o, t: o.sum(), "step_fn": lambda m, b: m(b[0]).sum()}, ValueError, "either step_fn"),
    ],
)
def test_bad_arguments_are_rejected_before_anything_runs(mlp, kwargs, error, match):
    model, data = mlp
    before = snapshot(model)
    kwargs.setdefault("device", bf.SimulatedGPU(CAPACITY))
    with pytest.raises(error, match=match):
        bf.find_batch_size(model, data, **kwargs)
    assert_unchanged(before, model)


def test_no_device_and_no_cuda_points_to_the_simulated_gpu(mlp):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the default device is valid")
    with pytest.raises(ValueError, match=r"no CUDA GPU is available.*SimulatedGPU\('16GiB'\)"):
        bf.find_batch_size(*mlp)


def test_empty_dataset(mlp):
    model, _ = mlp
    with pytest.raises(ValueError, match="dataset is empty"):
        bf.find_batch_size(model, TensorDataset(torch.empty(0, 64)), device=bf.SimulatedGPU(CAPACITY))


def test_unsupported_sample_types(mlp):
    model, _ = mlp
    with pytest.raises(TypeError, match="unsupported sample type str"):
        bf.find_batch_size(model, ["a", "b"], device=bf.SimulatedGPU(CAPACITY))
    with pytest.raises(TypeError, match="first element is int, not a tensor"):
        bf.find_batch_size(model, [(3, 4)], device=bf.SimulatedGPU(CAPACITY))

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(64)

    with pytest.raises(TypeError, match="IterableDataset"):
        bf.find_batch_size(model, Stream(), device=bf.SimulatedGPU(CAPACITY))
    with pytest.raises(TypeError, match="map-style"):
        bf.find_batch_size(model, 42, device=bf.SimulatedGPU(CAPACITY))


def test_model_that_does_not_accept_the_batch(mlp):
    model, _ = mlp
    wrong = TensorDataset(torch.randn(100, 1, 7, 7), torch.randint(0, 10, (100,)))
    before = snapshot(model)
    for mode in ("binsearch", "guided"):  # guided checks the model with a recorded trial, then with a plain step
        with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied(.|\n)*built from the dataset: \(Tensor\[2, 1, 7, 7\] float32"):
            bf.find_batch_size(model, wrong, device=bf.SimulatedGPU(CAPACITY), mode=mode)
        assert_unchanged(before, model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, not function"):
        bf.find_batch_size(lambda x: x, wrong, device=bf.SimulatedGPU(CAPACITY))
    with pytest.raises(TypeError, match="not a scalar loss"):
        bf.find_batch_size(model, wrong, device=bf.SimulatedGPU(CAPACITY), step_fn=lambda m, b: torch.ones(3, requires_grad=True))


def test_frozen_model_and_foreign_optimizer(mlp):
    model, data = mlp
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not the model's"):
        bf.find_batch_size(model, data, device=bf.SimulatedGPU(CAPACITY), optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        bf.find_batch_size(model, data, device=bf.SimulatedGPU(CAPACITY))


def test_lazy_modules_are_refused(mlp):
    _, data = mlp
    with pytest.raises(ValueError, match="lazy"):
        bf.find_batch_size(nn.Sequential(nn.Flatten(), nn.LazyLinear(10)), data, device=bf.SimulatedGPU(CAPACITY))


def test_batch_size_one_not_fitting_says_what_is_needed(mlp):
    model, data = mlp
    before = snapshot(model)
    gpu = bf.SimulatedGPU("90KiB", allocator="ideal")
    with pytest.raises(bf.NoBatchSizeFitsError) as info:
        bf.find_batch_size(model, data, device=gpu)
    error = info.value
    assert error.capacity_bytes == 90 * 1024
    assert error.needed_bytes > error.capacity_bytes
    assert "batch size 1 does not fit on SimulatedGPU(90.00 KiB, allocated bytes only)" in str(error)
    assert "the device has 90.00 KiB" in str(error)
    assert gpu.memory_allocated() == 0
    assert_unchanged(before, model)


def test_model_alone_not_fitting(mlp):
    model, data = mlp
    before = snapshot(model)
    gpu = bf.SimulatedGPU("10KiB", allocator="ideal")
    with pytest.raises(bf.NoBatchSizeFitsError, match="the model alone does not fit") as info:
        bf.find_batch_size(model, data, device=gpu)
    error = info.value
    # What the parameters and buffers take on the device: each storage rounded up to 512 B, as the allocator does.
    expected = sum(-(-t.untyped_storage().nbytes() // 512) * 512 for t in (*model.parameters(), *model.buffers()))
    assert error.needed_bytes == expected > error.capacity_bytes == 10 * 1024
    text = str(error)
    assert text.count("out of memory") + text.count("OutOfMemoryError") == 0  # one clear message, no OOM dump
    assert len(text.splitlines()) == 1 and "10.00 KiB" in text
    assert gpu.memory_allocated() == 0
    assert_unchanged(before, model)


def test_meta_device_model_is_refused_before_any_work(mlp):
    _, data = mlp
    with torch.device("meta"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
    gpu = bf.SimulatedGPU(CAPACITY)
    for call in (
        lambda: bf.find_batch_size(model, data, device=gpu),
        lambda: bf.try_batch_size(model, data, 4, device=gpu),
    ):
        with pytest.raises(ValueError, match=r"meta device .*to_empty.*estimate_memory") as info:
            call()
        assert "Cannot copy out of meta tensor" not in str(info.value)
    assert gpu.memory_allocated() == 0 and all(p.is_meta for p in model.parameters())
    # Materialised as the message says, the same model searches.
    model.to_empty(device="cpu")
    for p in model.parameters():
        nn.init.normal_(p)
    assert bf.find_batch_size(model, data, device=gpu, max_trials=3).max_batch_size >= 1


def test_initial_size_too_large_walks_down(mlp):
    model, data = mlp
    gpu = bf.SimulatedGPU(CAPACITY)
    reference = bf.find_batch_size(model, data, device=gpu)
    walked = bf.find_batch_size(model, data, device=gpu, init_batch_size=3000)
    assert walked.max_batch_size == reference.max_batch_size
    assert [t.batch_size for t in walked.trials[:2]] == [3000, 1500]
    assert not walked.trials[0].fits


def test_try_batch_size_checks_its_batch_size(mlp):
    model, data = mlp
    with pytest.raises(ValueError, match="larger than the dataset"):
        bf.try_batch_size(model, data, 10**6, device=bf.SimulatedGPU(CAPACITY))
    with pytest.raises(ValueError, match="batch_size=0"):
        bf.try_batch_size(model, data, 0, device=bf.SimulatedGPU(CAPACITY))


class Boom(Exception):
    pass


def _failing_step(after_calls: int, error: BaseException):
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        out = model(batch[0])
        loss = nn.functional.cross_entropy(out, batch[1])
        if calls["n"] > after_calls:
            raise error
        return loss

    return step


@pytest.mark.parametrize("after_calls", [3, 8])
def test_other_errors_propagate_with_their_own_type_after_restoring_state(mlp, after_calls):
    model, data = mlp
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(data.tensors[0][:4]).sum().backward()
    optimizer.step()
    before = snapshot(model, optimizer)
    gpu = bf.SimulatedGPU(CAPACITY)
    with pytest.raises(Boom) as info:
        bf.find_batch_size(model, data, device=gpu, optimizer=optimizer, step_fn=_failing_step(after_calls, Boom("custom")))
    assert info.traceback[-1].name == "step"  # the user's own traceback
    assert_unchanged(before, model, optimizer)
    del info  # the traceback keeps the failed step's tensors alive, as it would on a GPU
    gc.collect()
    assert gpu.memory_allocated() == 0


def test_keyboard_interrupt_mid_search_restores_everything(mlp):
    model, data = mlp
    model.eval()
    before = snapshot(model)
    gpu = bf.SimulatedGPU(CAPACITY)
    with pytest.raises(KeyboardInterrupt) as info:
        bf.find_batch_size(model, data, device=gpu, step_fn=_failing_step(6, KeyboardInterrupt()))
    assert_unchanged(before, model)
    del info
    gc.collect()
    assert gpu.memory_allocated() == 0


def test_fatal_cuda_errors_are_not_treated_as_out_of_memory(mlp):
    model, data = mlp
    error = RuntimeError(
        "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported at "
        "some other API call, so the stacktrace below might be incorrect.\nFor debugging consider passing "
        "CUDA_LAUNCH_BLOCKING=1.\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
    )
    # Raised from an out-of-memory error (as when recovery from an OOM runs into the poisoned context), so that
    # only recognising the fatal error, not the absence of an OOM message, stops it counting as "does not fit".
    error.__cause__ = RuntimeError(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.11 GiB of which 5.12 MiB "
        "is free. Including non-PyTorch memory, this process has 79.10 GiB memory in use."
    )
    assert bf.is_oom_error(error)
    with pytest.raises(RuntimeError, match="illegal memory access") as info:
        bf.find_batch_size(model, data, device=bf.SimulatedGPU(CAPACITY), step_fn=_failing_step(4, error))
    assert info.value is error  # re-raised as it is, not reported as a failed trial


def test_an_oom_looking_error_from_the_step_counts_as_does_not_fit(mlp):
    model, data = mlp

    def step(m, batch):
        if batch[0].shape[0] > 100:  # the message CUDA gives when cudaMalloc fails outside the caching allocator
            raise RuntimeError(
                "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, "
                "so the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1.\n"
                "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
            )
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("64MiB"), step_fn=step)
    assert result.max_batch_size == 100
    assert result.trial_for(100).fits and not result.trial_for(101).fits
    assert result.trial_for(101).error == "CUDA error: out of memory"  # the first line of the message


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.9])
def test_a_real_ctrl_c_at_any_moment_restores_everything(mlp, delay):
    import _thread
    import threading

    model, data = mlp
    bf.find_batch_size(model, data, device=bf.SimulatedGPU(CAPACITY), max_trials=2)  # first use imports torch's optimizers
    before = snapshot(model)
    timer = threading.Timer(delay, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(50):  # keep searching until the interrupt lands
                bf.find_batch_size(model, data, device=bf.SimulatedGPU(CAPACITY))
                if not timer.is_alive():
                    # Python prints and drops an exception raised inside a weakref finalizer (the memory ledger
                    # watches storages with them), so an interrupt that lands there is lost: interrupt again.
                    timer = threading.Timer(delay, _thread.interrupt_main)
                    timer.start()
    finally:
        timer.cancel()
    assert_unchanged(before, model)


# -- the first line of an exception's message ------------------------------------------------------------------------
class _BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB.\nGPU 0 has a total capacity of 8 GiB"), "CUDA out of memory. Tried to allocate 2.00 MiB."),
        (ValueError("\n\n  indented first line  \nsecond"), "indented first line"),
        (RuntimeError(b"bytes message\nmore"), "bytes message"),
        (RuntimeError(), ""),
        (RuntimeError(""), ""),
        (_BrokenStr("from args\nsecond"), "from args"),
        (KeyError("missing"), "missing"),
    ],
)
def test_first_line(exc: BaseException, expected: str) -> None:
    assert exception_first_line(exc) == expected


def test_the_library_uses_the_one_helper() -> None:
    for module in (batchfinder.memory.estimate, batchfinder.memory.tracing, batchfinder.loading):
        assert module.exception_first_line is exception_first_line, module.__name__
