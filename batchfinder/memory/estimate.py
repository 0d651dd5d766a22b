"""Memory estimates without a GPU: :func:`estimate_memory` traces real training steps under fake tensors.

>>> import torch, batchfinder as bf
>>> from batchfinder.memory.estimate import estimate_memory_curve
>>> from batchfinder.zoo import mnist_mlp
>>> model = mnist_mlp()
>>> est = bf.estimate_memory(model, (1, 28, 28), 1024, optimizer=torch.optim.SGD)
>>> est.parameters, est.gradients, est.optimizer_state      # bytes
(407552, 407552, 0)
>>> print(est)                                                # doctest: +SKIP
>>> curve = estimate_memory_curve(model, (1, 28, 28), [64, 256, 1024], optimizer=torch.optim.SGD)
>>> [e.batch_size for e in curve]
[64, 256, 1024]
>>> print(curve)                                              # doctest: +SKIP

:func:`estimate_memory` gives a :class:`MemoryEstimate` at one batch size, :func:`estimate_memory_curve` a
:class:`MemoryEstimates` (one estimate per size) at several. The figures follow the four categories of GPU memory
in training: parameters and their gradients (with buffers such as BatchNorm's running statistics), optimizer state,
the data batch (inputs and targets on the device), and the activations and temporaries held at the peak. They come
from the simulated GPU's accounting (:mod:`batchfinder.memory.accounting`), so:

* ``estimate.peak`` equals, to the byte, the ``peak_bytes`` that ``try_batch_size`` measures on a
  :class:`~batchfinder.SimulatedGPU` large enough for the same model, optimizer, step and batch;
* every storage is rounded up to 512 bytes, as the CUDA caching allocator rounds every request: the MNIST MLP's four
  parameter tensors hold 407,080 bytes and are charged 407,552 (the 10-float bias takes 512); ``estimate.exact``
  keeps the unrounded figures.

Where CUDA's kernels allocate differently from the CPU's (attention, the optimizers' foreach step, cuDNN's
convolution workspaces), the trace charges what CUDA's would (:mod:`batchfinder.memory.kernels`,
:mod:`batchfinder.memory.cudnn`; ``kernels="cpu"`` for the CPU's). What it does not see: the CUDA context and the
workspaces cuDNN really picks (a calibrated rule stands in). See
:func:`~batchfinder.predict_max_batch_size` for the allowance made for those.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data._utils.collate import default_collate

from ..errors import FakeTensorUnsupportedError, exception_first_line
from ..search.checks import MIN_STEPS_PER_TRIAL, check_positive_int, check_steps_per_trial
from ..training.batching import describe_batch, sample_bytes
from ..training.optimizers import OptimizerLike, OptimizerSpec, resolve_optimizer
from ..training.precision import check_precision
from ..training.sample_sizes import DEFAULT_SCAN_BUDGET, SampleSize
from ..training.steps import LossFn, StepFn, check_train, forward, make_step
from ..training.synthetic import as_shape
from ..training.validation import check_model
from .breakdown import NO_OPTIMIZER, MemoryEstimate, MemoryEstimates
from .cudnn import CudnnWorkspace, check_cudnn_workspace
from .kernels import DEFAULT_CAPABILITY, check_kernels
from .replay import AllocationLog, Replay, record, replay_obstacle
from .shapes import check_sample, is_data, largest_template, template_from_shape
from .sharding import ShardedTrainer, Sharding, check_sharding
from .tracing import FakeTrainer, StepContractError, Trace, describe_template

__all__ = [
    "Sharding",
    "MemoryEstimate",
    "MemoryEstimates",
    "Estimator",
    "estimate_memory",
    "estimate_memory_curve",
]

logger = logging.getLogger(__name__)

# -- the estimator ------------------------------------------------------------------------------------------------
def _sample_parts(template: Any) -> dict[str, int]:
    """Unrounded bytes of one sample by part (``input``, ``target``, further elements or dict keys)."""

    if isinstance(template, dict):
        return {str(k): sample_bytes(v) for k, v in template.items()}
    if isinstance(template, (tuple, list)):
        names = ["input", "target"] + [f"element {i}" for i in range(2, len(template))]
        return {names[i]: sample_bytes(v) for i, v in enumerate(template)}
    return {"input": sample_bytes(template)}


class Estimator:
    """Memory estimates of one model, sample, optimizer and step at any batch size (peaks are cached).

    Build it with :meth:`create` (the public arguments, validated) or :meth:`for_search` (what a search already
    resolved). :meth:`peak` is the predicted peak at a batch size; :meth:`estimate` the full breakdown.
    """

    def __init__(
        self,
        model: nn.Module,
        template: Any,
        optimizer: OptimizerSpec,
        step: StepFn,
        *,
        steps: int = MIN_STEPS_PER_TRIAL,
        sample_label: str = "",
        reserved: bool = False,
        workspace_bytes: int = 0,
        allocator_capacity: int | None = None,
        sample_index: int | None = None,
        precision: str = "32-true", train: bool = True,
        kernels: str = "cuda", compute_capability: tuple[int, int] = DEFAULT_CAPABILITY,
        cudnn_workspace: CudnnWorkspace | None = None, sharding: Sharding | None = None, optimizer_arg: OptimizerLike = None,
    ) -> None:
        self.model = model
        self.template = template
        self.sample_index = sample_index
        self.optimizer = optimizer
        self.allocator_capacity = allocator_capacity
        """With a capacity, a trace that the caching allocator of that size could not serve counts as a peak of
        ``allocator_capacity + 1`` (it would run out of memory), as the trial on that device would."""
        self._overflows: set[int] = set()
        self.reserved = reserved
        """When True, :meth:`peak` (and so :meth:`largest_fitting`) is the caching allocator's reserved peak, on which
        a real GPU runs out of memory, rather than the allocated peak."""
        sharded: dict[str, Any] = {} if sharding is None else {"sharding": sharding, "optimizer_arg": optimizer_arg}
        self.trainer = (FakeTrainer if sharding is None else ShardedTrainer)(
            model, template, optimizer, step, steps=steps, workspace_bytes=workspace_bytes, **sharded,
            allocator_capacity=allocator_capacity, precision=precision, train=train, kernels=kernels,
            compute_capability=compute_capability, cudnn_workspace=cudnn_workspace,
        )
        self.precision = precision
        self.train = train
        self.steps = steps
        self.sample_label = sample_label or describe_template(template)
        self._traces: dict[int, Trace] = {}
        self._log: AllocationLog | None = None
        self._replays: dict[int, Replay] = {}
        self._unbounded: dict[int, int] = {}
        """Peaks of overflowing replays without a limit (for :attr:`known_peaks`), by batch size."""
        self.replayable: bool | None = None
        """Whether one recorded trace stands for every batch size (None until first needed; see
        :mod:`batchfinder.memory.replay`)."""
        self.method = "not yet run" if train else "a trace per size (inference)"
        """How peaks are computed: ``"one trace, replayed at each size"`` or, when the model's memory is not an
        affine function of the batch size (or cannot be recorded), ``"a trace per size"`` with the reason."""
        self.detailed = False
        """When True, :meth:`peak` also records the breakdown (so :meth:`estimate` needs no second trace)."""
        self._counts = (
            sum(p.numel() for p in _unique(model.parameters())),
            sum(p.numel() for p in _unique(model.parameters()) if p.requires_grad),
        )

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        model: nn.Module,
        sample: Any,
        *,
        optimizer: OptimizerLike = None,
        loss_fn: LossFn | None = None,
        step_fn: StepFn | None = None,
        steps_per_trial: int = MIN_STEPS_PER_TRIAL,
        input_dtype: torch.dtype = torch.float32,
        reserved: bool = False,
        workspace_bytes: int = 0,
        allocator_capacity: int | None = None,
        sample_size: SampleSize | None = None,
        scan_budget: float = DEFAULT_SCAN_BUDGET,
        precision: str = "32-true",
        train: bool = True,
        kernels: str = "cuda", compute_capability: tuple[int, int] = DEFAULT_CAPABILITY,
        cudnn_workspace: CudnnWorkspace | None = None,
        sharding: Sharding | None = None,
    ) -> "Estimator":
        """Validate the public arguments (see :func:`estimate_memory`) and build the estimator."""
        check_precision(precision)
        check_kernels(kernels)
        if cudnn_workspace is not None:
            check_cudnn_workspace(cudnn_workspace)
        check_model(model)
        if sharding is not None:
            check_sharding(sharding, model)
        check_steps_per_trial(steps_per_trial)
        check_train(train, optimizer, loss_fn)
        step = make_step(loss_fn, step_fn) if train or step_fn is not None else forward
        spec = resolve_optimizer(optimizer, model) if train else None
        index = None
        shape = None if is_data(sample) else as_shape(sample, argument="sample")
        if is_data(sample):
            template, label, index = largest_template(sample, sample_size, scan_budget)
        elif sample_size is not None:
            raise ValueError("sample_size applies when sample is a Dataset or DataLoader (to find its largest sample)")
        elif shape is not None:
            template, label = template_from_shape(model, shape, input_dtype)
        else:
            check_sample(sample)
            try:
                template = default_collate([sample])
            except (TypeError, RuntimeError) as exc:
                raise TypeError(f"sample {describe_batch(sample)} cannot be collated into a batch: {exc}") from exc
            label = describe_template(template)
        return cls(
            model, template, spec, step, steps=steps_per_trial, sample_label=label, reserved=reserved,
            workspace_bytes=workspace_bytes, allocator_capacity=allocator_capacity, sample_index=index,
            precision=precision, train=train, kernels=kernels, compute_capability=compute_capability,
            cudnn_workspace=cudnn_workspace, sharding=sharding, optimizer_arg=optimizer,
        )

    @classmethod
    def for_search(cls, context: Any) -> "Estimator":
        """The estimator for a search's context (model, the largest sample of its data, optimizer, step), predicting
        the peak the search's device decides on: reserved bytes where the device has a caching allocator."""
        index = getattr(context.source, "largest_index", 0)
        template = context.source.collate([context.source.sample(index)])
        device = context.device
        exact_allocator = device.accounting_is_exact and device.reserves_segments
        return cls(
            context.model,
            template,
            context.optimizer,
            context.step,
            steps=context.steps_per_trial,
            reserved=device.reserves_segments,
            workspace_bytes=device.workspace_bytes,
            allocator_capacity=device.capacity_bytes if exact_allocator else None,
            sample_index=index,
            precision=getattr(context, "precision", "32-true"),
            kernels=device.kernels, compute_capability=device.compute_capability,
            cudnn_workspace=getattr(device, "cudnn_workspace", None),
        )

    # -- estimates -----------------------------------------------------------------------------------------------
    def trace(self, batch_size: int, *, breakdown: bool = True) -> Trace:
        """Trace at ``batch_size``; errors about the sample or fake tensors become clear ValueErrors/TypeErrors."""
        try:
            trace = self.trainer.trace(batch_size, breakdown=breakdown)
        except FakeTensorUnsupportedError:
            raise
        except (torch.OutOfMemoryError, KeyboardInterrupt, MemoryError):
            raise
        except StepContractError:
            raise
        except Exception as exc:
            raise self._sample_error(exc, batch_size) from exc
        self._traces[batch_size] = trace
        return trace

    def peak(self, batch_size: int) -> int:
        """Predicted peak bytes at ``batch_size`` (model included; reserved bytes when :attr:`reserved`), cached.

        From batch size 2 on, one recorded trace is replayed at the size (:mod:`batchfinder.memory.replay`) when the model
        allows it; otherwise (and at batch size 1, where dimensions of size 1 change which copies are made) the
        step is traced at the size."""
        if batch_size in self._overflows and self.allocator_capacity is not None:
            return self.allocator_capacity + 1
        found = self._traces.get(batch_size)
        if found is not None:
            return found.peak_reserved if self.reserved else found.peak
        replay = self._replay(batch_size)
        if replay is not None:
            if replay.overflows and self.allocator_capacity is not None:
                self._overflows.add(batch_size)
                return self.allocator_capacity + 1
            return replay.peak_reserved if self.reserved else replay.peak
        try:
            found = self.trace(batch_size, breakdown=self.detailed)
        except torch.OutOfMemoryError:
            if self.allocator_capacity is None:
                raise
            self._overflows.add(batch_size)
            return self.allocator_capacity + 1
        return found.peak_reserved if self.reserved else found.peak

    def _replay(self, batch_size: int) -> Replay | None:
        """The replay of the recorded trace at ``batch_size`` (None where the log cannot stand for it)."""
        if batch_size < 2 or self.replayable is False or not self.train:
            return None
        found = self._replays.get(batch_size)
        if found is not None:
            return found
        if self._log is None:
            self._log = self._record()
            if self._log is None:
                return None
        found = self._log.replay(batch_size, self.allocator_capacity)
        self._replays[batch_size] = found
        return found

    def use_log(self, log: AllocationLog, method: str) -> None:
        """Predict from ``log`` (a fitted recording made elsewhere, e.g. of a real trial on the simulated GPU) instead
        of tracing one; ``method`` says how it was made (:attr:`method`)."""
        if log.unsuitable is not None:
            raise ValueError(f"the allocation log cannot stand for other batch sizes: {log.unsuitable}")
        self._log, self.replayable, self.method = log, True, method
        self._replays.clear()
        self._unbounded.clear()
        self._overflows.clear()

    def _record(self) -> AllocationLog | None:
        reason = replay_obstacle(self.template)
        log = None
        if reason is None:
            try:
                log = record(self.trainer)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # the per-size traces report what the model cannot do, with its own message
                reason = f"recording the step at a batch of a billion failed ({type(exc).__name__}: {exception_first_line(exc)})"
            else:
                reason = log.unsuitable
        self.replayable = reason is None
        self.method = "one trace, replayed at each size" if reason is None else f"a trace per size: {reason}"
        if reason is not None:
            logger.info("memory estimates trace the step at each batch size: %s", reason)
            return None
        return log

    def replay_at(self, batch_size: int) -> Replay | None:
        """The replay of the recorded log at ``batch_size`` on the allocator of :attr:`allocator_capacity` (None
        where there is no log that replays, or at batch size 1)."""
        return self._replay(batch_size) if self.replayable else None

    def predicted_pair(self, batch_size: int) -> tuple[int, int] | None:
        """(allocated, reserved) peaks predicted at ``batch_size`` from what is computed already (None: not computed,
        or the allocator of :attr:`allocator_capacity` overflowed there)."""
        if batch_size in self._overflows:
            return None
        found: Any = self._replays.get(batch_size) or self._traces.get(batch_size)
        return None if found is None else (found.peak, found.peak_reserved)

    def overflows(self, batch_size: int) -> bool:
        """True when the allocator of :attr:`allocator_capacity` could not serve the trace at ``batch_size``."""
        self.peak(batch_size)
        return batch_size in self._overflows

    def unbounded_peak(self, batch_size: int) -> int:
        """The peak at ``batch_size`` as if the allocator had no limit (reserved bytes when :attr:`reserved`)."""
        replay = self._log.replay(batch_size) if self.replayable and self._log is not None and batch_size >= 2 else None
        if replay is not None:
            return replay.peak_reserved if self.reserved else replay.peak
        est = self.estimate_unbounded(batch_size)
        return est.peak_reserved if self.reserved else est.peak

    def estimate_unbounded(self, batch_size: int) -> MemoryEstimate:
        """The breakdown at ``batch_size`` as if the allocator had no limit (for sizes that do not fit)."""
        capacity, self.trainer.allocator_capacity = self.trainer.allocator_capacity, None
        try:
            return self.estimate(batch_size)
        finally:
            self.trainer.allocator_capacity = capacity

    @property
    def known_peaks(self) -> dict[int, int]:
        """Every peak computed so far (traced or replayed), by batch size (reserved bytes when :attr:`reserved`).

        A size the allocator of :attr:`allocator_capacity` could not serve has the peak its replay reaches without a
        limit, at least one byte above the capacity (not the lower peak reached before running out)."""
        peaks = {size: self._reported(size, r) for size, r in self._replays.items()}
        peaks.update({size: (t.peak_reserved if self.reserved else t.peak) for size, t in self._traces.items()})
        return dict(sorted(peaks.items()))

    def _reported(self, batch_size: int, replay: Replay) -> int:
        if not replay.overflows or self._log is None:
            return replay.peak_reserved if self.reserved else replay.peak
        found = self._unbounded.get(batch_size)
        if found is None:
            unlimited = self._log.replay(batch_size)
            found = self._unbounded[batch_size] = unlimited.peak_reserved if self.reserved else unlimited.peak
        return max(found, (self.allocator_capacity or 0) + 1)

    def largest_fitting(self, level: int, lo: int = 1, hi: int = 2**40) -> int:
        """The largest batch size in ``[lo, hi]`` whose predicted peak is at most ``level`` (``lo - 1`` if none).

        With a recorded trace (:mod:`batchfinder.memory.replay`) every evaluation is a replay of a few milliseconds and
        batch size 1 is traced only when 2 does not fit: the allocated peaks (cheaper replays) bound the answer from
        above, and the reserved peaks are searched from there downwards, so that where they are not monotonic the
        answer is the largest size that fits. Otherwise traces ``lo`` and ``64 * lo``, extends the line of
        each phase's peak (the optimizer step's is nearly flat, the forward/backward one grows with the batch) to
        ``level``, and refines from there by :func:`~batchfinder.search.guided.largest_within`: typically four to six traces.
        """
        from ..search.guided import largest_from_above, largest_within

        if hi < lo:
            return lo - 1
        first = max(lo, 2)
        if first <= hi and self._replay(first) is not None and self._log is not None:
            if self.peak(first) > level:
                return lo if lo < first and self.peak(lo) <= level else lo - 1
            # Reserved bytes are never below allocated ones: the allocated answer (cheap replays) bounds the search.
            top = self._log.largest_within_allocated(level, first, hi)
            return largest_from_above(self.peak, level, first, top)
        if self.peak(lo) > level:
            return lo - 1
        probe = min(hi, max(lo + 1, 64 * lo))
        if probe == lo:
            return lo
        self.peak(probe)
        start = self._phase_guess(level, lo, probe) if probe in self._traces else None
        return largest_within(self.peak, level, lo, hi, start=start)

    def _phase_guess(self, level: int, b1: int, b2: int) -> int:
        """Where the lines through each phase's peaks at ``b1`` and ``b2`` first reach ``level``."""
        first, second = self._traces[b1].phase_peaks, self._traces[b2].phase_peaks
        guess = float("inf")
        for phases in (("forward", "backward"), ("optimizer step",), ("zero_grad",), ("setup",)):
            v1 = max((first.get(p, 0) for p in phases), default=0)
            v2 = max((second.get(p, 0) for p in phases), default=0)
            slope = (v2 - v1) / (b2 - b1)
            if v1 > level:
                return b1
            if slope > 0:
                guess = min(guess, b1 + (level - v1) / slope)
        return b2 * 64 if guess == float("inf") else max(b1, int(guess))

    @property
    def calls(self) -> int:
        """Traces run so far."""
        return self.trainer.calls

    def estimate(self, batch_size: int) -> MemoryEstimate:
        """The full :class:`MemoryEstimate` at ``batch_size``."""
        trace = self._traces.get(batch_size)
        if trace is None or not trace.at_peak:
            trace = self.trace(batch_size)
        parts = _sample_parts(self.template)
        return MemoryEstimate(
            batch_size=batch_size,
            parameters=trace.parameters,
            gradients=trace.gradients,
            optimizer_state=trace.optimizer_state,
            batch=trace.batch,
            activations=trace.at_peak.get("activations", 0),
            peak=trace.peak,
            buffers=trace.buffers,
            peak_reserved=trace.peak_reserved,
            at_peak=dict(trace.at_peak),
            peak_phase=trace.peak_phase,
            phase_peaks=dict(trace.phase_peaks),
            exact=dict(trace.exact),
            parameter_count=self._counts[0],
            trainable_parameter_count=self._counts[1],
            sample_bytes=sum(parts.values()),
            sample_parts=parts,
            optimizer=self.optimizer.label if self.optimizer is not None else NO_OPTIMIZER,
            model=type(self.model).__name__,
            sample=self.sample_label,
            steps=self.steps,
            sample_index=self.sample_index,
            kernels=list(trace.kernels),
            sharded=getattr(self.trainer, "sharded", {}).get(batch_size),
        )

    def _sample_error(self, exc: BaseException, batch_size: int) -> Exception:
        first = exception_first_line(exc)
        error_type = TypeError if isinstance(exc, TypeError) else ValueError
        return error_type(
            f"sample: the model could not train on a batch built from the sample, {describe_template(self.template, batch_size)} "
            f"({type(exc).__name__}: {first}). Pass one item exactly as dataset[0] returns it (a tensor, an "
            "(input, target) tuple or a dict of tensors, without the batch dimension) or the input shape, e.g. "
            "(1, 28, 28) for MNIST; pass loss_fn or step_fn when the default loss does not suit the model."
        )


def _unique(tensors: Any) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


# -- public functions -----------------------------------------------------------------------------------------------
def estimate_memory(
    model: nn.Module,
    sample: Any,
    batch_size: int,
    *,
    optimizer: OptimizerLike = None,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
    steps_per_trial: int = MIN_STEPS_PER_TRIAL,
    input_dtype: torch.dtype = torch.float32,
    sample_size: SampleSize | None = None,
    scan_budget: float = DEFAULT_SCAN_BUDGET,
    precision: str = "32-true",
    train: bool = True,
    kernels: str = "cuda",
    cudnn_workspace: CudnnWorkspace | None = None,
    sharding: Sharding | None = None,
) -> MemoryEstimate:
    """Estimate the GPU memory of training ``model`` at ``batch_size``, on the CPU, in a fraction of a second.

    Runs ``steps_per_trial`` real training steps (forward, loss, backward, optimizer step, zero grad) under fake
    tensors, which compute shapes but no values and allocate nothing, and charges them as the simulated GPU does.
    For several batch sizes use :func:`estimate_memory_curve`.

    Args:
        model: any ``nn.Module`` (on the CPU, a GPU, or the ``meta`` device); it is left exactly as it was.
        sample: one dataset item exactly as ``dataset[0]`` returns it (a tensor, an ``(input, target, ...)`` tuple or a
            dict of tensors, without the batch dimension), or an input shape such as ``(1, 28, 28)`` or ``"1x28x28"``
            (a float32 input; the target is made up from the model's output, see :mod:`batchfinder.training.synthetic`), or a
            ``Dataset``/``DataLoader``: its largest sample is used (collated with the loader's ``collate_fn``), which
            bounds every batch of that size when sample sizes vary; the estimate's ``sample`` says which one.
        batch_size: the batch size, a whole number of at least 1.
        optimizer: as for :func:`~batchfinder.find_batch_size` (a class, a callable ``params -> optimizer``, or an
            optimizer instance over the model's parameters); default Adam.
        loss_fn: ``loss_fn(output, target) -> loss`` instead of the default loss.
        step_fn: ``step_fn(model, batch) -> loss`` for full control of the forward pass.
        steps_per_trial: training steps traced (at least 2: Adam creates its state at the first step).
        input_dtype: the input's dtype when ``sample`` is a shape (e.g. ``torch.int64`` for token ids).
        sample_size, scan_budget: when ``sample`` is a data set, how its largest sample is found, as for
            :func:`~batchfinder.find_batch_size`.
        precision: ``"32-true"`` (default), ``"16-mixed"``, ``"bf16-mixed"``, ``"16-true"`` or ``"bf16-true"``, as for
            :func:`~batchfinder.find_batch_size`; mixed precision follows CUDA's autocast policies
            (:mod:`batchfinder.training.precision`).
        train: ``False`` estimates inference as ``find_batch_size(..., train=False)`` runs it: ``steps_per_trial``
            forward passes in eval mode without gradients, no optimizer (``optimizer``/``loss_fn`` refused;
            ``step_fn(model, batch) -> output`` replaces the forward), each output kept until the next one exists.
        kernels: ``"cuda"`` (default): attention and the optimizer's step as CUDA's kernels allocate them on an A100
            (sm80; :mod:`batchfinder.memory.kernels`); ``"cpu"``: as the CPU's do. ``estimate.kernels`` says which.
        cudnn_workspace: with ``kernels="cuda"``, what each convolution charges as cuDNN's workspace
            (:mod:`batchfinder.memory.cudnn`): ``"auto"`` (default; calibrated against published measurements),
            ``"none"``, or a number of bytes. None: that of an enclosing ``cudnn_workspace(...)`` block, else ``"auto"``.
        sharding: a :class:`~batchfinder.estimate.Sharding` (world size, the blocks ``fully_shard`` wraps, ...):
            estimate one rank of an FSDP2 job over the unsharded ``model`` (left as it was), without a process group
            (:mod:`batchfinder.memory.sharding`); ``estimate.sharded`` says what that rank gathers.

    Returns:
        A :class:`MemoryEstimate`. Print it for a table; its ``peak`` equals what a trial on a large enough
        :class:`~batchfinder.SimulatedGPU` measures.

    Raises:
        ValueError / TypeError: a bad argument (a list of batch sizes is a TypeError that points to
            :func:`estimate_memory_curve`), or a sample the model rejects (the message says what would be valid).
        FakeTensorUnsupportedError (a ValueError): the training step cannot run under fake tensors (it reads tensor
            values); use :func:`~batchfinder.find_batch_size` instead.
    """
    if isinstance(batch_size, Sequence) and not isinstance(batch_size, (str, bytes)):
        raise TypeError(
            f"batch_size must be one whole number, not a {type(batch_size).__name__}; for estimates at several batch "
            "sizes use batchfinder.estimate.estimate_memory_curve(model, sample, [64, 256, 1024], ...)"
        )
    check_positive_int("batch_size", batch_size)
    curve = estimate_memory_curve(
        model, sample, [batch_size], optimizer=optimizer, loss_fn=loss_fn, step_fn=step_fn,
        steps_per_trial=steps_per_trial, input_dtype=input_dtype, sample_size=sample_size, scan_budget=scan_budget,
        precision=precision, train=train, kernels=kernels, cudnn_workspace=cudnn_workspace, sharding=sharding,
    )
    return curve[0]


def estimate_memory_curve(
    model: nn.Module,
    sample: Any,
    batch_sizes: Sequence[int],
    *,
    optimizer: OptimizerLike = None,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
    steps_per_trial: int = MIN_STEPS_PER_TRIAL,
    input_dtype: torch.dtype = torch.float32,
    sample_size: SampleSize | None = None,
    scan_budget: float = DEFAULT_SCAN_BUDGET,
    precision: str = "32-true",
    train: bool = True,
    kernels: str = "cuda",
    cudnn_workspace: CudnnWorkspace | None = None,
    sharding: Sharding | None = None,
) -> MemoryEstimates:
    """Estimate the GPU memory of training ``model`` at each of ``batch_sizes``, as :func:`estimate_memory` does
    at one: one estimator (the sample and arguments are checked once), one fake-tensor trace per distinct size.

    Args:
        model, sample, optimizer, loss_fn, step_fn, steps_per_trial, input_dtype, sample_size, scan_budget, precision,
        train: as for :func:`estimate_memory`.
        kernels, cudnn_workspace: as for :func:`estimate_memory`.
        kernels, sharding: as for :func:`estimate_memory`.
        batch_sizes: the batch sizes (a list, tuple or range of whole numbers of at least 1), e.g.
            ``[64, 256, 1024, 4096]``.

    Returns:
        A :class:`MemoryEstimates`: one :class:`MemoryEstimate` per batch size, in the order given. Print it for a
        table with one row per size; ``.plot(path)`` draws memory against batch size.

    Raises:
        ValueError / TypeError: as :func:`estimate_memory`; an empty ``batch_sizes`` is a ValueError, a single
            number a TypeError that points to :func:`estimate_memory`.
        FakeTensorUnsupportedError (a ValueError): as :func:`estimate_memory`.
    """
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence):
        raise TypeError(
            f"batch_sizes must be a list of batch sizes, e.g. [64, 256, 1024], not {type(batch_sizes).__name__}; for "
            "one batch size use batchfinder.estimate_memory(model, sample, batch_size, ...)"
        )
    for index, size in enumerate(batch_sizes):
        check_positive_int(f"batch_sizes[{index}]", size)
    sizes = list(batch_sizes)
    if not sizes:
        raise ValueError("batch_sizes is empty; give at least one batch size, e.g. [64, 256, 1024]")
    estimator = Estimator.create(
        model, sample, optimizer=optimizer, loss_fn=loss_fn, step_fn=step_fn, steps_per_trial=steps_per_trial,
        input_dtype=input_dtype, sample_size=sample_size, scan_budget=scan_budget, precision=precision, train=train, kernels=kernels,
        cudnn_workspace=cudnn_workspace, sharding=sharding,
    )
    estimates = MemoryEstimates(estimator.estimate(size) for size in sizes)
    logger.debug("estimated %d batch size(s) with %d fake-tensor trace(s)", len(sizes), estimator.calls)
    return estimates
