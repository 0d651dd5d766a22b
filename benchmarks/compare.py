"""Compare batchfinder with Lightning's and Accelerate's batch-size finders on a small zoo of models.

For every model and device capacity, each finder runs in this process, one after another, on the same device
(on a machine without a GPU: simulated GPUs of the same capacity, so every finder sees the same memory accounting,
with host-side data loading and prefetching charged to none of them). The exact largest batch size that fits is
established independently (see :mod:`benchmarks.truth`), and the size each finder returns is checked against it
with ``batchfinder.try_batch_size``.

Run from the repository root::

    python -m benchmarks.compare                       # the default zoo: CUDA if present, else simulated GPUs
    python -m benchmarks.compare --device simulated --models mnist_mlp --capacity 16MiB
    python -m benchmarks.compare --device cuda --capacity 8GiB --capacity 24GiB

Results go to ``benchmarks/results/<device>.json`` (for machines), ``<device>.md`` (for people) and
``<device>.png`` (a chart), where ``<device>`` is ``simulated-cpu`` or the GPU's name, e.g. ``NVIDIA-H100-80GB-HBM3``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from batchfinder.units import format_bytes, parse_bytes

from .common import environment, frozen_gc, load_average
from .devices import BenchDevice, cuda_total_bytes, device_label
from .finders import Finder, FinderRun, available_finders
from .report import compare_deterministic, write_chart, write_json, write_markdown
from .truth import FitOracle, GroundTruth, find_ground_truth
from .workloads import WORKLOADS, Workload

__all__ = ["main", "run_benchmark", "environment", "SCHEMA_VERSION", "REFERENCE_FINDER"]

SCHEMA_VERSION = 1
REFERENCE_FINDER = "batchfinder binsearch"
"""Steps and wall time of every finder are also given as a ratio to this finder's."""
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 4)


def _finder_record(run: FinderRun, truth: GroundTruth, oracle: FitOracle) -> dict[str, Any]:
    returned = run.returned
    fits = None
    if returned is not None and returned >= 1:
        fits = oracle.fits(returned) if returned < oracle.length else False
    return {
        "finder": run.finder,
        "library": run.library,
        "mode": run.mode,
        "settings": run.settings,
        "returned": returned,
        "recommended": run.recommended,
        "largest_fit_tried": run.largest_fit_tried,
        "ratio": _ratio(returned, truth.max_batch_size),
        "fits": fits,
        "fits_checked_with": "batchfinder.try_batch_size" if fits is not None else None,
        "returned_was_tried": run.returned_was_tried if returned is not None else None,
        "trials": run.num_trials,
        "steps": run.steps,
        "traced_steps": run.traced_steps,
        "ooms": run.num_ooms,
        "seconds": round(run.seconds, 3),
        "trial_sizes": [t.batch_size for t in run.trials],
        "trial_fits": [t.fits for t in run.trials],
        "error": run.error,
    }


def run_case(
    workload: Workload,
    device: BenchDevice,
    finders: Sequence[Finder],
    *,
    seed: int = 0,
    window: int = 2,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """One model at one capacity: the ground truth, then every finder in turn, each returned size checked."""
    length = workload.dataset_length(device.capacity_bytes)
    dataset = workload.build_dataset(length, seed)
    oracle = FitOracle(workload, device, dataset, seed)
    truth = find_ground_truth(oracle, device.capacity_bytes, window=window)
    log(
        f"  ground truth {truth.max_batch_size} ({truth.trials} trials, {truth.seconds:.1f} s"
        f"{'' if truth.consistent else ', NOT MONOTONIC in the dense window'})"
    )
    records: list[dict[str, Any]] = []
    for finder in finders:
        device.clean()
        torch.manual_seed(seed)
        run = finder.run(workload, device, dataset, seed)
        device.clean()
        record = _finder_record(run, truth, oracle)
        records.append(record)
        log(
            f"  {finder.name:<22} returned {record['returned']!s:>7}  ratio {record['ratio']!s:>6}  "
            f"fits {record['fits']!s:<5}  trials {record['trials']:>3}  steps {record['steps']:>4}  "
            f"OOMs {record['ooms']:>3}  {record['seconds']:7.1f} s"
            + (f"  error: {record['error'][:80]}" if record["error"] else "")
        )
    reference = next((r for r in records if r["finder"] == REFERENCE_FINDER), None)
    for record in records:
        record["steps_vs_reference"] = _ratio(record["steps"], reference["steps"] if reference else None)
        record["seconds_vs_reference"] = _ratio(record["seconds"], reference["seconds"] if reference else None)
    model = workload.build_model(seed)
    return {
        "model": workload.name,
        "description": workload.description,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input": workload.describe_input(),
        "capacity": device.capacity_text,
        "capacity_bytes": device.capacity_bytes,
        "dataset_length": length,
        "ground_truth": {
            "max_batch_size": truth.max_batch_size,
            "method": "try_batch_size: B fits and B+1 does not; every size in the window checked",
            "first_guess": truth.guess,
            "first_guess_from": truth.guess_method,
            "window": {str(b): fits for b, fits in sorted(truth.window.items())},
            "consistent": truth.consistent,
            "trials": truth.trials,
            "seconds": round(truth.seconds, 3),
        },
        "finders": records,
        "fit_checks": {str(b): fits for b, fits in sorted(oracle.results.items())},
    }


def resolve_kind(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``simulated``; ``cpu`` is an alias of ``simulated``."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "simulated"
    if requested in ("simulated", "cpu"):
        return "simulated"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is available here (use --device simulated)")
        return "cuda"
    raise SystemExit(f"--device must be auto, cuda or simulated, not {requested!r}")


def plan(kind: str, models: Sequence[str], capacities: Sequence[str] | None) -> list[tuple[Workload, BenchDevice]]:
    """(workload, device) pairs to run: the given capacities for every model, or each model's defaults."""
    cases: list[tuple[Workload, BenchDevice]] = []
    total = cuda_total_bytes() if kind == "cuda" else None
    for name in models:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(WORKLOADS)}")
        workload = WORKLOADS[name]
        for text in capacities or workload.default_capacities[kind]:
            capacity = parse_bytes(text, argument="--capacity")
            if total is not None and capacity > total:
                print(f"skipping {name} at {text}: more than the GPU's {format_bytes(total)}", file=sys.stderr)
                continue
            cases.append((workload, BenchDevice(kind, capacity)))
    return cases


def run_benchmark(
    *,
    kind: str = "simulated",
    models: Sequence[str] | None = None,
    capacities: Sequence[str] | None = None,
    finder_names: Sequence[str] | None = None,
    seed: int = 0,
    window: int = 2,
    out_dir: Path | str | None = DEFAULT_OUT,
    chart: bool = True,
    log: Callable[[str], None] = lambda _: None,
    command: str | None = None,
    freeze_gc: bool = True,
) -> dict[str, Any]:
    """Run the comparison and write ``<device>.json``, ``.md`` and ``.png`` under ``out_dir`` (when given).

    Every finder collects garbage after each trial (batchfinder, Lightning's ``garbage_collection_cuda`` and
    Accelerate's ``clear_device_cache`` alike). With torch, torchvision and Lightning loaded a full collection takes
    0.1-0.8 s on a small CPU, which would swamp the training steps being compared; with ``freeze_gc`` (the default)
    the objects that exist before the first case (the imported modules) are moved out of the collector's sight
    with ``gc.freeze()``, so each collection costs milliseconds, for every finder alike.
    """
    finders = available_finders()
    if finder_names:
        unknown = set(finder_names) - {f.name for f in finders}
        if unknown:
            raise SystemExit(f"unknown finder(s) {sorted(unknown)}; choose from {[f.name for f in finders]}")
        finders = [f for f in finders if f.name in finder_names]
    cases = plan(kind, list(models or WORKLOADS), capacities)
    env_at_start = {"load_average": load_average()}
    started = time.perf_counter()
    results = []
    with frozen_gc(freeze_gc):  # see the docstring: a full collection then costs milliseconds, for every finder alike
        for workload, device in cases:
            log(f"{workload.name} at {device.capacity_text} ({kind})")
            results.append(run_case(workload, device, finders, seed=seed, window=window, log=log))
    label = device_label(kind)
    load_at_start = env_at_start["load_average"]
    document = {
        "schema": SCHEMA_VERSION,
        "device": label,
        "command": command,
        "environment": {**environment(kind), "load_average_at_start": load_at_start},
        "settings": {
            "seed": seed,
            "window": window,
            "finders": [f.name for f in finders],
            "reference_finder": REFERENCE_FINDER,
            "optimizer": "Adam (PyTorch defaults)",
            "loss": "cross-entropy",
            "gc_freeze": freeze_gc,
        },
        "total_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(document, out / f"{label}.json")
        write_markdown(document, out / f"{label}.md")
        if chart:
            write_chart(document, out / f"{label}.png")
    return document


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=(
            "Compare batchfinder (binsearch, power, guided when available) with Lightning's Tuner.scale_batch_size "
            "(binsearch, power) and Accelerate's find_executable_batch_size on a small zoo of models. Each finder's "
            "returned batch size is checked against the exact largest size that fits."
        ),
        epilog=(
            "Default capacities: on a simulated GPU (no CUDA) "
            + "; ".join(f"{w.name} {', '.join(w.default_capacities['simulated'])}" for w in WORKLOADS.values())
            + ". On CUDA "
            + "; ".join(f"{w.name} {', '.join(w.default_capacities['cuda'])}" for w in WORKLOADS.values())
            + " (capacities above the GPU's memory are skipped). Results: OUT/<device>.json, .md, .png."
        ),
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if present, else simulated), cuda, or simulated (alias cpu)"
    )
    parser.add_argument(
        "--capacity",
        action="append",
        metavar="SIZE",
        help="device capacity to emulate, e.g. 64MiB or 16GiB; repeat or comma-separate for several "
        "(default: per model and device, see below). On CUDA set with set_per_process_memory_fraction.",
    )
    parser.add_argument(
        "--models", default=",".join(WORKLOADS), help=f"comma-separated models (default: all: {','.join(WORKLOADS)})"
    )
    parser.add_argument("--finders", default=None, help="comma-separated finder names (default: all available)")
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), help="directory for the results (default: benchmarks/results)"
    )
    parser.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models' weights and data (default 0)")
    parser.add_argument(
        "--window",
        type=int,
        default=2,
        help="ground truth B: the sizes B-WINDOW+1 .. B+WINDOW are all checked (default 2: B-1 .. B+2)",
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="do not gc.freeze() the imported modules first (every finder's garbage collections then cost "
        "0.1-0.8 s each on a small CPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: torch's default)"
    )
    parser.add_argument(
        "--verify",
        metavar="JSON",
        default=None,
        help="afterwards compare the deterministic results (ground truths, returned sizes, fits, trials, steps, "
        "OOMs) with those in JSON, e.g. the committed benchmarks/results/simulated-cpu.json; exit 1 if they differ",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the final table")
    return parser


def _split(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    kind = resolve_kind(args.device)
    expected = None
    if args.verify:
        expected = json.loads(Path(args.verify).read_text(encoding="utf-8"))  # read before --out may overwrite it
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log: Callable[[str], None] = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    command = "python -m benchmarks.compare " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    document = run_benchmark(
        kind=kind,
        models=_split([args.models]),
        capacities=_split(args.capacity),
        finder_names=_split([args.finders]) if args.finders else None,
        seed=args.seed,
        window=args.window,
        out_dir=args.out,
        chart=not args.no_chart,
        log=log,
        command=command.strip(),
        freeze_gc=not args.no_gc_freeze,
    )
    from .report import markdown_table

    print(markdown_table(document))
    label = document["device"]
    print(f"\nwrote {Path(args.out) / label}.json, .md" + ("" if args.no_chart else ", .png"))
    if expected is not None:
        differences = compare_deterministic(expected, document)
        if differences:
            print(f"\n{len(differences)} result(s) differ from {args.verify}:")
            for line in differences:
                print(f"  {line}")
            return 1
        print(f"\nthe ground truths, returned sizes, fits, trials, steps and OOMs match {args.verify}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
