"""Device resolution (batchfinder/devices/resolve.py): the "sim:CAPACITY[:ALLOCATOR]" strings, and ``device=None``,
which follows the GPU the model is on."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

import batchfinder as bf
from batchfinder.devices.cuda import CudaDevice
from batchfinder.devices.resolve import resolve_device
from tests.cuda_double import CudaDouble
from tests.helpers import batchnorm_mlp, classification_data, requires_cuda

MiB = 2**20


def test_the_device_string_names_the_allocator():
    assert resolve_device("sim:64MiB").allocator == "caching"
    ideal = resolve_device("sim:64MiB:ideal")
    assert ideal.allocator == "ideal" and ideal.capacity_bytes == 64 * MiB
    with pytest.raises(ValueError, match="allocator='fast'"):
        resolve_device("sim:64MiB:fast")


def test_without_a_device_the_search_uses_the_gpu_the_model_is_on(monkeypatch):
    CudaDouble(monkeypatch, count=2)

    class OnSecondGpu:
        def parameters(self) -> list[Any]:
            return [types.SimpleNamespace(device=torch.device("cuda", 1))]

        def buffers(self) -> list[Any]:
            return []

    assert resolve_device(None, model=OnSecondGpu()).torch_device == torch.device("cuda", 1)  # type: ignore[arg-type]
    assert resolve_device(None).torch_device == torch.device("cuda", 0)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_without_a_device_the_search_runs_on_the_gpu_the_model_is_on():
    model = batchnorm_mlp().to("cuda:1")
    torch.cuda.set_device(0)
    result = bf.find_batch_size(model, classification_data(20_000, (1, 8, 8), 10), memory_limit="256MiB", max_trials=3)
    assert result.device == CudaDevice("cuda:1", memory_limit="256MiB").name
    assert torch.cuda.max_memory_allocated(1) > 0
