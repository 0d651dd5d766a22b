"""Training steps traced under fake tensors: the memory of a step at any batch size, without a GPU or its memory.

:class:`FakeTrainer` runs the very training step a trial runs (``steps`` x forward, loss, backward,
``optimizer.step()``, ``zero_grad(set_to_none=True)``) on *fake* tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``): every operation computes its output's shape, dtype and strides
but no values, and allocates nothing. The storages those operations create and consume are charged to a
:class:`~batchfinder.memory.accounting.MemoryLedger` by the same :class:`~batchfinder.memory.accounting.ChargingMode` the
simulated GPU uses, so the traced peak is, to the byte, the peak a :class:`~batchfinder.SimulatedGPU` measures for
the same step.

The model stays untouched: for one trace each module's ``_parameters`` and ``_buffers`` entry is replaced by a fake
twin (``FakeTensorMode.from_tensor`` for CPU tensors, keeping storage sharing and tied weights; an empty fake CPU
tensor of the same shape, dtype and strides for GPU or ``meta`` tensors) and put back afterwards. Real tensors are
never read or written: no copy of a large model, and a ``meta`` model is estimated without allocating its weights.
Fake tensors are CPU tensors (fake CUDA ones need a GPU). Modes, buffer slots and RNGs: ``TrainingState``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import FakeTensorUnsupportedError, StepContractError, exception_first_line
from ..search.checks import MIN_STEPS_PER_TRIAL
from ..training.batching import describe_batch
from ..training.environment import torch_import_side_effects_contained
from ..training.host import host_side_loading
from ..training.optimizers import OptimizerSpec, state_tensors
from ..training.precision import (
    StepPrecision,
    cast_floating,
    check_precision,
    parameter_dtype,
)
from ..training.state import TrainingState
from ..training.steps import StepFn, run_training_step
from .accounting import ChargingMode, MemoryLedger, round_allocation, tensor_storages
from .allocator import CachingAllocator
from .cudnn import CudnnWorkspace, check_cudnn_workspace
from .kernels import DEFAULT_CAPABILITY, KernelModels, check_kernels
from .fake_support import (
    TORCH_FAKE_TENSOR_LOGGERS,
    is_fake_unsupported,
    quiet_fake_tensor_logs,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = [
    "FakeTrainer", "PeakLedger", "Trace", "StepContractError", "PHASES", "describe_template", "fake_output",
    "quiet_fake_tensor_logs", "is_fake_unsupported", "TORCH_FAKE_TENSOR_LOGGERS",
]

logger = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("setup", "forward", "backward", "optimizer step", "zero_grad")
"""Where in a training step a trace can peak: ``setup`` is the model plus the batch before the first step."""


def _new_fake_mode() -> "FakeTensorMode":
    """A fresh fake-tensor mode (imported on first use: it is not needed to import batchfinder). Its first creation
    imports ``torch._dynamo``, whose marks on disk and in the environment are undone
    (:mod:`batchfinder.training.environment`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch_import_side_effects_contained():
        return FakeTensorMode(allow_non_fake_inputs=True)


@dataclass
class Trace:
    """What one traced run of training steps at one batch size held, in bytes (each storage rounded to 512 B)."""

    batch_size: int
    peak: int
    """Peak of all charged bytes, model included: what the simulated GPU's trial reports as ``peak_bytes``."""
    parameters: int
    buffers: int
    gradients: int
    """Largest amount of gradient memory held at once (all trainable parameters' gradients after backward)."""
    optimizer_state: int
    """Optimizer state after the last step (e.g. Adam's two moments and step counters)."""
    batch: int
    """The batch on the device: inputs and targets."""
    at_peak: dict[str, int]
    """Bytes held at the peak by category; sums to :attr:`peak`. Keys: parameters, buffers, gradients,
    optimizer_state, batch, activations (everything else: activations and temporaries)."""
    peak_phase: str
    """Where the peak happened, e.g. ``"backward (step 2)"``."""
    phase_peaks: dict[str, int]
    """Highest total reached in each phase (``setup``, ``forward``, ``backward``, ``optimizer step``, ``zero_grad``)."""
    exact: dict[str, int] = field(default_factory=dict)
    """Unrounded tensor bytes of parameters, buffers, gradients, optimizer_state and batch."""
    peak_reserved: int = 0
    """Peak bytes the CUDA caching allocator would reserve for the same allocations and frees, in the same order
    (:mod:`batchfinder.memory.allocator`), starting from an empty cache: what a trial on a
    ``SimulatedGPU(..., allocator="caching")`` reports as ``peak_reserved_bytes``."""
    kernels: list[str] = field(default_factory=list)
    """Which kernel models applied (:mod:`batchfinder.memory.kernels`), e.g. ``"attention: memory-efficient (CUDA),
    24 calls"``."""


class PeakLedger(MemoryLedger):
    """A ledger that calls ``on_peak`` each time the running total passes its peak.

    Call :meth:`close` when the trace is over: ``on_peak`` (the recorder's) holds the trace's fake parameters, batch
    and optimizer state, and the recorder holds the ledger; closing breaks that cycle, so that the trace's fake
    tensors and fake mode go as soon as the trace is over instead of at the next full garbage collection.
    """

    def __init__(
        self, on_peak: Callable[[], None] | None, *, workspace_bytes: int = 0, capacity: int | None = None
    ) -> None:
        super().__init__(
            capacity, device_label="fake", allocator=CachingAllocator(capacity), workspace_bytes=workspace_bytes
        )
        self._on_peak = on_peak
        self.max_reserved = 0
        """The highest reserved total of the whole trace (per-phase resets of the peaks leave it alone)."""

    def close(self) -> None:
        """Drop ``on_peak`` (and with it the recorder and the trace's fake tensors); the totals stay readable."""
        self._on_peak = None

    def charge(self, storages: Any) -> int:
        before = self.peak
        added = super().charge(storages)
        self.max_reserved = max(self.max_reserved, self.reserved)
        if self.peak > before and self._on_peak is not None:
            self._on_peak()
        return added


class _FakeConverter:
    """Fake CPU twins of real tensors, one per real tensor (tied weights stay tied); with ``dtype``, floating tensors'
    twins are of that dtype (a ``"16-true"``/``"bf16-true"`` precision)."""

    def __init__(self, mode: FakeTensorMode, dtype: torch.dtype | None = None) -> None:
        self.mode = mode
        self.dtype = dtype
        self.memo: dict[int, torch.Tensor] = {}
        self._keep: list[torch.Tensor] = []  # keeps ids in memo unique while the conversion lives

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        found = self.memo.get(id(tensor))
        if found is not None:
            return found
        cast = self.dtype is not None and tensor.is_floating_point()
        if tensor.device.type == "cpu" and not tensor.is_sparse and not cast:
            fake = self.mode.from_tensor(tensor)
        else:
            dtype = self.dtype if cast else tensor.dtype
            with self.mode:
                fake = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=dtype, device="cpu")
            if isinstance(tensor, nn.Parameter):
                fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
            elif tensor.requires_grad:
                fake.requires_grad_(True)
        self.memo[id(tensor)] = fake
        self._keep.append(tensor)
        return fake


@contextlib.contextmanager
def _fake_module_state(model: nn.Module, convert: _FakeConverter) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Swap every parameter and buffer of ``model`` for its fake twin; yields (fake parameters, fake buffers)."""
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    params: dict[int, torch.Tensor] = {}
    buffers: dict[int, torch.Tensor] = {}
    try:
        for module in model.modules():
            for slots, found in ((module._parameters, params), (module._buffers, buffers)):
                for key, value in list(slots.items()):
                    if value is None:
                        continue
                    fake = convert(value)
                    swapped.append((slots, key, value))
                    slots[key] = fake
                    found.setdefault(id(fake), fake)
        yield list(params.values()), [b for b in buffers.values() if id(b) not in params]
    finally:
        for slots, key, value in reversed(swapped):
            slots[key] = value


def _fake_state_value(value: torch.Tensor, convert: _FakeConverter) -> torch.Tensor:
    """A fake twin of one optimizer-state tensor. Scalars (Adam's step counter) keep their value, as optimizers read
    it with ``.item()``: they are rebuilt with ``torch.tensor`` under the fake mode, which keeps small constants."""
    if value.numel() == 1 and value.device.type != "meta" and not value.requires_grad:
        number = value.detach().cpu().tolist()  # read before entering the fake mode, which would fake it
        with convert.mode:
            return torch.tensor(number, dtype=value.dtype)
    return convert(value)


def _fake_bound_optimizer(optimizer: torch.optim.Optimizer, convert: _FakeConverter) -> torch.optim.Optimizer:
    """A shallow twin of the user's optimizer over the fake parameters, with its existing state made fake."""
    twin = copy.copy(optimizer)
    twin.param_groups = [{**group, "params": [convert(p) for p in group["params"]]} for group in optimizer.param_groups]
    state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
    for param, entries in optimizer.state.items():
        state[convert(param)] = {
            key: _fake_state_value(value, convert) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for key, value in entries.items()
        }
    twin.state = state
    return twin


def _batch_of(template: Any, batch_size: int, mode: FakeTensorMode) -> Any:
    """A fake batch of ``batch_size`` shaped like ``template`` (a collated batch of one sample)."""
    with mode:
        return _grow(template, batch_size)


def _is_plain_leaf(value: Any) -> bool:
    return not isinstance(value, (torch.Tensor, Mapping, list, tuple))


def _grow(value: Any, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return torch.empty((), dtype=value.dtype)
        return torch.empty((batch_size, *value.shape[1:]), dtype=value.dtype)
    if isinstance(value, Mapping):
        items = {key: _grow(item, batch_size) for key, item in value.items()}
        try:
            return type(value)(items)
        except TypeError:
            return items
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple
        return type(value)(*(_grow(item, batch_size) for item in value))
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and _is_plain_leaf(value[0]):
            return list(value) * batch_size  # e.g. strings, which default_collate keeps as a list per batch
        return type(value)(_grow(item, batch_size) for item in value)
    return value


def describe_template(template: Any, batch_size: int | str = "B") -> str:
    """The structure of a batch built from ``template``, e.g. ``(Tensor[B, 1, 28, 28] float32, Tensor[B] int64)``."""
    return describe_batch(template, batch_size)


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(rounded, exact) bytes of the distinct storages of ``tensors``."""
    storages = {id(s): s for s in tensor_storages(list(tensors))}
    exact = sum(s.nbytes() for s in storages.values())
    return sum(round_allocation(s.nbytes()) for s in storages.values()), exact


class FakeTrainer:
    """Traces training steps of ``model`` on fake batches shaped like ``template`` (a collated batch of one sample).

    Args:
        model: the user's model; it is left exactly as it was (see the module documentation).
        template: a collated batch of one sample (leading dimension 1), e.g. ``default_collate([dataset[0]])``.
        optimizer: how to create the optimizer (as the trials do).
        step: ``step(model, batch) -> loss``, the trials' forward pass and loss.
        steps: training steps per trace (at least 2, as per trial: Adam creates its state at the first step).
        workspace_bytes: cuBLAS's workspace, charged twice (the forward and the backward pass's handles) right after
            the model, as on a ``SimulatedGPU.like(...)`` (0: none).
        allocator_capacity: the capacity of the modelled caching allocator (None: unlimited). With a capacity the
            allocator releases its cache and retries where a GPU of that size would, and a trace that would not fit
            raises ``torch.OutOfMemoryError`` as the trial would.
        train: False traces inference as ``find_batch_size(..., train=False)`` runs it: ``step(model, batch) ->
            output`` (``optimizer`` None) in eval mode under ``torch.inference_mode()``, as the trials run it (a
            mixed-precision trace with CUDA's attention under ``torch.no_grad()`` held more than the trial), each step's
            batch moved before the last is dropped and each output kept until the next one is computed.
        kernels: ``"cuda"`` (default): attention and optimizer steps as CUDA's kernels allocate them, on a GPU of
            compute capability ``compute_capability`` (:mod:`batchfinder.memory.kernels`); ``"cpu"``: the CPU's.
        cudnn_workspace: what convolutions charge as cuDNN's workspace with ``kernels="cuda"``
            (:mod:`batchfinder.memory.cudnn`); None: that of an enclosing ``cudnn_workspace()`` block, else ``"auto"``.
    """

    def __init__(
        self,
        model: nn.Module,
        template: Any,
        optimizer: OptimizerSpec,
        step: StepFn,
        *,
        steps: int = MIN_STEPS_PER_TRIAL,
        workspace_bytes: int = 0,
        allocator_capacity: int | None = None,
        precision: str = "32-true",
        train: bool = True,
        kernels: str = "cuda",
        compute_capability: tuple[int, int] = DEFAULT_CAPABILITY,
        cudnn_workspace: CudnnWorkspace | None = None,
    ) -> None:
        self.model = model
        self.train = train
        self.kernels = check_kernels(kernels)
        self.cudnn_workspace = None if cudnn_workspace is None else check_cudnn_workspace(cudnn_workspace)
        self.compute_capability = tuple(compute_capability)
        self.precision = check_precision(precision)
        dtype = parameter_dtype(self.precision)
        self.template = template if dtype is None else cast_floating(template, dtype)
        self.param_dtype = dtype
        self.optimizer = optimizer
        self.step = step
        self.steps = steps
        self.workspace_bytes = workspace_bytes
        self.allocator_capacity = allocator_capacity
        self.calls = 0
        self.kernel_notes: list[str] = []
        """Which kernel models applied in the latest trace or recording (:mod:`batchfinder.memory.kernels`)."""

    # -- public --------------------------------------------------------------------------------------------------
    def peak(self, batch_size: int) -> int:
        """The peak of ``steps`` training steps at ``batch_size`` (bytes, model included)."""
        return self.trace(batch_size, breakdown=False).peak

    def trace(self, batch_size: int, *, breakdown: bool = True) -> Trace:
        """Trace the training steps at ``batch_size``; with ``breakdown`` also classify what is held at the peak.

        Raises :class:`FakeTensorUnsupportedError` when the step cannot run on fake tensors, and re-raises what the
        model raised otherwise (the caller turns that into an error about the sample).
        """
        state = TrainingState.capture(self.model, values=False)
        try:
            with torch.enable_grad(), quiet_fake_tensor_logs():
                return self._trace(batch_size, breakdown)
        except (FakeTensorUnsupportedError, StepContractError):
            raise
        except Exception as exc:
            if is_fake_unsupported(exc):
                raise FakeTensorUnsupportedError(
                    f"the model's training step cannot run under fake tensors ({type(exc).__name__}: "
                    f"{exception_first_line(exc)}). The estimator runs the step without computing any values, so "
                    "code that reads tensor values (.item(), .tolist(), `if tensor:`, data-dependent shapes such as "
                    "x[mask] or nonzero(), NumPy conversions) cannot be traced. Use the real search instead: "
                    "batchfinder.find_batch_size(model, dataset, device=...) (on a GPU, or a SimulatedGPU on the CPU)."
                ) from exc
            raise
        finally:
            state.restore(final=True)

    # -- the trace ---------------------------------------------------------------------------------------------------
    def _trace(self, batch_size: int, breakdown: bool) -> Trace:
        self.calls += 1
        mode = _new_fake_mode()
        convert = _FakeConverter(mode, self.param_dtype)
        recorder = _Recorder(breakdown)
        ledger = PeakLedger(recorder.on_peak, workspace_bytes=self.workspace_bytes, capacity=self.allocator_capacity)
        recorder.ledger = ledger
        try:
            return self._trace_steps(batch_size, mode, convert, recorder, ledger)
        finally:
            ledger.close()  # the trace's fake tensors go now (see PeakLedger)

    def trace_steps_with(self, ledger: PeakLedger, step_sizes: Sequence[int]) -> None:
        """Trace the steps into ``ledger`` (one that logs its allocations), step ``i`` at ``step_sizes[i]``: for
        :func:`batchfinder.memory.replay.record`. Raises what the trace raised."""
        self.calls += 1
        state = TrainingState.capture(self.model, values=False)
        mode = _new_fake_mode()
        recorder = _Recorder(False)
        recorder.ledger = ledger
        try:
            with torch.enable_grad(), quiet_fake_tensor_logs():
                self._trace_steps(step_sizes[0], mode, _FakeConverter(mode, self.param_dtype), recorder, ledger, step_sizes)
        finally:
            ledger.close()
            state.restore(final=True)

    def _trace_steps(
        self,
        batch_size: int,
        mode: FakeTensorMode,
        convert: _FakeConverter,
        recorder: _Recorder,
        ledger: PeakLedger,
        step_sizes: Sequence[int] | None = None,
    ) -> Trace:
        with _fake_module_state(self.model, convert) as (params, buffers):
            bound = self.optimizer.bound if self.optimizer is not None else None
            optimizer: torch.optim.Optimizer | None = None
            if bound is not None:
                optimizer = _fake_bound_optimizer(bound, convert)
            recorder.params, recorder.buffers = params, buffers
            resident = [*params, *buffers]
            if optimizer is not None:
                resident += state_tensors(optimizer)
            ledger.charge(tensor_storages(resident))  # the model (and existing optimizer state) on the device
            ledger.charge_workspace("forward")  # cuBLAS's workspaces, as a GPU-shaped device holds them from the start
            ledger.charge_workspace("backward")
            batch = _batch_of(self.template, batch_size, mode)
            recorder.batch = [leaf for leaf in tree_flatten(batch)[0] if isinstance(leaf, torch.Tensor)]
            if not self.train:
                return self._trace_inference(batch_size, mode, recorder, ledger)
            with mode, ChargingMode(ledger), self._kernel_models() as models:
                recorder.kernel_models = models
                recorder.enter("setup", 0)
                if optimizer is None:
                    optimizer = self.optimizer.create()
                recorder.optimizer = optimizer
                with getattr(ledger, "scaling", lambda _size: contextlib.nullcontext())(batch_size):
                    ledger.charge(tensor_storages(batch))  # the batch's transfer to the device
                self.model.train()
                precision = StepPrecision(self.precision, "cpu", tracing=True)
                for index in range(1, self.steps + 1):
                    if step_sizes is not None and step_sizes[index - 1] != batch_size:
                        batch_size = step_sizes[index - 1]
                        batch = self._other_batch(batch_size, mode, ledger)
                    run_training_step(
                        self.model, batch, self.step, optimizer, recorder.phase_hook(index), check=True,
                        precision=precision,
                    )
                recorder.enter("done", self.steps)
            self.kernel_notes = models.describe()
            return recorder.result(batch_size)


    def _trace_inference(self, batch_size: int, mode: FakeTensorMode, recorder: "_Recorder", ledger: PeakLedger) -> Trace:
        """``steps`` forward passes at ``batch_size``, as an inference loop runs them: see ``train`` in the class
        documentation."""
        autocast = StepPrecision(self.precision, "cpu", tracing=True).autocast
        batch: Any = None
        output: Any = None
        with mode, ChargingMode(ledger), self._kernel_models() as models, torch.inference_mode():
            recorder.kernel_models = models
            recorder.enter("setup", 0)
            self.model.eval()
            for index in range(1, self.steps + 1):
                with host_side_loading():
                    following = _batch_of(self.template, batch_size, mode)
                ledger.charge(tensor_storages(following))  # its transfer, while the last batch and output are held
                recorder.batch = [leaf for leaf in tree_flatten(following)[0] if isinstance(leaf, torch.Tensor)]
                batch, following = following, None
                recorder.enter("forward", index)
                with autocast():
                    output = self.step(self.model, batch)
            recorder.enter("done", self.steps)
            del output, batch
        self.kernel_notes = models.describe()
        return recorder.result(batch_size)

    def _kernel_models(self) -> KernelModels:
        return KernelModels(self.kernels, self.compute_capability, self.cudnn_workspace)

    def _other_batch(self, batch_size: int, mode: FakeTensorMode, ledger: PeakLedger) -> Any:
        """A batch of another size for the later steps of a recording: on the device, not in its log (a trial reuses
        one batch)."""
        with host_side_loading():
            batch = _batch_of(self.template, batch_size, mode)
        with ledger.paused():  # type: ignore[attr-defined]
            ledger.charge(tensor_storages(batch))
        return batch


def fake_output(model: nn.Module, template: Any) -> Any:
    """The output of ``model`` (in train mode, without grad) for a fake batch of 2 shaped like ``template``.

    Runs on fake tensors like a trace, so it costs nothing and leaves the model as it was.
    """
    mode = _new_fake_mode()
    convert = _FakeConverter(mode)
    state = TrainingState.capture(model, values=False)
    try:
        with quiet_fake_tensor_logs(), _fake_module_state(model, convert):
            fake = _batch_of(template, 2, mode)
            with mode, torch.no_grad():
                model.train()
                if isinstance(fake, Mapping):
                    return model(**fake)
                if isinstance(fake, (tuple, list)):
                    return model(fake[0])
                return model(fake)
    finally:
        state.restore(final=True)


class _Recorder:
    """Follows a trace: phase peaks, the breakdown at the overall peak, full gradient and optimizer-state sizes."""

    def __init__(self, breakdown: bool) -> None:
        self.breakdown = breakdown
        self.ledger: MemoryLedger | None = None
        self.params: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self.batch: list[torch.Tensor] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.phase = "setup"
        self.index = 0
        self.phase_peaks: dict[str, int] = {}
        self.best = 0
        self.best_phase = "setup"
        self.best_split: dict[str, int] = {}
        self.gradients = 0
        self.gradients_exact = 0
        self.kernel_models: KernelModels | None = None

    def _require_ledger(self) -> MemoryLedger:
        if self.ledger is None:  # pragma: no cover - wiring error
            raise RuntimeError("recorder has no ledger")
        return self.ledger

    def phase_hook(self, index: int) -> Callable[[str], None]:
        """The ``on_phase`` hook of training step ``index`` (gradients are complete when the optimizer step starts)."""

        def enter(phase: str) -> None:
            if phase == "optimizer step":
                self.gradients_done()
            self.enter(phase, index)

        return enter

    def enter(self, phase: str, index: int) -> None:
        ledger = self._require_ledger()
        self._close_phase()
        mark = getattr(ledger, "mark_phase", None)  # a ledger that logs its allocations (batchfinder.memory.replay)
        if mark is not None:
            mark(phase, index)
        self.phase, self.index = phase, index
        ledger.reset_peak()  # per-phase peaks; the overall peak is kept here
        self._open = ledger.allocated

    def _close_phase(self) -> None:
        ledger = self._require_ledger()
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), ledger.peak)

    def on_peak(self) -> None:
        ledger = self._require_ledger()
        if ledger.peak <= self.best:
            return
        self.best = ledger.peak
        self.best_phase = self.phase if self.phase == "setup" else f"{self.phase} (step {self.index})"
        if self.breakdown:
            self.best_split = self._split(ledger)

    def _charged(self, tensors: Sequence[torch.Tensor]) -> int:
        ledger = self._require_ledger()
        storages = {id(s): s for s in tensor_storages(list(tensors))}
        return sum(ledger.charged_bytes(s) for s in storages.values())

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def _state(self) -> list[torch.Tensor]:
        return state_tensors(self.optimizer) if self.optimizer is not None else []

    def _split(self, ledger: MemoryLedger) -> dict[str, int]:
        split = {
            "parameters": self._charged(self.params),
            "buffers": self._charged(self.buffers),
            "gradients": self._charged(self._grads()),
            "optimizer_state": self._charged(self._state()),
            "batch": self._charged(self.batch),
        }
        split["activations"] = ledger.allocated - sum(split.values())
        return split

    def gradients_done(self) -> None:
        grads = self._grads()
        rounded, exact = _tensor_bytes(grads)
        if rounded > self.gradients:
            self.gradients, self.gradients_exact = rounded, exact

    def result(self, batch_size: int) -> Trace:
        params, params_exact = _tensor_bytes(self.params)
        buffers, buffers_exact = _tensor_bytes(self.buffers)
        state, state_exact = _tensor_bytes(self._state())
        batch, batch_exact = _tensor_bytes(self.batch)
        split = self.best_split if self.breakdown else {}
        return Trace(
            batch_size=batch_size,
            peak=self.best,
            parameters=params,
            buffers=buffers,
            gradients=self.gradients,
            optimizer_state=state,
            batch=batch,
            at_peak=split,
            peak_phase=self.best_phase,
            phase_peaks={k: v for k, v in self.phase_peaks.items() if k != "done"},
            exact={
                "parameters": params_exact,
                "buffers": buffers_exact,
                "gradients": self.gradients_exact,
                "optimizer_state": state_exact,
                "batch": batch_exact,
            },
            peak_reserved=self.ledger.max_reserved if isinstance(self.ledger, PeakLedger) else 0,
            kernels=self.kernel_models.describe() if self.kernel_models is not None else [],
        )
