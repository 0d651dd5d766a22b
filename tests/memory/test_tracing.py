"""Traces under fake tensors leave nothing behind, and a sample of the wrong shape gives batchfinder's one clear
error without torch's fake-tensor traceback log.

Every fake-tensor trace is freed when the call returns. Before the fix, the ledger of each trace was held by
``weakref.finalize``'s process-wide registry (it watches the storages it charged) and held, through its ``on_peak``
callback, the trace's recorder, fake parameters, batch, optimizer state and fake mode: about 7 fake modes and 0.3 MiB
more per guided search of the MNIST MLP, for ever.
"""

from __future__ import annotations

import logging
import threading
import weakref

import pytest
import torch

import batchfinder as bf
import batchfinder.memory.tracing
from batchfinder import zoo
from batchfinder.memory.tracing import TORCH_FAKE_TENSOR_LOGGERS, FakeTrainer, quiet_fake_tensor_logs
from tests.helpers import alive, small_mlp, three_guided_searches

FAKE_LOGGER = "torch._subclasses.fake_tensor"


# -- every trace is freed ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_modes(monkeypatch):
    """Weak references to every fake-tensor mode the traces create."""
    created: list[weakref.ref] = []
    make = batchfinder.memory.tracing._new_fake_mode

    def recording() -> object:
        mode = make()
        created.append(weakref.ref(mode))
        return mode

    monkeypatch.setattr(batchfinder.memory.tracing, "_new_fake_mode", recording)
    return created


def test_guided_search_frees_every_trace(fake_modes, monkeypatch):
    from batchfinder.engine.trial import TrialSession

    monkeypatch.setattr(TrialSession, "record_allocations", lambda self, sizes=(2, 3): None)  # trace instead
    three_guided_searches()
    assert len(fake_modes) >= 3  # the guided search traced (one recording each, replayed at every size)
    assert alive(fake_modes) == 0


def test_estimates_and_predictions_free_every_trace(fake_modes):
    model = zoo.mnist_mlp()
    bf.estimate_memory(model, (1, 28, 28), 256)
    bf.predict_max_batch_size(model, (1, 28, 28), capacity="64MiB")
    with pytest.raises(ValueError):
        bf.estimate_memory(model, (torch.zeros(3, 32, 32), 1), 16)  # a failed trace too
    assert len(fake_modes) >= 4
    assert alive(fake_modes) == 0


def test_a_trace_holds_nothing_once_done(fake_modes):
    """The Trace a FakeTrainer returns holds numbers only: the fake mode and the ledger go when the trace ends."""
    from batchfinder.training.optimizers import resolve_optimizer
    from batchfinder.training.steps import make_step

    model = small_mlp()
    trainer = FakeTrainer(model, (torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)), resolve_optimizer(None, model), make_step(None, None))
    trace = trainer.trace(32)
    assert trace.peak > 0 and sum(trace.at_peak.values()) == trace.peak
    assert len(fake_modes) == 1 and alive(fake_modes) == 0


# -- torch's fake-tensor logs are quiet while batchfinder traces -----------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def torch_fake_records():
    """Every record torch's fake-tensor logger lets through (it does not propagate, so caplog would not see it)."""
    handler = _Records()
    fake_logger = logging.getLogger(FAKE_LOGGER)
    fake_logger.addHandler(handler)
    yield handler.records
    fake_logger.removeHandler(handler)


def _logger_state() -> list[tuple[int, list[logging.Filter], bool]]:
    return [(logging.getLogger(n).level, list(logging.getLogger(n).filters), logging.getLogger(n).propagate) for n in TORCH_FAKE_TENSOR_LOGGERS]


@pytest.mark.parametrize(
    "sample",
    [(3, 32, 32), (torch.zeros(3, 32, 32), 1)],
    ids=["shape (forward on fake tensors)", "dataset item (training step on fake tensors)"],
)
def test_wrong_shape_gives_only_batchfinders_error(capfd, caplog, torch_fake_records, sample):
    before = _logger_state()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError, match="sample"):
        bf.estimate_memory(zoo.mnist_mlp(), sample, 64)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # torch printed 18 lines of traceback here
    assert torch_fake_records == []
    assert [r for r in caplog.records if not r.name.startswith("batchfinder")] == []
    assert _logger_state() == before  # the loggers are as they were


def test_only_the_tracing_thread_is_quiet_and_only_while_it_traces(torch_fake_records):
    fake_logger = logging.getLogger(FAKE_LOGGER)
    other = threading.Thread(target=lambda: fake_logger.error("from another thread"))
    with quiet_fake_tensor_logs() as dropped:
        fake_logger.error("from the tracing thread")
        other.start()
        other.join()
    fake_logger.error("after the trace")
    assert [r.getMessage() for r in torch_fake_records] == ["from another thread", "after the trace"]
    assert dropped.dropped == 1


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0].mean(1)


@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
def test_an_inference_prediction_says_which_kernel_models_applied_as_a_training_one_does(kernels):
    Attention = _Attention
    torch.manual_seed(0)
    estimate = bf.estimate_memory(Attention(), (24, 32), 8, train=False, kernels=kernels)
    prediction = bf.predict_max_batch_size(Attention(), (24, 32), capacity="8MiB", train=False, kernels=kernels)
    assert prediction.kernels and prediction.kernels == estimate.kernels
    assert ("memory-efficient (CUDA)" if kernels == "cuda" else "the CPU's") in prediction.kernels[0]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
def test_an_inference_estimate_is_the_simulated_inference_trial_to_the_byte(precision, kernels):
    torch.manual_seed(0)
    model = _Attention()
    data = [(torch.randn(24, 32), torch.tensor(1)) for _ in range(40)]
    for size in (5, 33):
        estimate = bf.estimate_memory(model, (24, 32), size, train=False, kernels=kernels, precision=precision)
        trial = bf.try_batch_size(model, data, size, device=bf.SimulatedGPU("64MiB", kernels=kernels), train=False,
                                  precision=precision)
        assert (estimate.peak, estimate.peak_reserved) == (trial.peak_bytes, trial.peak_reserved_bytes), size
