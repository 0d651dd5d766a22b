"""A sample of the wrong shape gives batchfinder's one clear error, without torch's fake-tensor traceback log."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import batchfinder as bf
from batchfinder import zoo
from batchfinder.memory.tracing import TORCH_FAKE_TENSOR_LOGGERS, quiet_fake_tensor_logs

FAKE_LOGGER = "torch._subclasses.fake_tensor"


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
