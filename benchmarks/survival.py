"""Does a batch size that a finder returns survive one full shuffled epoch? The epoch-survival benchmark.

A finder answers "the largest batch size that fits" by running a few training steps. When the samples differ in size
(token sequences of different lengths padded to the longest in the batch, images of different resolutions) a few
batches that fit say little about the rest of the epoch: the epoch soon draws a batch with the longest samples. And
one shuffle says little about a finder: its first batches may or may not hold the longest samples. For each workload
of :mod:`benchmarks.varlen`, each finder and each shuffle seed (``--seeds``, default 0, 1, 2) this benchmark

1. runs the finder on the workload's loader shuffled with that seed, with the workload's model on a simulated GPU of
   the workload's capacity (batchfinder
   ``find_batch_size`` in ``binsearch`` and ``guided`` mode, used at its recommended size ``result.batch_size``;
   Lightning ``Tuner.scale_batch_size`` in ``binsearch`` and ``power`` mode and Accelerate
   ``find_executable_batch_size``, used at the size they return; see :mod:`benchmarks.finders`);
2. trains ONE FULL SHUFFLED EPOCH at that size on a fresh copy of the model with the same initial weights, on a fresh
   simulated GPU of the same capacity (a plain loop: ``DataLoader(dataset, batch_size=size, shuffle=True,
   collate_fn=..., generator=torch.Generator().manual_seed(shuffle_seed))``, the same shuffle, Adam, cross-entropy,
   the allocator's cache kept between steps), and records whether it survived or at which step it ran out of memory;
3. compares the size with the *worst-case truth*: the largest batch size B whose worst-case batch (the B largest
   samples, by the workload's per-sample size, collated with its ``collate_fn``) trains without running out of
   memory, established independently with ``batchfinder.try_batch_size`` on the samples sorted largest first
   (galloping up from 16, bisecting, then checking B-1 .. B+2; see :mod:`benchmarks.truth`). It depends on the data,
   not on the order, so it is established once per workload.

Each finder's record has the per-seed figures under ``runs`` and what they add up to: the sizes per seed, epochs
survived k of n, and for each failure the seed and the step.

It also times, on a 100,000-sample dataset of Python lists of ints, what batchfinder's scan for the largest samples
adds to a search (:func:`measure_scan_speed`).

Run from the repository root::

    python -m benchmarks.survival          # every workload; writes benchmarks/results/survival-simulated-cpu.*
    python -m benchmarks.survival --workloads text --seeds 1 --out /tmp/survival
    python -m benchmarks.survival --out /tmp/s --verify benchmarks/results/survival-simulated-cpu.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

import batchfinder as bf
from batchfinder.units import parse_bytes

from .common import environment, frozen_gc, load_average
from .devices import BenchDevice
from .finders import Finder, FinderData, FinderRun, available_finders
from .report import write_json
from .survival_report import (
    markdown_document,
    markdown_tables,
    verify_differences,
    write_chart,
)
from .truth import FitOracle, GroundTruth, find_ground_truth
from .varlen import (
    SURVIVAL_WORKLOADS,
    TEXT_LONG_LEN,
    SizedData,
    SurvivalWorkload,
    build_text_data,
    largest_first,
    pad_tokens,
    text_long_samples,
)
from .workloads import make_optimizer, training_step

__all__ = [
    "EpochOutcome",
    "train_epoch",
    "worst_case_truth",
    "run_workload",
    "run_survival",
    "measure_scan_speed",
    "main",
    "SCHEMA_VERSION",
    "LABEL",
    "DEFAULT_FINDERS",
    "DEFAULT_SEEDS",
]

SCHEMA_VERSION = 2
"""2: several shuffle seeds per finder (``--seeds``), the per-seed figures under each finder's ``runs``."""
LABEL = "survival-simulated-cpu"
"""File-name stem of the results."""
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_FINDERS = (
    "batchfinder binsearch", "batchfinder guided", "Lightning binsearch", "Lightning power", "Accelerate"
)
DEFAULT_SEEDS = (0, 1, 2)
"""``--seeds``: the shuffles each finder searches on and trains one epoch with."""
TRUTH_START = 16
"""The worst-case truth's walk starts here (galloping up or down, then bisecting)."""
SCAN_SAMPLES = 100_000
"""Samples of the scan-speed dataset (Python lists of ints)."""
DEFAULT_THREADS = 1
"""``--threads``: intra-op threads. On a busy 2-core machine the LSTM's CPU kernels ran 40x slower on two threads."""


# -- one epoch -------------------------------------------------------------------------------------------------------
@dataclass
class EpochOutcome:
    """One full shuffled epoch at one batch size on a simulated GPU."""

    batch_size: int
    steps: int
    """Steps (batches) in the epoch, the last one partial when the size does not divide the dataset."""
    completed: int = 0
    """Steps that finished (forward, backward, optimizer step)."""
    oom_step: int | None = None
    """The step that ran out of memory, counted from 1 (None when the epoch survived)."""
    oom_input_shape: list[int] | None = None
    """Shape of the input of the batch that ran out of memory."""
    oom_error: str | None = None
    """First line of the out-of-memory message."""
    largest_input_shape: list[int] | None = None
    """Shape of the largest input (most elements) among the batches the epoch ran or attempted."""
    peak_allocated_bytes: int = 0
    peak_reserved_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    """Anything other than running out of memory that stopped the epoch."""

    @property
    def survived(self) -> bool:
        return self.oom_step is None and self.error is None and self.completed == self.steps

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "survived": self.survived, "seconds": round(self.seconds, 3)}


def train_epoch(
    workload: SurvivalWorkload, data: FinderData, capacity_bytes: int, batch_size: int, seed: int = 0
) -> EpochOutcome:
    """Train one full epoch of ``data.loader(batch_size)`` on a fresh copy of the model (weights from ``seed``) on a
    fresh ``SimulatedGPU(capacity_bytes)``, and say whether it ran out of memory, and where.

    A plain training loop: Adam, cross-entropy, ``zero_grad(set_to_none=True)``, nothing emptied between steps (the
    allocator's cache is kept as in real training). The model's parameters are charged before the first step, as
    ``model.to("cuda")`` would place them.
    """
    model = workload.build_model(seed)
    optimizer = make_optimizer(model.parameters())
    loader = data.loader(batch_size)
    gpu = bf.SimulatedGPU(capacity_bytes)
    outcome = EpochOutcome(batch_size, len(loader))
    largest = -1
    step = 0
    shape: list[int] | None = None
    start = time.perf_counter()
    try:
        with gpu, gpu.resident(model, None):  # resident: the parameters are on the device before the first step
            model.train()
            for step, batch in enumerate(loader, 1):
                inputs = batch[0]
                shape = list(inputs.shape)
                if inputs.numel() > largest:
                    largest, outcome.largest_input_shape = inputs.numel(), shape
                del inputs
                optimizer.zero_grad(set_to_none=True)
                loss = training_step(model, batch)
                loss.backward()
                optimizer.step()
                del loss
                outcome.completed = step
    except torch.OutOfMemoryError as exc:
        outcome.oom_step = step  # 0: the model itself did not fit
        outcome.oom_input_shape = shape
        outcome.oom_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    except Exception as exc:  # a failure is a result to report, not a reason to stop the benchmark
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.seconds = time.perf_counter() - start
        outcome.peak_allocated_bytes = gpu.max_memory_allocated()
        outcome.peak_reserved_bytes = gpu.max_memory_reserved()
    return outcome


# -- the worst-case truth ----------------------------------------------------------------------------------------------
def sorted_loader(workload: SurvivalWorkload, data: SizedData) -> DataLoader:
    """The samples largest first (by the workload's per-sample size), collated with its ``collate_fn``, batch size 1:
    what ``try_batch_size`` builds a batch of B from is then the worst-case batch of B."""
    return DataLoader(Subset(data.dataset, largest_first(data.sizes)), batch_size=1, collate_fn=workload.collate_fn)


def worst_case_truth(
    workload: SurvivalWorkload, data: SizedData, device: BenchDevice, seed: int = 0, window: int = 2
) -> tuple[GroundTruth, FitOracle]:
    """The largest B whose worst-case batch (the B largest samples, collated) fits, and the oracle that decided it.

    ``oracle.fits(B)`` runs ``bf.try_batch_size`` (two training steps, the allocator's cache kept between them) on a
    fresh simulated GPU of the capacity, on the first B samples of :func:`sorted_loader`.
    """
    oracle = FitOracle(workload, device, sorted_loader(workload, data), seed)
    truth = find_ground_truth(oracle, device.capacity_bytes, window=window, start=TRUTH_START)
    return truth, oracle


# -- one workload ----------------------------------------------------------------------------------------------------
def _size_statistics(sizes: Sequence[int]) -> dict[str, Any]:
    ordered = sorted(sizes)
    count = len(ordered)
    median = statistics.median(ordered)
    return {
        "min": ordered[0],
        "median": int(median) if float(median).is_integer() else median,
        "mean": round(statistics.fmean(ordered), 2),
        "p90": ordered[min(count - 1, int(0.9 * count))],
        "p99": ordered[min(count - 1, int(0.99 * count))],
        "max": ordered[-1],
        "count_at_max": ordered.count(ordered[-1]),
    }


def _trained_size(run: FinderRun) -> int | None:
    """The size a user trains with: batchfinder's recommendation, the others' returned size."""
    return run.recommended if run.library == "batchfinder" else run.returned


def _seed_record(
    shuffle_seed: int,
    run: FinderRun,
    size: int | None,
    truth: GroundTruth,
    oracle: FitOracle,
    epoch: EpochOutcome | None,
) -> dict[str, Any]:
    """One finder's search on the loader shuffled with ``shuffle_seed``, and the epoch at the size it gave."""
    confirmations = run.details.get("confirmations", [])
    worst_case_fits = None
    if size is not None and 1 <= size <= oracle.length:
        worst_case_fits = oracle.fits(size)
    return {
        "shuffle_seed": shuffle_seed,
        "size": size,
        "returned": run.returned,
        "ratio": round(size / truth.max_batch_size, 4) if size is not None and truth.max_batch_size else None,
        "worst_case_fits": worst_case_fits,
        "epoch": epoch.as_dict() if epoch is not None else None,
        "survived": epoch.survived if epoch is not None else None,
        "trials": run.num_trials,
        "ooms": run.num_ooms,
        "confirmations": len(confirmations),
        "confirmation_ooms": sum(1 for c in confirmations if c["fits"] is False),
        "steps": run.steps,
        "traced_steps": run.traced_steps,
        "seconds": round(run.seconds, 3),
        "trial_sizes": [t.batch_size for t in run.trials],
        "trial_fits": [t.fits for t in run.trials],
        "data_scan": run.details.get("data_scan"),
        "confirmation_runs": confirmations,
        "error": run.error,
    }


def _failure(run: dict[str, Any]) -> dict[str, Any] | None:
    """Where one seed's epoch failed (None when it survived): the shuffle seed, the step, the batch's shape."""
    epoch = run["epoch"]
    if epoch is None:
        return {"shuffle_seed": run["shuffle_seed"], "step": None, "steps": None, "input_shape": None,
                "error": run["error"] or "no size"}
    if epoch["survived"]:
        return None
    return {
        "shuffle_seed": run["shuffle_seed"],
        "step": epoch["oom_step"],
        "steps": epoch["steps"],
        "input_shape": epoch["oom_input_shape"],
        "error": epoch["error"],
    }


def _finder_record(finder: Finder, runs: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """One finder on one workload over every shuffle seed: the per-seed runs and what they add up to."""
    sizes = [run["size"] for run in runs]
    known = [size for size in sizes if size is not None]
    ratios = [run["ratio"] for run in runs if run["ratio"] is not None]
    failures = [failure for failure in map(_failure, runs) if failure is not None]
    return {
        "finder": finder.name,
        "library": finder.library,
        "mode": finder.mode,
        "settings": settings,
        "size_is": "recommended (result.batch_size)" if finder.library == "batchfinder" else "returned",
        "shuffle_seeds": [run["shuffle_seed"] for run in runs],
        "sizes": sizes,
        "returned": [run["returned"] for run in runs],
        "median_size": _median(known),
        "median_ratio": _median(ratios),
        "epochs": len(runs),
        "survived": sum(1 for run in runs if run["survived"]),
        "worst_case_fits": sum(1 for run in runs if run["worst_case_fits"]),
        "within_truth": sum(1 for ratio in ratios if ratio <= 1.0),
        "failures": failures,
        "trials": sum(run["trials"] for run in runs),
        "ooms": sum(run["ooms"] for run in runs),
        "confirmations": sum(run["confirmations"] for run in runs),
        "confirmation_ooms": sum(run["confirmation_ooms"] for run in runs),
        "seconds": round(sum(run["seconds"] for run in runs), 3),
        "epoch_seconds": round(sum(run["epoch"]["seconds"] for run in runs if run["epoch"]), 3),
        "runs": runs,
    }


def _median(values: Sequence[float]) -> float | int | None:
    """The median, as an int when it is whole (None for no values)."""
    if not values:
        return None
    median = statistics.median(values)
    return int(median) if float(median).is_integer() and all(isinstance(v, int) for v in values) else median


def _outcome_text(epoch: EpochOutcome | None) -> str:
    if epoch is None:
        return "no epoch"
    if epoch.survived:
        return f"survived {epoch.steps} steps"
    if epoch.oom_step is not None:
        return f"OOM at step {epoch.oom_step} of {epoch.steps} (input {epoch.oom_input_shape})"
    return f"epoch error: {epoch.error}"


def run_workload(
    workload: SurvivalWorkload,
    finders: Sequence[Finder],
    *,
    seed: int = 0,
    shuffle_seeds: Sequence[int] = DEFAULT_SEEDS,
    window: int = 2,
    capacity: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The worst-case truth (once: it depends on the data, not on the order), then for each finder and each shuffle
    seed the finder's search on the loader shuffled with that seed and one epoch shuffled with it at the size the
    finder gives, each size checked against the truth.

    ``seed`` draws the data and the models' initial weights (the same for every finder and every shuffle);
    ``shuffle_seeds`` the orders.
    """
    if not shuffle_seeds:
        raise ValueError("shuffle_seeds must name at least one seed")
    device = BenchDevice("simulated", parse_bytes(capacity or workload.capacity, argument="capacity"))
    data = workload.build_data(seed)
    start = time.perf_counter()
    truth, oracle = worst_case_truth(workload, data, device, seed, window)
    log(
        f"  worst-case truth {truth.max_batch_size} ({truth.trials} trials, {time.perf_counter() - start:.1f} s"
        f"{'' if truth.consistent else ', NOT MONOTONIC in the dense window'})"
    )
    records = []
    for finder in finders:
        runs = []
        settings: dict[str, Any] = {}
        for shuffle_seed in shuffle_seeds:
            finder_data = FinderData(data.dataset, workload.collate_fn, shuffle=True, seed=shuffle_seed)
            device.clean()
            torch.manual_seed(shuffle_seed)
            run = finder.run(workload, device, finder_data, seed)
            settings = run.settings
            device.clean()
            size = _trained_size(run)
            epoch = train_epoch(workload, finder_data, device.capacity_bytes, size, seed) if size else None
            device.clean()
            record = _seed_record(shuffle_seed, run, size, truth, oracle, epoch)
            runs.append(record)
            log(
                f"  {finder.name:<22} shuffle {shuffle_seed}: size {size!s:>5}  ratio {record['ratio']!s:>6}  "
                f"worst case fits {record['worst_case_fits']!s:<5}  {_outcome_text(epoch)};  trials "
                f"{record['trials']}, OOMs {record['ooms']}, {record['seconds']:.1f} s "
                f"(epoch {epoch.seconds if epoch else 0:.1f} s)" + (f"  error: {run.error[:100]}" if run.error else "")
            )
        records.append(_finder_record(finder, runs, settings))
    return {
        "workload": workload.name,
        "description": workload.description,
        "parameters": sum(p.numel() for p in workload.build_model(seed).parameters()),
        "collate_fn": getattr(workload.collate_fn, "__name__", None) or "default_collate",
        "capacity": device.capacity_text,
        "capacity_bytes": device.capacity_bytes,
        "samples": len(data.sizes),
        "size_unit": workload.size_unit,
        "sizes": _size_statistics(data.sizes),
        "index_order": workload.index_order,
        "shuffle_seeds": list(shuffle_seeds),
        "truth": {
            "max_batch_size": truth.max_batch_size,
            "method": "try_batch_size on the samples sorted largest first: B fits and B+1 does not; "
            "every size in the window checked",
            "start": truth.guess,
            "window": {str(b): fits for b, fits in sorted(truth.window.items())},
            "consistent": truth.consistent,
            "trials": truth.trials,
            "seconds": round(truth.seconds, 3),
        },
        "finders": records,
        "fit_checks": {str(b): fits for b, fits in sorted(oracle.results.items())},
    }


# -- the scan's cost ---------------------------------------------------------------------------------------------------
def measure_scan_speed(
    samples: int = SCAN_SAMPLES,
    seed: int = 0,
    *,
    workload: SurvivalWorkload | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """What batchfinder's scan for the largest samples adds to a search, on ``samples`` Python lists of ints.

    The dataset: ``(token ids as a list of ints, label)`` samples with the text workload's long-tailed lengths, in
    generation order, behind ``DataLoader(batch_size=1, shuffle=True, collate_fn=pad_tokens)``. Timed, on the text
    workload's model and capacity:

    * ``scan_seconds``: constructing ``batchfinder.training.batching.BatchSource(loader)``, which is where the library scans the
      samples' sizes (``source.scan`` says what it found);
    * ``find_seconds``: ``bf.find_batch_size(model, loader, optimizer=torch.optim.Adam, device=SimulatedGPU(...))``
      with its defaults (scan and search);
    * ``sizes_given_seconds``: the same with ``sample_size=`` the list of lengths (no sample is loaded to measure
      it): the bare search, when the installed batchfinder has that option.

    The scan alone is timed where the library runs it, ``BatchSource.__init__`` (``scan_sizes`` with the default
    ``scan_budget``); :func:`_time_scan` is the one place to change if the scan moves.
    """
    workload = workload or SURVIVAL_WORKLOADS["text"]
    capacity = parse_bytes(workload.capacity, argument="capacity")
    start = time.perf_counter()
    data = build_text_data(
        samples, seed, as_lists=True, short_first=False, long_samples=text_long_samples(samples),
        long_len=TEXT_LONG_LEN,
    )
    build_seconds = time.perf_counter() - start
    loader = FinderData(data.dataset, pad_tokens, shuffle=True, seed=seed).loader(1)
    record: dict[str, Any] = {
        "samples": samples,
        "sample_format": "(list of ints, int label)",
        "workload": workload.name,
        "capacity": workload.capacity,
        "sizes": _size_statistics(data.sizes),
        "build_seconds": round(build_seconds, 3),
        "scan_seconds": None,
        "scan": None,
        "find_seconds": None,
        "find_max_batch_size": None,
        "find_batch_size": None,
        "find_trials": None,
        "find_data_scan": None,
        "sizes_given_seconds": None,
        "sizes_given_max_batch_size": None,
        "sizes_given_trials": None,
        "errors": {},
    }
    try:
        record["scan_seconds"], record["scan"] = _time_scan(loader)
        log(f"  BatchSource(loader) over {samples:,} samples: {record['scan_seconds']:.2f} s")
    except Exception as exc:
        record["errors"]["scan"] = f"{type(exc).__name__}: {exc}"
    runs: list[tuple[str, dict[str, Any]]] = [("find", {})]
    if "sample_size" in inspect.signature(bf.find_batch_size).parameters:
        runs.append(("sizes_given", {"sample_size": data.sizes}))
    else:
        record["errors"]["sizes_given"] = "this batchfinder has no sample_size= option"
    for key, extra in runs:
        model = workload.build_model(seed)
        start = time.perf_counter()
        try:
            result = bf.find_batch_size(
                model, loader, optimizer=torch.optim.Adam, device=bf.SimulatedGPU(capacity), **extra
            )
        except Exception as exc:
            record["errors"][key] = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            seconds = time.perf_counter() - start
        record[f"{key}_seconds"] = round(seconds, 3)
        record[f"{key}_max_batch_size"] = result.max_batch_size
        record[f"{key}_trials"] = len(result.trials)
        if key == "find":
            record["find_batch_size"] = result.batch_size
            scan = getattr(result, "data_scan", None)
            record["find_data_scan"] = scan.describe() if scan is not None else None
        log(f"  find_batch_size ({key.replace('_', ' ')}): {seconds:.2f} s, max {result.max_batch_size}")
    return record


def _time_scan(loader: DataLoader) -> tuple[float, str | None]:
    """Seconds to construct ``BatchSource(loader)`` (where the scan happens), and what its scan reports."""
    from batchfinder.training.batching import BatchSource

    start = time.perf_counter()
    source = BatchSource(loader)
    seconds = time.perf_counter() - start
    scan = getattr(source, "scan", None)
    return round(seconds, 3), (scan.describe() if scan is not None else None)


# -- the whole benchmark -----------------------------------------------------------------------------------------------
def select_finders(names: Sequence[str] | None) -> list[Finder]:
    """The finders to run, in the order given (default :data:`DEFAULT_FINDERS`)."""
    finders = {f.name: f for f in available_finders()}
    wanted = list(names or DEFAULT_FINDERS)
    unknown = [name for name in wanted if name not in finders]
    if unknown:
        raise SystemExit(f"unknown finder(s) {unknown}; choose from {list(finders)}")
    return [finders[name] for name in wanted]


def run_survival(
    *,
    workloads: Sequence[str] | None = None,
    finder_names: Sequence[str] | None = None,
    seed: int = 0,
    shuffle_seeds: Sequence[int] = DEFAULT_SEEDS,
    window: int = 2,
    capacity: str | None = None,
    scan_samples: int = SCAN_SAMPLES,
    out_dir: Path | str | None = DEFAULT_OUT,
    chart: bool = True,
    log: Callable[[str], None] = lambda _: None,
    command: str | None = None,
    freeze_gc: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and write ``survival-simulated-cpu.json``, ``.md`` and ``.png`` under ``out_dir`` (when
    given). ``seed`` draws the data and the models' weights, ``shuffle_seeds`` the shuffles every finder searches on
    and trains one epoch with; ``capacity`` overrides every workload's capacity; ``scan_samples=0`` skips the
    scan-speed measurement.
    The collector is frozen as in :mod:`benchmarks.compare` (see :func:`benchmarks.common.frozen_gc`)."""
    names = list(workloads or SURVIVAL_WORKLOADS)
    unknown = [name for name in names if name not in SURVIVAL_WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {list(SURVIVAL_WORKLOADS)}")
    finders = select_finders(finder_names)
    load_at_start = load_average()
    started = time.perf_counter()
    results = []
    scan_speed = None
    with frozen_gc(freeze_gc):
        for name in names:
            workload = SURVIVAL_WORKLOADS[name]
            log(f"{name} at {capacity or workload.capacity}: {workload.description}")
            results.append(
                run_workload(
                    workload, finders, seed=seed, shuffle_seeds=shuffle_seeds, window=window, capacity=capacity,
                    log=log,
                )
            )
        if scan_samples:
            log(f"scan speed: {scan_samples:,} samples of Python lists of ints")
            scan_speed = measure_scan_speed(scan_samples, seed, log=log)
    document = {
        "schema": SCHEMA_VERSION,
        "benchmark": "survival",
        "device": LABEL,
        "command": command,
        "environment": {**environment("simulated"), "load_average_at_start": load_at_start},
        "settings": {
            "seed": seed,
            "shuffle_seeds": list(shuffle_seeds),
            "window": window,
            "truth_start": TRUTH_START,
            "finders": [f.name for f in finders],
            "optimizer": "Adam (PyTorch defaults)",
            "loss": "cross-entropy",
            "epoch": "DataLoader(dataset, batch_size=size, shuffle=True, collate_fn=workload's, "
            "generator=torch.Generator().manual_seed(shuffle_seed)), the shuffle the finder searched on; a fresh "
            "model (weights from seed) and SimulatedGPU, the parameters placed "
            "first (SimulatedGPU.resident, as model.to('cuda')), the allocator's cache kept between steps",
            "gc_freeze": freeze_gc,
            "capacity_override": capacity,
        },
        "total_seconds": round(time.perf_counter() - started, 1),
        "workloads": results,
        "scan_speed": scan_speed,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(document, out / f"{LABEL}.json")
        (out / f"{LABEL}.md").write_text(markdown_document(document), encoding="utf-8")
        if chart:
            write_chart(document, out / f"{LABEL}.png")
    return document


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.survival",
        description=(
            "For each workload with variable-size samples (and a fixed-size control), each batch-size finder and "
            "each shuffle seed, run the finder on the loader shuffled with that seed and train one full epoch "
            "shuffled with it at the size the finder gives, on a simulated GPU, and check the size against the "
            "worst-case truth (the largest B whose B largest samples fit)."
        ),
        epilog="Workloads: "
        + "; ".join(f"{w.name} ({w.capacity}): {w.description}" for w in SURVIVAL_WORKLOADS.values())
        + f". Results: OUT/{LABEL}.json, .md, .png.",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(SURVIVAL_WORKLOADS),
        help=f"comma-separated workloads (default: all: {','.join(SURVIVAL_WORKLOADS)})",
    )
    parser.add_argument(
        "--finders",
        default=None,
        help=f"comma-separated finder names (default: {','.join(DEFAULT_FINDERS)}; 'batchfinder power' also exists)",
    )
    parser.add_argument(
        "--capacity", default=None, help="one capacity for every workload, e.g. 64MiB (default: each workload's own)"
    )
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), help="directory for the results (default: benchmarks/results)"
    )
    parser.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data and the models' weights (default 0)"
    )
    parser.add_argument(
        "--seeds",
        default=",".join(map(str, DEFAULT_SEEDS)),
        help="comma-separated shuffle seeds (default %(default)s): for each, every finder searches on the loader "
        "shuffled with it and trains one full epoch shuffled with it at the size it gives",
    )
    parser.add_argument(
        "--window", type=int, default=2, help="truth B: the sizes B-WINDOW+1 .. B+WINDOW are all checked (default 2)"
    )
    parser.add_argument(
        "--scan-samples",
        type=int,
        default=SCAN_SAMPLES,
        help=f"samples of the scan-speed dataset (default {SCAN_SAMPLES:,}; 0 skips the measurement)",
    )
    parser.add_argument("--no-gc-freeze", action="store_true", help="do not gc.freeze() the imported modules first")
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"torch.set_num_threads(N) first (default {DEFAULT_THREADS}: on a small machine with other work the "
        "LSTM's CPU kernels run 10-40x slower on two competing OpenMP threads than on one; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--verify",
        metavar="JSON",
        default=None,
        help="afterwards compare the deterministic results (truths, sizes, worst-case fits, epoch outcomes, trials, "
        "OOMs) of the workloads, finders and seeds run with those in JSON; exit 1 if they differ",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the final tables")
    return parser


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _seeds(value: str) -> list[int]:
    """``--seeds``: comma-separated whole numbers, at least one, no repeats."""
    try:
        seeds = [int(part) for part in _split(value) or []]
    except ValueError:
        raise SystemExit(f"--seeds {value!r}: expected comma-separated whole numbers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {value!r}: give at least one seed, each once")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    expected = None
    if args.verify:
        expected = json.loads(Path(args.verify).read_text(encoding="utf-8"))  # read before --out may overwrite it
    if args.threads:
        torch.set_num_threads(args.threads)
    log: Callable[[str], None] = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    command = "python -m benchmarks.survival " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    document = run_survival(
        workloads=_split(args.workloads),
        finder_names=_split(args.finders),
        seed=args.seed,
        shuffle_seeds=_seeds(args.seeds),
        window=args.window,
        capacity=args.capacity,
        scan_samples=args.scan_samples,
        out_dir=args.out,
        chart=not args.no_chart,
        log=log,
        command=command.strip(),
        freeze_gc=not args.no_gc_freeze,
    )
    print(markdown_tables(document))
    print(f"\nwrote {Path(args.out) / LABEL}.json, .md" + ("" if args.no_chart else ", .png"))
    if expected is not None:
        differences = verify_differences(expected, document)
        if differences:
            print(f"\n{len(differences)} result(s) differ from {args.verify}:")
            for line in differences:
                print(f"  {line}")
            return 1
        print(f"\nthe truths, sizes, worst-case fits, epoch outcomes, trials and OOMs match {args.verify}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
