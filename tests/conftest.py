"""Fixtures for every test: one intra-op thread, and the ``case`` fixture over the four model shapes.

The models, data sets and state comparison the tests share are in :mod:`tests.helpers`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from .helpers import Case, make_case


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Any:
    """Small ops on a busy 2-core machine run ~10x faster on one thread than on two competing ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["mlp", "cnn", "dict", "frozen"])
def case(request: pytest.FixtureRequest) -> Case:
    return make_case(request.param)
