"""is_oom_error (batchfinder/engine/oom.py) on real messages of every flavour, and on look-alikes that are not
out-of-memory errors; cuDNN's NOT_SUPPORTED, which means an unsupported configuration at a tiny batch and no room for
a workspace at a large one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder import is_oom_error
from batchfinder.engine.oom import is_fatal_device_error
from tests.helpers import classification_data, requires_cuda

REAL_OOM_MESSAGES = [
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.11 GiB of which 5.12 MiB is "
    "free. Including non-PyTorch memory, this process has 79.10 GiB memory in use. Of the allocated memory 78.45 GiB "
    "is allocated by PyTorch, and 160.25 MiB is reserved by PyTorch but unallocated. If reserved but unallocated "
    "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1.",
    "HIP out of memory. Tried to allocate 1.53 GiB. GPU 0 has a total capacity of 63.98 GiB of which 0 bytes is free.",
    "XPU out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.11 GiB total capacity; 13.52 GiB already allocated)",
    "MPS backend out of memory (MPS allocated: 18.12 GB, other allocations: 384.00 KB, max allowed: 18.13 GB). "
    "Tried to allocating 8.00 MB on private pool.",
    "Invalid buffer size: 12.50 GB",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "34359738368 bytes. Error code 12 (Cannot allocate memory)",
    "[enforce fail at ..\\c10\\core\\impl\\alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you tried "
    "to allocate 1073741824 bytes.",
    "level_zero backend failed with error: 39 (UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY)",
]

LOOK_ALIKES = [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered",
    "mat1 and mat2 shapes cannot be multiplied (64x784 and 128x10)",
    "out of range: index 12 is out of bounds",
    "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!",
    "memory format is not supported",
    "the process ran out of patience",
    "CUDA error: no kernel image is available for execution on the device",
]


@pytest.mark.parametrize("message", REAL_OOM_MESSAGES)
def test_real_out_of_memory_messages_are_recognised(message):
    assert is_oom_error(RuntimeError(message))


@pytest.mark.parametrize("message", LOOK_ALIKES)
def test_look_alikes_are_not_out_of_memory(message):
    assert not is_oom_error(RuntimeError(message))


def test_class_is_checked_first():
    assert is_oom_error(torch.OutOfMemoryError("anything at all"))
    assert is_oom_error(torch.cuda.OutOfMemoryError(""))


def test_follows_cause_and_context():
    try:
        try:
            raise RuntimeError(REAL_OOM_MESSAGES[0])
        except RuntimeError as inner:
            raise ValueError("step failed") from inner
    except ValueError as outer:
        assert is_oom_error(outer)
        assert not is_oom_error(ValueError("step failed"))  # it is the cause that makes it one
    try:
        try:
            torch.empty(1 << 62, dtype=torch.uint8)  # a real allocation failure (2**62 bytes: no host has that)
        except RuntimeError:
            raise KeyError("cleanup failed")  # implicit __context__
    except KeyError as outer:
        assert isinstance(outer.__context__, RuntimeError)
        assert is_oom_error(outer)
        assert not is_oom_error(KeyError("cleanup failed"))


def test_cyclic_chains_terminate():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_oom_error(a)


def test_args_that_are_not_a_single_string():
    assert is_oom_error(RuntimeError(b"CUDA out of memory. Tried to allocate 4.00 GiB"))
    assert is_oom_error(RuntimeError(7, "CUDA error: out of memory"))
    assert not is_oom_error(RuntimeError(7, None, {"code": 3}))
    assert not is_oom_error(RuntimeError())

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("broken __str__")

    assert not is_oom_error(Unprintable(object()))
    assert is_oom_error(Unprintable("CUBLAS_STATUS_ALLOC_FAILED"))


def test_interrupts_are_never_out_of_memory():
    assert not is_oom_error(KeyboardInterrupt())
    assert not is_oom_error(MemoryError("host"))


def test_fatal_device_errors():
    assert is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_fatal_device_error(RuntimeError(REAL_OOM_MESSAGES[0]))


# -- cuDNN's NOT_SUPPORTED ------------------------------------------------------------------------------------------
NOT_SUPPORTED = "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."


def test_cudnn_not_supported_at_a_tiny_batch_is_an_unsupported_configuration_not_oom():
    model = nn.Linear(8, 2)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))

    def always(m: nn.Module, batch: Any) -> torch.Tensor:
        raise RuntimeError(NOT_SUPPORTED)

    with pytest.raises(ValueError, match="unsupported layer configuration"):
        bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"), step_fn=always)


def test_cudnn_not_supported_at_a_large_batch_means_no_workspace_fits():
    model = nn.Linear(8, 2)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))

    def above_40(m: nn.Module, batch: Any) -> torch.Tensor:
        if len(batch[0]) > 40:
            raise RuntimeError(NOT_SUPPORTED)
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"), step_fn=above_40)
    assert result.max_batch_size == 40 and result.smallest_failure == 41


@pytest.mark.cuda
@requires_cuda
def test_cudnn_not_supported_at_a_tiny_batch_is_reported_on_a_gpu():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).cuda()

    def refused(m: nn.Module, batch: Any) -> torch.Tensor:
        m(batch[0])  # a real CUDA step, then what cuDNN raises for an unsupported configuration
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                           "non-contiguous input.")

    with pytest.raises(ValueError, match="unsupported layer configuration"):
        bf.find_batch_size(model, classification_data(20_000, (1, 8, 8), 10), device="cuda", step_fn=refused)
