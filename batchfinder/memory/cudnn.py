"""cuDNN's convolution workspaces: what a convolution takes from PyTorch's caching allocator while it runs.

On a GPU, ``cudnn_convolution`` allocates its output, then a workspace through the caching allocator, runs the kernel
and frees the workspace (``run_conv_plan`` in PyTorch's ``aten/src/ATen/native/cudnn/Conv_v8.cpp`` allocates
``plan.getWorkspaceSize()`` bytes with ``c10::cuda::CUDACachingAllocator::get()->allocate``; the legacy path in
``Conv_v7.cpp`` does the same). The block is transient, so it hardly moves the allocated peak, but it shapes the
allocator's segments: a freed workspace stays cached and the tensors that follow are cut from it, several to a
segment, where they can later merge into blocks large enough for the backward pass's gradients (CUDA's allocator
merges freed blocks only with their neighbours in one segment: ``try_merge_blocks`` in
``c10/cuda/CUDACachingAllocator.cpp``). Without workspaces every large activation is a segment of its own, and the
model reserved far more than a GPU does (see below). The CPU's convolutions have no such workspace.

The size of a workspace depends on the algorithm cuDNN picks for that GPU, cuDNN version and
``torch.backends.cudnn.benchmark``, which cannot be known on the CPU. ``cudnn_workspace=`` says what to charge:

* ``"auto"`` (the default with ``kernels="cuda"``): each convolution's forward pass charges a transient workspace of
  :data:`CUDNN_FORWARD_WORKSPACE_FACTOR` x (input bytes + output bytes), right after its output, the room a
  kernel needs for copies of both operands in another layout (cuDNN's tensor-core kernels work on NHWC data; for
  PyTorch's default NCHW tensors the data is transposed on the way in and out). The backward pass charges none.
  This is a calibrated model, not cuDNN's own sizes; see :data:`CUDNN_FORWARD_WORKSPACE_FACTOR` for how it was fitted
  and checked.
* ``"none"`` (or ``0``): no workspace (the behaviour before this model existed).
* a whole number of bytes: a fixed allowance, charged after each convolution's output and again after its gradients
  in the backward pass (``cudnn_convolution_backward`` in ``ConvShared.cpp`` runs the input-gradient and then the
  weight-gradient plan, each with a workspace).

``torch.backends.cudnn.benchmark=True`` is not modelled: PyTorch then lets cuDNN time plans whose workspaces may take
up to the largest free block or the free device memory (``generate_and_filter_plans`` in ``Conv_v8.cpp`` sizes the
workspace by ``CUDACachingAllocator::cacheInfo``), which depends on the run; a fixed allowance in bytes stands in.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Union

import torch

__all__ = [
    "CUDNN_WORKSPACES",
    "DEFAULT_CUDNN_WORKSPACE",
    "CUDNN_FORWARD_WORKSPACE_FACTOR",
    "CudnnWorkspace",
    "check_cudnn_workspace",
    "cudnn_workspace",
    "resolve_cudnn_workspace",
    "forward_workspace_bytes",
]

CudnnWorkspace = Union[str, int]
"""A ``cudnn_workspace=`` value: ``"auto"``, ``"none"`` or a whole number of bytes."""

CUDNN_WORKSPACES = ("auto", "none")
"""The named ``cudnn_workspace=`` modes (a whole number of bytes is the third form)."""

DEFAULT_CUDNN_WORKSPACE = "auto"
"""What convolutions charge where nothing else is said (with ``kernels="cuda"``)."""

CUDNN_FORWARD_WORKSPACE_FACTOR = 1.0
"""The ``"auto"`` model's forward workspace per byte of a convolution's input and output.

Calibrated against two published measurements on an RTX 4090 (torch 2.0.1, cuDNN 8.9, SGD without momentum, batch
128, 224x224, 10 classes; ``max_memory_reserved / max_memory_allocated`` 18752/17232 MiB = 1.088 for torchvision's
vgg16_bn and 12982/11738 MiB = 1.106 for resnet50, as quoted in batchfinder's issue 20). With no workspace the
estimator's ratios are 1.360 and 1.201; with a forward workspace of factor x (input + output bytes): 0.75 gives
1.360 and 1.081, 1.0 gives 1.111 and 1.072, 1.5 gives 1.018 and 1.015 (both within 10% of the published ratios from
1.0 to 1.5; 1.0 is also the size of one copy of each operand). Charging the same size in the backward pass as well
moves vgg16_bn to 1.424, so the backward pass is charged none. Checked, without refitting, against published batch
sizes on other GPUs (docs/simulated-gpu.md, tests/memory/test_published.py)."""

_LOCAL = threading.local()


def check_cudnn_workspace(value: Any, *, argument: str = "cudnn_workspace") -> CudnnWorkspace:
    """``value`` when it is a valid ``cudnn_workspace=`` setting (``"auto"``, ``"none"``, or a whole number of bytes of
    at least 0); a ``TypeError``/``ValueError`` that says what is valid otherwise."""
    if isinstance(value, str) and value in CUDNN_WORKSPACES:
        return value
    if isinstance(value, str) and value == "benchmark":
        raise ValueError(
            f"{argument}='benchmark' is not modelled: with torch.backends.cudnn.benchmark=True cuDNN may take "
            "workspaces as large as the free memory of the moment; pass a size in bytes as an allowance (e.g. "
            "512 * 2**20), 'auto' (the default model) or 'none'"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{argument} takes 'auto' (the default model), 'none' or a whole number of bytes (e.g. 64 * 2**20), not "
            f"{value!r}"
        )
    if value < 0:
        raise ValueError(f"{argument} must be 0 or more bytes, got {value}")
    return value


@contextlib.contextmanager
def cudnn_workspace(value: CudnnWorkspace) -> Iterator[None]:
    """Within this block (on this thread), convolutions charge ``value`` as their cuDNN workspace where no
    ``cudnn_workspace=`` argument says otherwise: the simulated GPU, estimates and predictions made inside it.

    ``value``: ``"auto"`` (the default model), ``"none"``/``0`` (nothing), or a whole number of bytes charged after
    each convolution's output and again after its gradients. Example: ``with cudnn_workspace(64 * 2**20):
    estimate_memory(...)``. See the module documentation.
    """
    value = check_cudnn_workspace(value)
    previous = getattr(_LOCAL, "workspace", None)
    _LOCAL.workspace = value
    try:
        yield
    finally:
        _LOCAL.workspace = previous


def resolve_cudnn_workspace(value: CudnnWorkspace | None) -> CudnnWorkspace:
    """The setting in force: ``value`` when given, else that of an enclosing :func:`cudnn_workspace` block, else
    :data:`DEFAULT_CUDNN_WORKSPACE`."""
    if value is not None:
        return check_cudnn_workspace(value)
    inner = getattr(_LOCAL, "workspace", None)
    return DEFAULT_CUDNN_WORKSPACE if inner is None else inner


def forward_workspace_bytes(setting: CudnnWorkspace, inputs: torch.Tensor, output: torch.Tensor) -> int:
    """Bytes a forward convolution of ``inputs`` to ``output`` charges as its workspace under ``setting``."""
    if setting == "none":
        return 0
    if setting == "auto":
        # The kernel's operands are in the output's dtype (under autocast the input is cast before cuDNN sees it).
        return int(CUDNN_FORWARD_WORKSPACE_FACTOR * (inputs.numel() + output.numel()) * output.element_size())
    return int(setting)


def backward_workspace_bytes(setting: CudnnWorkspace) -> int:
    """Bytes each backward convolution charges under ``setting`` (the fixed allowance only)."""
    return setting if isinstance(setting, int) else 0


def describe(setting: CudnnWorkspace) -> str:
    """The usage label of a setting, e.g. ``"convolution: cuDNN workspace, input + output bytes (auto)"``."""
    if setting == "auto":
        return "convolution: cuDNN workspace, input + output bytes in the forward pass (auto)"
    return f"convolution: cuDNN workspace allowance {int(setting):,} B"
