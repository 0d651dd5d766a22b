"""Fault injection (issue 22): Ctrl-C and errors at every phase of a search, out of memory from the data path, Ctrl-C
inside the memory ledger's accounting of frees and inside the mixed-precision patch.

After every fault the exception arrives with its own type, the user's model (weights, buffers, gradients, modes),
optimizer state and RNG states are bit-for-bit as before, and the simulated GPU holds 0 bytes. Single process; the
whole file runs in seconds.
"""

from __future__ import annotations

import gc
import random
import os
import pathlib
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

import batchfinder as bf
from batchfinder.memory import accounting
from batchfinder.training import precision as precision_module
from tests.helpers import assert_unchanged, snapshot

CAPACITY = "4MiB"


def _data(n: int = 4000) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 32, generator=generator), torch.randint(0, 4, (n,), generator=generator))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def _zeroed(gpu: bf.SimulatedGPU) -> tuple[int, int]:
    """What the simulated GPU holds once everything of the search is garbage and its cache emptied."""
    gc.collect()
    gpu.empty_cache()
    return gpu.memory_allocated(), gpu.memory_reserved()


# -- point 6: out of memory from the data path ------------------------------------------------------------------------
def test_an_oom_raised_by_collate_fn_means_that_size_does_not_fit() -> None:
    def collate(samples: list[Any]) -> Any:  # a collate_fn that moves the batch to a GPU that has room for 300
        if len(samples) > 300:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return default_collate(samples)

    model = _model()
    before = snapshot(model)
    gpu = bf.SimulatedGPU("64MiB")
    result = bf.find_batch_size(model, DataLoader(_data(1000), batch_size=8, collate_fn=collate), device=gpu)
    assert result.max_batch_size == 300
    assert any(not t.fits and "out of memory" in (t.error or "") for t in result.trials)
    assert result.confirmations and result.confirmations[-1].fits
    assert_unchanged(before, model)
    assert _zeroed(gpu) == (0, 0)
    trial = bf.try_batch_size(model, DataLoader(_data(), batch_size=8, collate_fn=collate), 301, device=gpu)
    assert not trial.fits and "out of memory" in (trial.error or "")


def test_an_oom_raised_by_collate_fn_of_varying_samples_counts_in_the_confirmation_too() -> None:
    class Varying(Dataset):
        def __len__(self) -> int:
            return 2000

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.ones(8 + index % 24), index % 4

    calls = {"confirmation": 0}

    def collate(samples: list[Any]) -> Any:
        xs = torch.zeros(len(samples), 32)
        for row, (x, _) in enumerate(samples):
            xs[row, : x.numel()] = x
        # the loader-order batches of the confirmation run out of memory the first time (fragmentation, say)
        if len(samples) > 100 and calls["confirmation"] == 0 and sys._getframe(1).f_code.co_name == "loader_batches":
            calls["confirmation"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return xs, torch.tensor([y for _, y in samples])

    gpu = bf.SimulatedGPU("64MiB")
    result = bf.find_batch_size(_model(), DataLoader(Varying(), batch_size=8, collate_fn=collate), device=gpu, max_batch_size=200)
    assert calls["confirmation"] == 1
    assert not result.confirmations[0].fits and result.confirmations[-1].fits
    assert result.batch_size < result.confirmations[0].batch_size


def test_an_oom_in_the_transfer_to_the_device_means_that_size_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = bf.SimulatedGPU("64MiB")
    original = gpu.to_device

    def to_device(batch: Any) -> Any:
        if isinstance(batch, (list, tuple)) and batch and batch[0].shape[0] > 500:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")
        return original(batch)

    monkeypatch.setattr(gpu, "to_device", to_device)
    result = bf.find_batch_size(_model(), _data(), device=gpu)
    assert result.max_batch_size == 500
    assert _zeroed(gpu) == (0, 0)


# -- point 3: Ctrl-C while the ledger accounts for a free ---------------------------------------------------------------
def _interrupting_frees(monkeypatch: pytest.MonkeyPatch, at: int) -> dict[str, int]:
    """SIGINT at the ``at``-th free the ledger accounts for (as a Ctrl-C arriving then would)."""
    counter = {"frees": 0}
    original = accounting.MemoryLedger._freed

    def freed(self: accounting.MemoryLedger, token: int) -> None:
        counter["frees"] += 1
        if counter["frees"] == at:
            signal.raise_signal(signal.SIGINT)
        original(self, token)

    monkeypatch.setattr(accounting.MemoryLedger, "_freed", freed)
    return counter


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What Python reports as "Exception ignored" (an exception in a finalizer is lost there)."""
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


def test_ctrl_c_at_any_free_arrives_and_leaves_the_device_at_zero(monkeypatch: pytest.MonkeyPatch, unraisable: list[Any]) -> None:
    data = _data(400)  # the search ends at the data set's length: 16, 32, ..., 256, 400 and the confirmation
    fresh = bf.find_batch_size(_model(), data, device=f"sim:{CAPACITY}", confirm_steps=2)
    counter = _interrupting_frees(monkeypatch, at=0)
    bf.find_batch_size(_model(), data, device=f"sim:{CAPACITY}", confirm_steps=2)
    total = counter["frees"]
    assert total > 100
    points = sorted({*range(1, 9), *range(9, total, total // 8), total})
    gpu = bf.SimulatedGPU(CAPACITY)
    for at in points:
        counter = _interrupting_frees(monkeypatch, at)
        model = _model()
        before = snapshot(model)
        with pytest.raises(KeyboardInterrupt):
            bf.find_batch_size(model, data, device=gpu, confirm_steps=2)
        assert counter["frees"] >= at
        assert_unchanged(before, model)
        assert _zeroed(gpu) == (0, 0), f"SIGINT at free {at}"
    assert unraisable == []
    monkeypatch.undo()
    again = bf.find_batch_size(_model(), data, device=gpu, confirm_steps=2)
    assert (again.max_batch_size, again.batch_size) == (fresh.max_batch_size, fresh.batch_size)


def test_a_storage_freed_while_its_id_is_reused_is_not_confused_with_the_new_one() -> None:
    ledger = accounting.MemoryLedger(capacity=None)
    for _ in range(200):
        first = torch.empty(1000)
        ledger.charge([first.untyped_storage()])
        del first  # freed; a storage made now may reuse its id before the ledger settles
        second = torch.empty(10)
        assert not ledger.is_charged(second.untyped_storage())
        ledger.charge([second.untyped_storage()])
        assert ledger.charged_bytes(second.untyped_storage()) == 512
        del second
    assert ledger.allocated == 0


# -- point 4: Ctrl-C while the mixed-precision kernels are registered or removed ---------------------------------------
_PATCH_FUNCTIONS = {"_acquire", "_release", "_undo"}
"""Where the kernels are registered and ``torch.clear_autocast_cache`` patched, and where both are undone (the lines
of ``cuda_autocast_policies`` around them only call these, with Ctrl-C held back)."""


def _interrupt_at_line(at: int) -> Callable[..., Any]:
    """A trace function that sends SIGINT at the ``at``-th line run in the functions that patch and unpatch (the
    registration's first lines included)."""
    count = {"lines": 0, "register": 0}

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            if frame.f_code.co_name == "_register":
                count["register"] += 1
                if count["register"] > 6:
                    return local
            count["lines"] += 1
            if count["lines"] == at:
                signal.raise_signal(signal.SIGINT)
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code.co_filename == precision_module.__file__ and (code.co_name in _PATCH_FUNCTIONS or code.co_name == "_register"):
            return local
        return None

    tracer.count = count  # type: ignore[attr-defined]
    return tracer


def _enter_and_leave() -> None:
    with precision_module.cuda_autocast(torch.bfloat16):
        torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))


def test_ctrl_c_at_any_point_of_entering_or_leaving_mixed_precision_leaves_nothing_patched() -> None:
    original = torch.clear_autocast_cache
    tracer = _interrupt_at_line(0)
    sys.settrace(tracer)
    try:
        _enter_and_leave()
    finally:
        sys.settrace(None)
    total = tracer.count["lines"]  # type: ignore[attr-defined]
    assert total > 20
    interrupted = 0
    for at in range(1, total + 1):
        sys.settrace(_interrupt_at_line(at))
        try:
            _enter_and_leave()
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        assert torch.clear_autocast_cache is original, f"left patched by SIGINT at line {at}"
        assert precision_module._LIBRARY == [], f"kernels left registered by SIGINT at line {at}"
    assert interrupted == total  # every interrupt arrived
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU's own autocast works again
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.bfloat16


def test_a_mixed_precision_search_registers_the_kernels_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"register": 0}
    original = precision_module._register

    def register() -> Any:
        calls["register"] += 1
        return original()

    monkeypatch.setattr(precision_module, "_register", register)
    result = bf.find_batch_size(_model(), _data(), device=f"sim:{CAPACITY}", precision="bf16-mixed", confirm_steps=2)
    assert len(result.trials) > 5
    assert calls["register"] == 1
    assert precision_module._LIBRARY == []


# -- nothing written to disk or left in the environment -------------------------------------------------------------------
_FRESH_PROCESS = """
import os, sys, tempfile
import torch
import batchfinder as bf

def state():
    return dict(os.environ), sorted(os.listdir(tempfile.gettempdir()))

data = torch.utils.data.TensorDataset(torch.randn(300, 16), torch.randint(0, 4, (300,)))
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
before = state()
{call}
after = state()
changed = sorted(k for k in set(before[0]) | set(after[0]) if before[0].get(k) != after[0].get(k))
print("imported dynamo:", "torch._dynamo" in sys.modules)
assert changed == [], changed
assert before[1] == after[1], (before[1], after[1])
"""


@pytest.mark.parametrize(
    "call",
    [
        'bf.find_batch_size(model, data, device="sim:4MiB", max_trials=3, precision="bf16-mixed")',
        pytest.param("bf.estimate_memory(model, data[0][0].shape, batch_size=8)", marks=pytest.mark.slow),
    ],
)
def test_a_search_in_a_fresh_process_leaves_the_environment_and_the_temp_dir_as_they_were(call: str, tmp_path) -> None:
    import subprocess

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS.format(call=call)], env=env, capture_output=True, text=True, timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


# -- point 9: the last small leftovers --------------------------------------------------------------------------------
def test_a_fresh_optimizer_still_warns_about_the_scheduler_order_after_a_search() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    bf.find_batch_size(model, _data(300), optimizer=optimizer, device=f"sim:{CAPACITY}", max_trials=3)
    assert not hasattr(optimizer, "_opt_called")
    with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step\(\)"):
        scheduler.step()


def test_a_spectral_norm_layers_plain_weight_is_put_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(32, 64)), nn.ReLU(), nn.Linear(64, 4))
    model(torch.randn(2, 32))
    weight = model[0].weight
    gpu = bf.SimulatedGPU(CAPACITY)
    bf.find_batch_size(model, _data(300), device=gpu, max_trials=3)
    assert model[0].weight is weight
    assert _zeroed(gpu) == (0, 0)


# -- point 9: the fault-injection suite ---------------------------------------------------------------------------------
class InjectedError(Exception):
    """The error the suite injects (its own type: it must arrive as itself)."""


class Injector:
    """Counts each phase's calls and raises ``error`` at call ``at`` of ``phase``."""

    def __init__(self, phase: str | None = None, at: int = 0, error: type[BaseException] = InjectedError) -> None:
        self.phase, self.at, self.error = phase, at, error
        self.calls: dict[str, int] = {}

    def hit(self, phase: str) -> None:
        self.calls[phase] = self.calls.get(phase, 0) + 1
        if phase == self.phase and self.calls[phase] == self.at:
            raise self.error(f"injected in {phase}, call {self.at}")


class _Data(Dataset):
    def __init__(self, injector: Injector, n: int = 64) -> None:
        self.injector, self.inner = injector, _data(n)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Any:
        self.injector.hit("dataset")  # the first calls are the sample scan's
        x, y = self.inner[index]
        # augmentation that draws from every random generator: none of it may show in the user's RNG states
        noise = 1e-3 * (torch.rand(()).item() + random.random() + float(np.random.rand()))
        return x + noise, y


class _Model(nn.Module):
    def __init__(self, injector: Injector) -> None:
        super().__init__()
        self.injector = injector
        self.body = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.injector.hit("forward")
        out = self.body(x)
        if out.requires_grad:
            out.register_hook(self._backward)
        return out

    def _backward(self, grad: torch.Tensor) -> torch.Tensor:
        self.injector.hit("backward")
        return grad


class _Adam(torch.optim.Adam):
    injector: Injector

    def step(self, closure: Any = None) -> Any:
        self.injector.hit("optimizer step")
        return super().step(closure)


def _pieces(injector: Injector) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, Callable[..., Any]]:
    torch.manual_seed(0)
    model = _Model(injector)
    optimizer = _Adam(model.parameters(), lr=1e-3)
    optimizer.injector = Injector()  # the user's own step, before the search, counts nowhere
    nn.functional.cross_entropy(model.body(torch.randn(8, 32)), torch.randint(0, 4, (8,))).backward()
    optimizer.step()  # the optimizer holds state, the model gradients
    optimizer.injector = injector
    model.eval()  # a mode the search must give back
    data = _Data(injector)

    def collate(samples: list[Any]) -> Any:
        injector.hit("collate")
        return default_collate(samples)

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        injector.hit("loss")
        return nn.functional.cross_entropy(output, target)

    return model, optimizer, DataLoader(data, batch_size=8, collate_fn=collate), loss_fn


def _search(injector: Injector, gpu: bf.SimulatedGPU) -> tuple[nn.Module, torch.optim.Optimizer, Any, Callable[[], Any]]:
    model, optimizer, loader, loss_fn = _pieces(injector)
    return model, optimizer, loader, lambda: bf.find_batch_size(
        model, loader, optimizer=optimizer, loss_fn=loss_fn, device=gpu, confirm_steps=2
    )


def _clean_calls() -> dict[str, int]:
    injector = Injector()
    _search(injector, bf.SimulatedGPU("64MiB"))[3]()
    return injector.calls


_CALLS = _clean_calls()
_PHASES = ("dataset", "collate", "forward", "loss", "backward", "optimizer step")
# Each phase at its first call (the scan for the dataset, the model check for the forward and collate), a middle one
# (a trial) and its last (the confirmation).
_POINTS = [(phase, at) for phase in _PHASES for at in sorted({1, (_CALLS[phase] + 1) // 2, _CALLS[phase]})]


def test_the_suite_reaches_every_phase() -> None:
    assert set(_PHASES) <= set(_CALLS) and all(_CALLS[phase] >= 2 for phase in _PHASES), _CALLS


@pytest.mark.parametrize("error", [KeyboardInterrupt, InjectedError])
@pytest.mark.parametrize(("phase", "at"), _POINTS)
def test_a_fault_in_any_phase_arrives_as_itself_and_changes_nothing(phase: str, at: int, error: type[BaseException]) -> None:
    injector = Injector(phase, at, error)
    gpu = bf.SimulatedGPU("64MiB")
    model, optimizer, _, run = _search(injector, gpu)
    before = snapshot(model, optimizer)
    adam_state_ids = [id(v) for state in optimizer.state.values() for v in state.values()]
    with pytest.raises(error, match=f"injected in {phase}, call {at}"):
        run()
    assert injector.calls[phase] == at
    assert_unchanged(before, model, optimizer)
    assert [id(v) for state in optimizer.state.values() for v in state.values()] == adam_state_ids
    assert not model.training
    assert _zeroed(gpu) == (0, 0)
