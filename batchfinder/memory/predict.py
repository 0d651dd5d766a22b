"""Predicting the largest batch size without a GPU.

>>> import torch, batchfinder as bf
>>> p = bf.predict_max_batch_size(bf.zoo.mnist_mlp(), (1, 28, 28), gpu="A100-40GB")   # doctest: +SKIP
>>> p.max_batch_size, p.batch_size                                                    # doctest: +SKIP

:func:`predict_max_batch_size` finds the largest batch size whose predicted peak (the fake-tensor estimator of
:mod:`batchfinder.memory.estimate`) fits in a capacity, by a few traces (a line through each phase's peak, then secant and
bisection steps on the estimator), on the CPU, in seconds. With ``capacity=`` the capacity is what the tensors may
take, as for a :class:`~batchfinder.SimulatedGPU`: the prediction then equals what real trials find on that
simulated GPU. With ``gpu=`` the GPU's memory minus the allowance of :mod:`batchfinder.memory.gpus` (CUDA context, cuBLAS
workspace) is used.

The same estimator drives ``mode="guided"`` of the search (see :mod:`batchfinder.engine.modes`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import exception_first_line
from ..search.checks import MIN_STEPS_PER_TRIAL, check_positive_int, check_safety
from ..search.strategies import recommend_batch_size, scaled_batch_size
from ..training.optimizers import OptimizerLike
from ..training.sample_sizes import DEFAULT_SCAN_BUDGET, SampleSize
from ..training.steps import LossFn, StepFn
from ..units import format_bytes, parse_bytes
from .allocator import ALLOCATORS
from .estimate import Estimator, MemoryEstimate, Sharding
from .gpus import GPUSpec, lookup_gpu
from .cudnn import CudnnWorkspace
from .kernels import DEFAULT_CAPABILITY

__all__ = ["Prediction", "predict_max_batch_size", "DEFAULT_MAX_BATCH_SIZE"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 2**31 - 1
"""The largest batch size :func:`predict_max_batch_size` considers unless told otherwise."""


@dataclass
class Prediction:
    """The largest batch size predicted to fit, and the recommendation after the safety factor."""

    max_batch_size: int
    """Largest batch size whose predicted peak fits in :attr:`capacity_bytes`."""
    batch_size: int
    """Recommended: ``floor(safety * max_batch_size)``, rounded down to ``multiple_of``, at least 1."""
    capacity_bytes: int
    """Bytes PyTorch's allocator may hold (the GPU's memory minus :attr:`allowance_bytes`, or ``capacity=``)."""
    peak_bytes: int
    """Predicted peak at :attr:`max_batch_size`: reserved bytes with the caching allocator (what a GPU runs out of
    memory on), allocated bytes with ``allocator="ideal"``."""
    next_peak_bytes: int | None
    """Predicted peak at ``max_batch_size + 1`` (None when the search stopped at ``max_batch_size`` instead); when it
    does not fit, the peak it would reach on a device without a limit (which the caching allocator, placing blocks
    differently there, can put well above the capacity: read :attr:`next_failure` for what fails)."""
    breakdown: Callable[[], MemoryEstimate] = field(repr=False)
    """Computes the breakdown at :attr:`max_batch_size` (one more trace): read :attr:`estimate` instead."""
    safety: float = 0.8
    multiple_of: int = 1
    gpu: GPUSpec | None = None
    allowance_bytes: int = 0
    """What was subtracted from the GPU's memory for the CUDA context (0 with ``capacity=``); cuBLAS's workspaces
    are allocator blocks, inside the budget and the peak."""
    allocator: str = "caching"
    """The allocator budgeted: ``"caching"`` (reserved bytes) or ``"ideal"`` (allocated bytes)."""
    capped: bool = False
    """True when the largest size considered (``max_batch_size=``) still fitted."""
    curve: dict[int, int] = field(default_factory=dict)
    """Every batch size traced or replayed, with its predicted peak (a size that does not fit: the peak it would
    need without a limit, above the capacity)."""
    traces: int = 0
    """Fake-tensor traces the prediction ran (the breakdown's, when :attr:`estimate` was read, not included)."""
    seconds: float = 0.0
    kernels: list[str] = field(default_factory=list)
    """Which kernel models applied (:mod:`batchfinder.memory.kernels`), e.g. ``"attention: flash (CUDA), 24 calls"``."""
    method: str = ""
    """How the peaks were computed: ``"one trace, replayed at each size"`` (:mod:`batchfinder.memory.replay`) or
    ``"a trace per size: <why one trace could not stand for every size>"``."""
    next_failure: str | None = None
    """Why ``max_batch_size + 1`` does not fit: the allocator's request that fails and the free memory it exceeds
    (None when the search stopped at ``max_batch_size`` or where the estimator does not say)."""

    def __post_init__(self) -> None:
        self._estimate: MemoryEstimate | None = None

    @property
    def estimate(self) -> MemoryEstimate:
        """The full :class:`~batchfinder.MemoryEstimate` at :attr:`max_batch_size`, computed on first use (a trace
        with the breakdown by category; its ``peak`` is :attr:`peak_bytes`'s allocated figure)."""
        if self._estimate is None:
            self._estimate = self.breakdown()
        return self._estimate

    @property
    def memory_bytes(self) -> int:
        """The GPU's memory (``capacity_bytes + allowance_bytes``)."""
        return self.capacity_bytes + self.allowance_bytes

    def as_dict(self) -> dict[str, Any]:
        """Every figure as plain JSON-ready values."""
        return {
            "max_batch_size": self.max_batch_size,
            "batch_size": self.batch_size,
            "safety": self.safety,
            "multiple_of": self.multiple_of,
            "gpu": None if self.gpu is None else self.gpu.name,
            "memory_bytes": self.memory_bytes,
            "allowance_bytes": self.allowance_bytes,
            "allocator": self.allocator,
            "capacity_bytes": self.capacity_bytes,
            "peak_bytes": self.peak_bytes,
            "next_peak_bytes": self.next_peak_bytes,
            "next_failure": self.next_failure,
            "capped": self.capped,
            "traces": self.traces,
            "seconds": round(self.seconds, 3),
            "curve": {str(k): v for k, v in self.curve.items()},
            "method": self.method,
            "kernels": list(self.kernels),
            "estimate": self.estimate.as_dict(),
        }

    def __str__(self) -> str:
        est = self.estimate
        if self.gpu is not None:
            where = (
                f"on {self.gpu.name}: {format_bytes(self.gpu.memory_bytes)} minus the CUDA context "
                f"{format_bytes(self.allowance_bytes)} = {format_bytes(self.capacity_bytes)} for PyTorch's allocator "
                f"(two cuBLAS workspaces of {format_bytes(self.gpu.workspace_bytes)} among its blocks)"
            )
        else:
            where = f"in {format_bytes(self.capacity_bytes)}"
        held = "reserved by the caching allocator" if self.allocator == "caching" else "allocated"
        if self.capped:
            limit = f"(the largest size considered; it still fits, peak {format_bytes(self.peak_bytes)} {held})"
        elif self.next_failure is not None:
            limit = (
                f"(predicted peak {format_bytes(self.peak_bytes)} {held}; at {self.max_batch_size + 1:,} "
                f"{self.next_failure})"
            )
        else:
            limit = (
                f"(predicted peak {format_bytes(self.peak_bytes)} {held}; {self.max_batch_size + 1:,} would need "
                f"{format_bytes(self.next_peak_bytes)})"
            )
        scaled = scaled_batch_size(self.max_batch_size, self.safety)
        rounding = f", rounded down to a multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
        return "\n".join(
            [
                f"predicted batch size for {est.model} ({est.parameter_count:,} parameters), optimizer {est.optimizer}, "
                f"batch {est.sample}",
                f"  {where}",
                f"largest batch size that fits: {self.max_batch_size:,} {limit}",
                f"recommended batch size: {self.batch_size:,} (x{self.safety:g} = {scaled:,}{rounding})",
                "",
                f"breakdown at {self.max_batch_size:,}:",
                est.table(),
                f"the peak is in {est.peak_phase}; {self.traces} fake-tensor trace(s) ({self.method}), "
                f"{self.seconds:.1f} s, no GPU used",
                *(["kernels: " + "; ".join(self.kernels)] if self.kernels else []),
                *([str(est.sharded)] if est.sharded is not None else []),
            ]
        )

    def plot(self, path: Any) -> Any:
        """Write a PNG: the predicted peak against batch size, the capacity, the largest and recommended sizes."""
        from ..plot import plot_prediction

        return plot_prediction(self, path)


def _failure_at(estimator: Estimator, batch_size: int) -> str | None:
    """What fails at ``batch_size``, a size the allocator of the estimator's capacity cannot serve: from the replay
    of the recorded trace, or from the out-of-memory error of a trace at that size."""
    replay = estimator.replay_at(batch_size)
    if replay is not None and replay.failure is not None:
        return replay.failure
    try:
        estimator.trace(batch_size)
    except torch.OutOfMemoryError as exc:
        return f"the step runs out of memory ({exception_first_line(exc)})"
    return None


def _validate(safety: Any, multiple_of: Any, max_batch_size: Any) -> None:
    check_safety(safety)
    check_positive_int("multiple_of", multiple_of)
    check_positive_int("max_batch_size", max_batch_size, allow_none=True)


def _budget(capacity: Any, gpu: Any) -> tuple[int, int, GPUSpec | None, str]:
    """(bytes for PyTorch's allocator, what the CUDA context takes, GPU, how to name it in messages)."""
    if (capacity is None) == (gpu is None):
        raise ValueError(
            "give exactly one of capacity= (bytes the tensors may take, e.g. capacity='16GiB') or gpu= (a GPU name, "
            "e.g. gpu='A100-40GB', whose memory minus the CUDA context is used)"
        )
    if gpu is not None:
        spec = lookup_gpu(gpu)
        return (
            spec.usable_bytes, spec.allowance_bytes, spec,
            f"gpu={spec.name!r} ({format_bytes(spec.usable_bytes)} after the CUDA context)",
        )
    limit = parse_bytes(capacity, argument="capacity")
    return limit, 0, None, f"capacity={capacity!r} ({format_bytes(limit)})"


def predict_max_batch_size(
    model: nn.Module,
    sample: Any,
    *,
    capacity: int | str | None = None,
    gpu: str | None = None,
    optimizer: OptimizerLike = None,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
    safety: float = 0.8,
    multiple_of: int = 1,
    max_batch_size: int | None = None,
    steps_per_trial: int = MIN_STEPS_PER_TRIAL,
    input_dtype: torch.dtype = torch.float32,
    allocator: str = "caching",
    sample_size: SampleSize | None = None,
    scan_budget: float = DEFAULT_SCAN_BUDGET,
    precision: str = "32-true",
    train: bool = True,
    kernels: str = "cuda",
    cudnn_workspace: CudnnWorkspace | None = None,
    sharding: Sharding | None = None,
) -> Prediction:
    """Predict the largest batch size ``model`` can train with in ``capacity`` bytes or on ``gpu``, without a GPU.

    Args:
        model: any ``nn.Module`` (on the CPU, a GPU or the ``meta`` device); left exactly as it was.
        sample: one dataset item as ``dataset[0]`` returns it, an input shape such as ``(3, 224, 224)``, or a
            ``Dataset``/``DataLoader`` whose largest sample is used (see :func:`~batchfinder.estimate_memory`; the
            prediction's ``estimate.sample`` says which sample).
        capacity: bytes PyTorch's allocator may hold (an int or a string such as ``"16GiB"``), as the capacity of a
            :class:`~batchfinder.SimulatedGPU`: the prediction is then what a search on ``SimulatedGPU(capacity)``
            finds.
        gpu: instead of ``capacity``, a GPU name (``"T4"``, ``"A100-40GB"``, ``"H100"``, ...; see
            :mod:`batchfinder.memory.gpus`): its memory less the CUDA context, with cuBLAS's workspaces for that
            architecture among the allocator's blocks, as on ``SimulatedGPU.like(gpu)``.
        allocator: ``"caching"`` (default): budget the bytes PyTorch's caching allocator reserves (its segments),
            on which a GPU runs out of memory; ``"ideal"``: budget allocated bytes, as ``SimulatedGPU(...,
            allocator="ideal")`` does.
        optimizer, loss_fn, step_fn, steps_per_trial, input_dtype, sample_size, scan_budget, precision: as for
            :func:`~batchfinder.estimate_memory`.
        train: ``False`` predicts the largest inference batch (forward passes only, as
            ``find_batch_size(..., train=False)`` runs them; see :func:`~batchfinder.estimate_memory`).
        kernels: ``"cuda"`` (default): attention and the optimizer's step as CUDA's kernels allocate them, on the
            compute capability of ``gpu`` (sm80 with ``capacity=``; :mod:`batchfinder.memory.kernels`); ``"cpu"``:
            as the CPU's kernels do.
        cudnn_workspace: what each convolution charges as cuDNN's workspace with ``kernels="cuda"``: ``"auto"``
            (default), ``"none"`` or a whole number of bytes, as for :func:`~batchfinder.estimate_memory`.
        sharding: a :class:`~batchfinder.estimate.Sharding`: predict the batch size per GPU of one rank of a job that shards
            ``model`` with FSDP2 over ``world_size`` GPUs of this kind (see :func:`~batchfinder.estimate_memory`).
        safety: the recommendation is ``floor(safety * max_batch_size)`` (default 0.8).
        multiple_of: round the recommendation down to a multiple of this.
        max_batch_size: the largest size considered (default 2**31 - 1).

    Returns:
        A :class:`Prediction`; print it for the figures and the breakdown at the largest size.

    Raises:
        ValueError: an unknown GPU (the message lists the known ones), a capacity too small for batch size 1 (the
            message says what batch size 1 needs), a sample the model rejects, or a model that cannot run under fake
            tensors (:class:`~batchfinder.FakeTensorUnsupportedError`; use :func:`~batchfinder.find_batch_size`).
    """
    started = time.perf_counter()
    _validate(safety, multiple_of, max_batch_size)
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator={allocator!r} is not a simulated allocator; choose one of {list(ALLOCATORS)}")
    limit, allowance, spec, where = _budget(capacity, gpu)
    estimator = Estimator.create(
        model, sample, optimizer=optimizer, loss_fn=loss_fn, step_fn=step_fn, steps_per_trial=steps_per_trial,
        input_dtype=input_dtype, reserved=allocator == "caching", workspace_bytes=spec.workspace_bytes if spec else 0,
        allocator_capacity=limit if allocator == "caching" else None, sample_size=sample_size, scan_budget=scan_budget,
        precision=precision, train=train, kernels=kernels, cudnn_workspace=cudnn_workspace,
        compute_capability=spec.compute_capability if spec is not None else DEFAULT_CAPABILITY, sharding=sharding,
    )
    estimator.detailed = True  # when traced per size, the breakdown at the answer then costs no extra trace
    cap = max_batch_size if max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
    best = estimator.largest_fitting(limit, 1, cap)
    if best < 1:
        est = estimator.estimate_unbounded(1)
        one = est.peak_reserved if allocator == "caching" else est.peak
        raise ValueError(
            f"{where} is too small for batch size 1: {'training' if train else 'inference'} needs {format_bytes(one)} at batch size 1 (parameters "
            f"{format_bytes(est.parameters + est.buffers)}, gradients {format_bytes(est.gradients)}, optimizer state "
            f"{format_bytes(est.optimizer_state)}, batch {format_bytes(est.batch)}, activations and temporaries "
            f"{format_bytes(est.activations)} at the peak). Use a larger GPU, "
            f"{'an optimizer with less state (SGD), ' if train else ''}mixed precision, or a smaller model."
        )
    capped = best >= cap
    next_peak = None if capped else estimator.peak(best + 1)
    next_failure = None
    if not capped and estimator.overflows(best + 1):
        next_peak = estimator.unbounded_peak(best + 1)  # what it would take without the limit
        next_failure = _failure_at(estimator, best + 1)
    prediction = Prediction(
        max_batch_size=best,
        batch_size=recommend_batch_size(best, safety, multiple_of),
        capacity_bytes=limit,
        peak_bytes=estimator.peak(best),
        next_peak_bytes=next_peak,
        next_failure=next_failure,
        breakdown=lambda: estimator.estimate(best),
        safety=float(safety),
        multiple_of=multiple_of,
        gpu=spec,
        allowance_bytes=allowance,
        allocator=allocator,
        capped=capped,
        curve=estimator.known_peaks,
        traces=estimator.calls,
        seconds=time.perf_counter() - started,
        method=estimator.method,
        kernels=list(estimator.trainer.kernel_notes),
    )
    logger.info(
        "predicted largest batch size %d in %s (%d traces, %.1f s)", best, format_bytes(limit), estimator.calls, prediction.seconds
    )
    return prediction
