"""The finders compared, each driving the same model, data, optimizer and training step on the same device.

* batchfinder ``find_batch_size`` in every mode of ``batchfinder.engine.modes.MODES`` that the benchmark knows
  (``binsearch``, ``power`` and ``guided``), with the library's defaults;
* Lightning ``Tuner.scale_batch_size`` with ``mode="binsearch"`` and ``mode="power"`` and its defaults (start 2,
  3 steps per trial, at most 25 trials, ``max_val`` 8192, a 5% margin in binsearch), on a LightningModule with a
  ``batch_size`` attribute whose ``training_step`` is the shared step;
* Accelerate ``find_executable_batch_size`` with its default start of 128 (x0.9 after each out-of-memory error)
  around a training function that runs :data:`ACCELERATE_STEPS` optimizer steps at the size it is given.

Every training step is counted by wrapping the shared step function, and every finder is timed from the moment it
is called to the moment it returns, on a fresh copy of the model.

What data a finder gets is a :class:`FinderData`: a map-style dataset, the ``collate_fn`` its loaders use and whether
they shuffle (with a seeded generator). A plain dataset stands for ``FinderData(dataset)``: no collate function, no
shuffling, and batchfinder gets the dataset itself (``benchmarks.compare``). With a collate function or shuffling
(``benchmarks.survival``) batchfinder gets ``DataLoader(dataset, batch_size=1, shuffle=..., collate_fn=...)``, and
Lightning's ``train_dataloader`` and Accelerate's training function build the same loader at the size they try.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import batchfinder as bf
from batchfinder.engine.modes import MODES

from .devices import BenchDevice
from .workloads import make_optimizer, training_step

__all__ = [
    "TrialRecord",
    "FinderRun",
    "Finder",
    "FinderData",
    "ModelSource",
    "StepCounter",
    "as_finder_data",
    "available_finders",
    "ACCELERATE_STEPS",
    "ACCELERATE_START",
]

ACCELERATE_START = 128
"""Accelerate's default ``starting_batch_size``."""
ACCELERATE_STEPS = 2
"""Optimizer steps the Accelerate training function runs per attempt (two, so that Adam's state is allocated)."""


class ModelSource(Protocol):
    """What a finder needs of a workload: an identical fresh model for every finder."""

    def build_model(self, seed: int = 0) -> nn.Module:
        """The model, with weights drawn from ``seed``."""
        ...


Collate = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class FinderData:
    """The data every finder is given, and how their loaders batch it."""

    dataset: Dataset
    """A map-style dataset."""
    collate_fn: Collate | None = None
    """The loaders' ``collate_fn`` (None: PyTorch's default collation)."""
    shuffle: bool = False
    """Whether the loaders shuffle; each loader then gets ``torch.Generator().manual_seed(seed)``."""
    seed: int = 0

    def loader(self, batch_size: int) -> DataLoader:
        """The loader a user would train with at ``batch_size`` (a fresh seeded generator when it shuffles)."""
        generator = torch.Generator().manual_seed(self.seed) if self.shuffle else None
        return DataLoader(
            self.dataset, batch_size=batch_size, shuffle=self.shuffle, collate_fn=self.collate_fn, generator=generator
        )

    def for_batchfinder(self) -> Dataset | DataLoader:
        """What ``bf.find_batch_size`` gets: the dataset itself for plain data, else a loader of batch size 1."""
        if self.collate_fn is None and not self.shuffle:
            return self.dataset
        return self.loader(1)


DataLike = Union[Dataset, FinderData]


def as_finder_data(data: DataLike) -> FinderData:
    """``data`` as a :class:`FinderData` (a plain dataset: no collate function, no shuffling)."""
    return data if isinstance(data, FinderData) else FinderData(data)


@dataclass
class TrialRecord:
    """One batch size a finder tried."""

    batch_size: int
    steps: int = 0
    """Training steps started at this size (calls of the step function)."""
    completed: int = 0
    """Training steps that finished (forward, backward, optimizer step)."""
    fits: bool | None = None


@dataclass
class FinderRun:
    """What one finder did and returned."""

    finder: str
    library: str
    mode: str
    returned: int | None = None
    """The batch size the finder returned (batchfinder: ``max_batch_size``; Lightning: after its margin)."""
    largest_fit_tried: int | None = None
    """Largest size the finder itself ran without running out of memory."""
    recommended: int | None = None
    """batchfinder only: ``floor(0.8 x max_batch_size)``."""
    trials: list[TrialRecord] = field(default_factory=list)
    steps: int = 0
    """Training steps started (calls of the wrapped step function on real tensors, batchfinder's probe included)."""
    traced_steps: int = 0
    """Calls of the step function under fake tensors (memory estimates: nothing computed), not in :attr:`steps`."""
    seconds: float = 0.0
    error: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    """Finder-specific figures (batchfinder: its data scan and confirmation runs), JSON-ready."""

    @property
    def num_trials(self) -> int:
        return len(self.trials)

    @property
    def num_ooms(self) -> int:
        return sum(1 for t in self.trials if t.fits is False)

    @property
    def returned_was_tried(self) -> bool:
        """True when the finder itself ran the size it returned without running out of memory."""
        return any(t.batch_size == self.returned and t.fits for t in self.trials)


class StepCounter:
    """Wraps the shared training step and counts its calls, per trial."""

    def __init__(self, step: Callable[[nn.Module, Any], torch.Tensor] = training_step) -> None:
        self._step = step
        self.calls = 0
        self.traced = 0
        """Calls under fake tensors (e.g. batchfinder's guided mode estimating memory): not training steps."""
        self.trials: list[TrialRecord] = []

    def begin(self, batch_size: int) -> None:
        """A new trial at ``batch_size`` starts."""
        self.trials.append(TrialRecord(batch_size))

    def complete(self) -> None:
        """The current trial finished one step."""
        if self.trials:
            self.trials[-1].completed += 1

    def settle(self) -> None:
        """Mark each trial as fitting when every step it started finished (a step that ran out of memory started
        but never finished; a trial may run fewer steps than asked when the epoch has fewer batches)."""
        for trial in self.trials:
            trial.fits = trial.steps > 0 and trial.completed >= trial.steps

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if _is_fake(batch):  # traced under fake tensors (an estimate): nothing is computed or allocated
            self.traced += 1
            return self._step(model, batch)
        self.calls += 1
        if self.trials:
            self.trials[-1].steps += 1
        return self._step(model, batch)


def _is_fake(batch: Any) -> bool:
    """True when the batch holds fake tensors (a memory estimate tracing the step, not a training step)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._pytree import tree_leaves

    return any(isinstance(leaf, FakeTensor) for leaf in tree_leaves(batch))


@dataclass(frozen=True)
class Finder:
    """A named way to find a batch size: ``run(workload, device, data, seed) -> FinderRun``.

    ``data`` is a dataset or a :class:`FinderData`.
    """

    name: str
    library: str
    mode: str
    run: Callable[[ModelSource, BenchDevice, DataLike, int], FinderRun]


def _batchfinder_details(result: bf.SearchResult) -> dict[str, Any]:
    """batchfinder's data scan and confirmation runs, when the installed version reports them."""
    details: dict[str, Any] = {}
    scan = getattr(result, "data_scan", None)
    if scan is not None:
        details["data_scan"] = {
            "describe": scan.describe(),
            **{key: getattr(scan, key, None) for key in ("scanned", "total", "varies", "complete", "seconds")},
        }
    confirmations = getattr(result, "confirmations", None)
    if confirmations is not None:
        details["confirmations"] = [
            {"batch_size": t.batch_size, "fits": t.fits, "steps": t.steps, "error": t.error} for t in confirmations
        ]
    return details


# -- batchfinder -----------------------------------------------------------------------------------------------------
def _batchfinder(mode: str) -> Callable[[ModelSource, BenchDevice, DataLike, int], FinderRun]:
    def run(workload: ModelSource, device: BenchDevice, data: DataLike, seed: int) -> FinderRun:
        dataset = as_finder_data(data).for_batchfinder()
        model = workload.build_model(seed)
        counter = StepCounter()
        outcome = FinderRun(f"batchfinder {mode}", "batchfinder", mode, settings={"mode": mode, "defaults": True})
        start = time.perf_counter()
        try:
            result = bf.find_batch_size(
                model, dataset, optimizer=make_optimizer, step_fn=counter, device=device.backend(), mode=mode
            )
        except bf.BatchFinderError as exc:
            outcome.seconds = time.perf_counter() - start
            outcome.error = f"{type(exc).__name__}: {exc}"
        else:
            outcome.seconds = time.perf_counter() - start
            outcome.returned = result.max_batch_size
            outcome.largest_fit_tried = result.max_batch_size
            outcome.recommended = result.batch_size
            outcome.trials = [TrialRecord(t.batch_size, t.steps, t.steps, t.fits) for t in result.trials]
            outcome.details = _batchfinder_details(result)
        outcome.steps = counter.calls
        outcome.traced_steps = counter.traced
        return outcome

    return run


# -- Lightning -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(*logger_names: str) -> Iterator[None]:
    """Silence the peers' info logging and warnings (e.g. 'few dataloader workers') while they run."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_LIGHTNING_MODULE: type | None = None


def _lightning_module_class() -> type:
    """A LightningModule around any model and the shared step (built lazily: Lightning imports slowly)."""
    global _LIGHTNING_MODULE
    if _LIGHTNING_MODULE is not None:
        return _LIGHTNING_MODULE
    import pytorch_lightning as pl

    class TunedModule(pl.LightningModule):
        """The model, its data and optimizer, with the ``batch_size`` attribute Lightning's finder adjusts."""

        def __init__(self, model: nn.Module, data: FinderData, counter: StepCounter, batch_size: int = 2) -> None:
            super().__init__()
            self.model = model
            self.data = data
            self.counter = counter
            self.batch_size = batch_size

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def on_train_start(self) -> None:  # once per trial: the finder reruns the fit loop at each size
            self.counter.begin(int(self.batch_size))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.counter(self.model, batch)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.counter.complete()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.parameters())

        def train_dataloader(self) -> DataLoader:
            return self.data.loader(int(self.batch_size))

    _LIGHTNING_MODULE = TunedModule
    return TunedModule


LIGHTNING_STEPS_PER_TRIAL = 3
"""Lightning's default ``steps_per_trial``."""


def _lightning(mode: str) -> Callable[[ModelSource, BenchDevice, DataLike, int], FinderRun]:
    def run(workload: ModelSource, device: BenchDevice, data: DataLike, seed: int) -> FinderRun:
        import pytorch_lightning as pl
        from pytorch_lightning.tuner import Tuner

        counter = StepCounter()
        module = _lightning_module_class()(workload.build_model(seed), as_finder_data(data), counter)
        outcome = FinderRun(f"Lightning {mode}", "pytorch_lightning", mode, settings={"mode": mode, "defaults": True})
        root = tempfile.mkdtemp(prefix="batchfinder-bench-lightning-")
        start = time.perf_counter()
        try:
            with _quiet("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch"), device.limited():
                trainer = pl.Trainer(
                    accelerator=device.lightning_accelerator,
                    devices=1,
                    max_epochs=1,
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                    default_root_dir=root,
                )
                returned = Tuner(trainer).scale_batch_size(module, mode=mode)
            outcome.returned = None if returned is None else int(returned)
        except Exception as exc:  # a peer's failure is a result to report, not a reason to stop the benchmark
            outcome.error = f"{type(exc).__name__}: {exc}"
        finally:
            outcome.seconds = time.perf_counter() - start
            shutil.rmtree(root, ignore_errors=True)
        counter.settle()
        outcome.trials = counter.trials
        outcome.steps = counter.calls
        fitted = [t.batch_size for t in counter.trials if t.fits]
        outcome.largest_fit_tried = max(fitted) if fitted else None
        return outcome

    return run


# -- Accelerate ------------------------------------------------------------------------------------------------------
def _accelerate(workload: ModelSource, device: BenchDevice, data: DataLike, seed: int) -> FinderRun:
    from accelerate.utils import find_executable_batch_size

    finder_data = as_finder_data(data)
    model = workload.build_model(seed).to(device.torch_device)
    counter = StepCounter()
    outcome = FinderRun(
        "Accelerate", "accelerate", "x0.9",
        settings={"starting_batch_size": ACCELERATE_START, "steps_per_attempt": ACCELERATE_STEPS},
    )

    @find_executable_batch_size(starting_batch_size=ACCELERATE_START)
    def train(batch_size: int) -> int:
        counter.begin(batch_size)
        optimizer = make_optimizer(model.parameters())
        model.train()
        batches = iter(finder_data.loader(batch_size))  # the first batches of an epoch
        for _ in range(ACCELERATE_STEPS):
            batch = next(batches, None)
            if batch is None:  # fewer batches than steps: the attempt ends early
                break
            optimizer.zero_grad(set_to_none=True)
            loss = counter(model, device.to_device(batch))
            del batch  # held only by the graph, as when the loader's output is passed straight on
            loss.backward()
            optimizer.step()
            counter.complete()
        return batch_size

    start = time.perf_counter()
    try:
        with _quiet("accelerate"), device.limited():
            outcome.returned = int(train())
    except Exception as exc:  # e.g. "No executable batch size found, reached zero."
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.seconds = time.perf_counter() - start
    counter.settle()
    outcome.trials = counter.trials
    outcome.steps = counter.calls
    fitted = [t.batch_size for t in counter.trials if t.fits]
    outcome.largest_fit_tried = max(fitted) if fitted else None
    model.zero_grad(set_to_none=True)
    return outcome


# -- registry --------------------------------------------------------------------------------------------------------
BATCHFINDER_MODES = ("binsearch", "power", "guided")
"""batchfinder modes the benchmark runs when ``batchfinder.engine.modes.MODES`` has them, in this order."""


def available_finders() -> list[Finder]:
    """Every finder that can run here, batchfinder's binsearch first (the reference for the ratios)."""
    finders = [
        Finder(f"batchfinder {mode}", "batchfinder", mode, _batchfinder(mode))
        for mode in BATCHFINDER_MODES
        if mode in MODES
    ]
    finders.append(Finder("Lightning binsearch", "pytorch_lightning", "binsearch", _lightning("binsearch")))
    finders.append(Finder("Lightning power", "pytorch_lightning", "power", _lightning("power")))
    finders.append(Finder("Accelerate", "accelerate", "x0.9", _accelerate))
    return finders
