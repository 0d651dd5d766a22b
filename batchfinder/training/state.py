"""Snapshots of a user's training state, so that a search leaves no trace: the one snapshot/restore mechanism.

:class:`TrainingState` captures, in host memory, everything a trial may change: parameter and buffer values,
gradients, the optimizer's per-parameter state and hyperparameters, every module's train/eval flag, and the RNG
states of torch (CPU and, when initialised, CUDA), Python's ``random`` and NumPy. :meth:`TrainingState.restore`
puts it all back bit for bit, writing into the existing tensors so that references held elsewhere (an optimizer's
parameter list, a scheduler) stay valid.

Front ends add what their framework keeps besides (a learning-rate scheduler, a gradient scaler, metric states,
Python attributes of the modules) as *extras*: any object with a ``restore()`` method (:class:`Snapshot`), captured
with the rest and restored with it. :class:`AttributeSnapshot` and :class:`StateDictSnapshot` cover most cases.
"""

from __future__ import annotations

import contextlib
import copy
import random
import signal
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .host import host_side_loading

__all__ = [
    "TrainingState",
    "RngState",
    "Snapshot",
    "AttributeSnapshot",
    "StateDictSnapshot",
    "deferred_interrupts",
    "preserved_rng",
]


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the duration of the block and deliver it afterwards.

    Used around restoring the user's state, so that an interrupt cannot leave it half restored. Outside the main
    thread (where signal handlers cannot be changed) the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, object]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(*received[0])
        elif received and previous == signal.default_int_handler:
            raise KeyboardInterrupt


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _copy_into(target: torch.Tensor, saved: torch.Tensor) -> None:
    with torch.no_grad():
        target.copy_(saved)


class Snapshot(Protocol):
    """Something captured now that :meth:`restore` puts back later."""

    def restore(self) -> None:
        """Put the captured state back."""


def copy_value(value: Any) -> Any:
    """An independent copy of ``value`` (a tensor is cloned); an object that cannot be copied is kept by reference."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - restored by reference
        return value


def _copy_containers(value: Any) -> Any:
    """A copy of nested lists, dicts and sets whose leaves are the very same objects."""
    if isinstance(value, list):
        return [_copy_containers(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy_containers(v) for k, v in value.items()}
    if isinstance(value, set):
        return set(value)
    return value


def _restore_container(live: Any, saved: Any) -> Any:
    """Put ``saved`` contents back into ``live`` in place (references held elsewhere see them); returns the object
    to keep."""
    if isinstance(live, list) and isinstance(saved, list):
        live[:] = saved
    elif isinstance(live, dict) and isinstance(saved, dict):
        live.clear()
        live.update(saved)
    elif isinstance(live, set) and isinstance(saved, set):
        live.clear()
        live.update(saved)
    else:
        return saved
    return live


class AttributeSnapshot:
    """An object's own attributes (``vars(owner)``), put back on :meth:`restore`.

    By default (``deep=False``) a rebound attribute gets its original object back, a list, dict or set its original
    contents (the same objects, in place), and attributes added since are removed. With ``deep=True`` every value is
    copied (tensors cloned) and restored as a copy, for objects whose values change in place (a gradient scaler's
    scale tensor). ``only`` restricts the snapshot to those attribute names (attributes added since are then left
    alone); ``exclude`` leaves names out.
    """

    def __init__(
        self, owner: Any, *, exclude: Collection[str] = (), only: Collection[str] | None = None, deep: bool = False
    ) -> None:
        self.owner = owner
        self.exclude = frozenset(exclude)
        self.only = None if only is None else frozenset(only)
        self.deep = deep
        self.saved = {
            key: (value, copy_value(value) if deep else _copy_containers(value))
            for key, value in vars(owner).items()
            if self._covers(key)
        }

    def _covers(self, key: str) -> bool:
        return key not in self.exclude and (self.only is None or key in self.only)

    def restore(self) -> None:
        live = vars(self.owner)
        if self.only is None:
            for key in [k for k in live if k not in self.saved and self._covers(k)]:
                del live[key]
        for key, (original, saved) in self.saved.items():
            live[key] = copy_value(saved) if self.deep else _restore_container(original, saved)


class StateDictSnapshot:
    """An object with ``state_dict()``/``load_state_dict()`` (a learning-rate scheduler), deep-copied."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.saved = copy.deepcopy(owner.state_dict())

    def restore(self) -> None:
        self.owner.load_state_dict(copy.deepcopy(self.saved))


SnapshotFactory = Callable[[], Snapshot]
"""Captures one extra piece of state when called (e.g. ``lambda: StateDictSnapshot(scheduler)``)."""


@dataclass
class RngState:
    """The random number generator states a training step may advance."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    python: Any
    numpy: Any

    @classmethod
    def capture(cls) -> "RngState":
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        numpy_state = None
        try:
            import numpy

            numpy_state = numpy.random.get_state()
        except ImportError:  # NumPy is optional
            pass
        return cls(torch.get_rng_state(), cuda_states, random.getstate(), numpy_state)

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            import numpy

            numpy.random.set_state(self.numpy)


@contextlib.contextmanager
def preserved_rng() -> Iterator[RngState]:
    """Capture the RNG states (torch on every initialised device, Python's ``random``, NumPy) on entry and put them
    back on every exit, Ctrl-C included (held back while they are put back).

    Wraps everything of the user's that the library runs outside a trial session: building a batch source (the
    sample scan calls ``dataset[i]``, whose augmentation may draw random numbers), loading samples, collating.
    Nestable: an inner block restores what it found, the outer one what it found.
    """
    saved = RngState.capture()
    try:
        yield saved
    finally:
        with deferred_interrupts():
            saved.restore()


_FLAGS = ("_opt_called",)
"""Optimizer attributes a trial's steps set: ``_opt_called``, which a learning-rate scheduler's wrapper of
``optimizer.step`` sets (``torch/optim/lr_scheduler.py``) and reads to warn about ``scheduler.step()`` called before
``optimizer.step()``; a fresh optimizer must still warn after a search."""


@dataclass
class _OptimizerState:
    optimizer: torch.optim.Optimizer
    state: dict[torch.Tensor, dict[str, Any]]
    devices: dict[tuple[int, str], torch.device]
    hyperparameters: list[dict[str, Any]]
    flags: dict[str, Any] = field(default_factory=dict)
    """The attributes of :data:`_FLAGS` the optimizer had (absent ones are deleted again on restore)."""

    @classmethod
    def capture(cls, optimizer: torch.optim.Optimizer) -> "_OptimizerState":
        state: dict[torch.Tensor, dict[str, Any]] = {}
        devices: dict[tuple[int, str], torch.device] = {}
        for param, entries in optimizer.state.items():
            saved: dict[str, Any] = {}
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    saved[key] = _host_copy(value)
                    devices[(id(param), key)] = value.device
                else:
                    saved[key] = copy.deepcopy(value)
            state[param] = saved
        hyperparameters = [
            {key: copy.deepcopy(value) for key, value in group.items() if key != "params"} for group in optimizer.param_groups
        ]
        flags = {name: getattr(optimizer, name) for name in _FLAGS if hasattr(optimizer, name)}
        return cls(optimizer, state, devices, hyperparameters, flags)

    def restore(self, *, final: bool = True) -> None:
        """Put the state back; between trials (``final=False``) a tensor cast meanwhile (true half precision casts
        the state with the parameters) keeps its dtype and gets the saved values cast."""
        live = self.optimizer.state
        for param in [p for p in live if p not in self.state]:
            del live[param]
        for param, saved in self.state.items():
            entries = live[param]
            for key in [k for k in entries if k not in saved]:
                del entries[key]
            for key, value in saved.items():
                current = entries.get(key)
                if isinstance(value, torch.Tensor):
                    if (
                        isinstance(current, torch.Tensor)
                        and current.shape == value.shape
                        and (current.dtype == value.dtype or not final)
                    ):
                        _copy_into(current, value)
                    else:
                        entries[key] = value.to(self.devices[(id(param), key)], copy=True)
                else:
                    entries[key] = copy.deepcopy(value)
        for group, saved_group in zip(self.optimizer.param_groups, self.hyperparameters):
            for key in [k for k in group if k != "params" and k not in saved_group]:
                del group[key]
            group.update(copy.deepcopy(saved_group))
        for name in _FLAGS:
            if name in self.flags:
                setattr(self.optimizer, name, self.flags[name])
            elif name in vars(self.optimizer):
                delattr(self.optimizer, name)


@dataclass
class TrainingState:
    """Everything a trial may change in a user's model, optimizer and random generators."""

    model: nn.Module
    values: list[tuple[torch.Tensor, torch.Tensor]]
    gradients: list[tuple[nn.Parameter, torch.Tensor | None, torch.device | None]]
    training_flags: list[tuple[nn.Module, bool]]
    buffer_slots: list[tuple[nn.Module, str, torch.Tensor | None]]
    rng: RngState
    optimizers: list[_OptimizerState] = field(default_factory=list)
    extras: list[Snapshot] = field(default_factory=list)
    tensor_attributes: list[tuple[nn.Module, dict[str, torch.Tensor]]] = field(default_factory=list)
    """Plain tensor attributes of modules (neither parameters nor buffers), by reference: ``spectral_norm``'s
    ``weight``, recomputed by a forward pre-hook, must not keep the last trial's value (and its device memory)."""

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer] | None = None,
        *,
        values: bool = True,
        extras: Sequence[SnapshotFactory] = (),
    ) -> "TrainingState":
        """Copy the state of ``model`` and ``optimizers`` (and each of ``extras``) to host memory.

        With ``values=False`` tensor values and gradients are not copied (for code that never touches them, such as
        a trace on fake twins of the parameters): only modes, buffer slots, optimizers and RNG states are kept.
        Snapshots are host memory: a :class:`~batchfinder.SimulatedGPU` active around the call charges nothing.
        """
        with host_side_loading():
            return cls._capture(model, optimizers, values=values, extras=extras)

    @classmethod
    def _capture(
        cls,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer] | None = None,
        *,
        values: bool = True,
        extras: Sequence[SnapshotFactory] = (),
    ) -> "TrainingState":
        tensors: dict[int, torch.Tensor] = {}
        for tensor in (*model.parameters(), *model.buffers()):
            tensors.setdefault(id(tensor), tensor)
        copies = [(t, _host_copy(t)) for t in tensors.values()] if values else []
        gradients = [
            (p, None if p.grad is None else _host_copy(p.grad), None if p.grad is None else p.grad.device)
            for p in model.parameters()
        ] if values else []
        flags = [(m, m.training) for m in model.modules()]
        slots = [(m, key, value) for m in model.modules() for key, value in m._buffers.items()]
        return cls(
            model=model,
            values=copies,
            gradients=gradients,
            training_flags=flags,
            buffer_slots=slots,
            rng=RngState.capture(),
            optimizers=[_OptimizerState.capture(o) for o in optimizers or []],
            extras=[factory() for factory in extras],
            tensor_attributes=[(m, _tensor_attributes(m)) for m in model.modules()],
        )

    def clear_gradients(self) -> None:
        """Drop every gradient (trials start from none, as after ``zero_grad(set_to_none=True)``)."""
        for param, _, _ in self.gradients:
            param.grad = None

    def restore(self, *, final: bool = True) -> None:
        """Put every captured value back.

        Between trials (``final=False``) gradients stay cleared and buffer slots keep the tensors the device placed
        there; the final restore also puts back the original gradients and any buffer a module replaced.
        """
        with host_side_loading():
            self._restore(final)

    def _restore(self, final: bool) -> None:
        if final:
            for module, key, value in self.buffer_slots:
                if module._buffers.get(key) is not value:
                    module._buffers[key] = value
        for tensor, saved in self.values:
            _copy_into(tensor, saved)
        for param, saved_grad, device in self.gradients:
            if final and saved_grad is not None:
                param.grad = saved_grad.to(device if device is not None else param.device, copy=True)
            else:
                param.grad = None
        for module, flag in self.training_flags:
            module.training = flag
        for module, attributes in self.tensor_attributes:
            live = vars(module)
            for key in [k for k, v in live.items() if isinstance(v, torch.Tensor) and k not in attributes]:
                del live[key]
            live.update(attributes)
        for optimizer_state in self.optimizers:
            optimizer_state.restore(final=final)
        for extra in self.extras:
            extra.restore()
        self.rng.restore()


def _tensor_attributes(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value for key, value in vars(module).items() if isinstance(value, torch.Tensor)}
