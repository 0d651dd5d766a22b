"""Does a run survive batches larger than the batch size was chosen for? The OOMGuard benchmark.

Variable-length data (token sequences padded to the longest of each batch) trained with a batch size set by hand:
most batches fit on the device, the batches that draw the longest sequences do not. On a simulated GPU of a fixed
capacity, one shuffled epoch (the same order in every run) is trained three ways, each from the same initial weights
with Adam:

1. **plain**: an ordinary loop (``zero_grad``, forward, loss, backward, ``step``) on the capacity. It dies at the
   first batch that does not fit; the step it died at is recorded.
2. **guarded**: the same loop with :class:`batchfinder.OOMGuard` (``loss = guard.step(batch)``, ``grow_after=4``)
   on the same capacity. A batch that runs out of memory is redone in micro-batches, and the whole batch is tried
   again after 4 clean steps; the number of splits, the steps redone and the final micro-batch size are recorded.
3. **reference**: the plain loop on a simulated GPU large enough for every batch, unsplit.

It reports the guarded run's CPU time against the reference's (the time the splits and the redone steps cost; both
run on the CPU, so the figures are CPU seconds of the process driving the simulated GPU, not a GPU's; CPU time
rather than wall time, which other work on a shared machine inflates) and the largest absolute difference
between the guarded run's final parameters and the reference's (floating-point order only, for a loss that is a
mean over the batch).

Run from the repository root::

    python -m benchmarks.guard                   # writes benchmarks/results/guard-simulated-cpu.{json,md}
    python -m benchmarks.guard --samples 256 --out /tmp/guard
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import batchfinder as bf
from batchfinder.units import format_bytes, parse_bytes

from .common import environment, load_average
from .report import write_json

__all__ = ["GuardSetup", "RunRecord", "run_benchmark", "markdown_document", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "guard-simulated-cpu"
VOCAB_FEATURES = 32
CLASSES = 16


@dataclass(frozen=True)
class GuardSetup:
    """The workload: ``samples`` sequences of lengths ``min_length`` .. ``max_length`` (mostly short, a few long),
    trained at ``batch_size`` on a simulated GPU of ``capacity``."""

    samples: int = 2048
    batch_size: int = 64
    min_length: int = 8
    max_length: int = 192
    long_fraction: float = 0.005
    capacity: str = "64MiB"
    hidden: int = 512
    grow_after: int | None = 4
    seed: int = 0


@dataclass
class RunRecord:
    """One training run of the epoch."""

    name: str
    capacity_bytes: int
    steps: int
    finished: bool
    died_at_step: int | None = None
    seconds: float = 0.0
    splits: int = 0
    retried_steps: int = 0
    final_micro_batch_size: int | None = None
    error: str | None = None


def _model(setup: GuardSetup) -> nn.Module:
    torch.manual_seed(setup.seed)
    return nn.Sequential(nn.Linear(VOCAB_FEATURES, setup.hidden), nn.ReLU(), nn.Linear(setup.hidden, CLASSES))


def _data(setup: GuardSetup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences (features per position, a class per position): lengths mostly in the short third of the range, a
    ``long_fraction`` of them near ``max_length``."""
    g = torch.Generator().manual_seed(setup.seed)
    short_top = setup.min_length + (setup.max_length - setup.min_length) // 3
    samples = []
    for _ in range(setup.samples):
        if torch.rand((), generator=g).item() < setup.long_fraction:
            length = int(torch.randint(setup.max_length * 3 // 4, setup.max_length + 1, (), generator=g))
        else:
            length = int(torch.randint(setup.min_length, short_top + 1, (), generator=g))
        samples.append((torch.randn(length, VOCAB_FEATURES, generator=g), torch.randint(0, CLASSES, (length,), generator=g)))
    return samples


def _collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = nn.utils.rnn.pad_sequence([x for x, _ in batch], batch_first=True)
    targets = nn.utils.rnn.pad_sequence([y for _, y in batch], batch_first=True)  # padding is class 0
    return inputs, targets


def step_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over every position of the (padded) batch."""
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def _batches(setup: GuardSetup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch, collated: the same order for every run."""
    loader = DataLoader(
        _data(setup), batch_size=setup.batch_size, shuffle=True, collate_fn=_collate,
        generator=torch.Generator().manual_seed(setup.seed),
    )
    return list(loader)


def _run(name: str, setup: GuardSetup, capacity: str, batches: list[Any], guarded: bool) -> tuple[RunRecord, nn.Module]:
    model = _model(setup)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gpu = bf.SimulatedGPU(capacity)
    record = RunRecord(name, gpu.capacity_bytes, len(batches), finished=False)
    guard = bf.OOMGuard(model, optimizer, step_fn=step_fn, device=gpu, grow_after=setup.grow_after) if guarded else None
    started = time.process_time()  # CPU time of this process: steadier than wall time on a shared machine
    with gpu.resident(model, optimizer), gpu:
        for index, batch in enumerate(batches):
            try:
                if guard is not None:
                    guard.step(batch)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    device_batch = gpu.to_device(batch)
                    step_fn(model, device_batch).backward()
                    del device_batch
                    optimizer.step()
            except torch.OutOfMemoryError as exc:
                record.died_at_step = index
                record.error = str(exc).splitlines()[0][:160]
                break
        else:
            record.finished = True
        optimizer.zero_grad(set_to_none=True)
    record.seconds = round(time.process_time() - started, 3)
    if guard is not None:
        record.splits, record.retried_steps = guard.splits, guard.retried_steps
        record.final_micro_batch_size = guard.micro_batch_size
    return record, model


def run_benchmark(setup: GuardSetup) -> dict[str, Any]:
    """The three runs of :mod:`benchmarks.guard` and what they add up to, as a JSON-ready document."""
    batches = _batches(setup)
    lengths = [int(x.shape[1]) for x, _ in batches]
    big = format_bytes(parse_bytes(setup.capacity) * 64).replace(" ", "")
    plain, _ = _run("plain", setup, setup.capacity, batches, guarded=False)
    guarded, guarded_model = _run("guarded", setup, setup.capacity, batches, guarded=True)
    reference, reference_model = _run("reference", setup, big, batches, guarded=False)
    difference = max(
        (p - q).abs().max().item() for p, q in zip(guarded_model.parameters(), reference_model.parameters())
    )
    return {
        "benchmark": "guard",
        "setup": asdict(setup),
        "batches": len(batches),
        "padded_lengths": {"min": min(lengths), "max": max(lengths), "median": sorted(lengths)[len(lengths) // 2]},
        "runs": [asdict(plain), asdict(guarded), asdict(reference)],
        "time_lost_seconds": round(guarded.seconds - reference.seconds, 3),
        "time_lost_fraction": round(guarded.seconds / reference.seconds - 1, 3) if reference.seconds else None,
        "max_abs_parameter_difference": difference,
        "environment": environment("simulated"),
        "load_average": load_average(),
    }


def markdown_document(document: dict[str, Any]) -> str:
    """The results as a short Markdown page."""
    setup = document["setup"]
    lengths = document["padded_lengths"]
    lines = [
        "# OOMGuard on variable-length data (simulated GPU, CPU)",
        "",
        f"{setup['samples']:,} sequences of {setup['min_length']}-{setup['max_length']} positions (mostly short, "
        f"{setup['long_fraction']:.1%} long), batch size {setup['batch_size']} set by hand, Linear "
        f"{VOCAB_FEATURES}-{setup['hidden']}-{CLASSES} per position, Adam, one shuffled epoch of "
        f"{document['batches']} batches padded to {lengths['min']}-{lengths['max']} positions (median "
        f"{lengths['median']}). Simulated GPU of {setup['capacity']}; the reference runs unsplit on one 64 times larger.",
        "",
        "| run | capacity | finished | died at step | splits | steps redone | final micro-batch | CPU seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in document["runs"]:
        lines.append(
            f"| {run['name']} | {format_bytes(run['capacity_bytes'])} | {'yes' if run['finished'] else '**no**'} | "
            f"{'-' if run['died_at_step'] is None else run['died_at_step']} | {run['splits']} | {run['retried_steps']} | "
            f"{'-' if run['final_micro_batch_size'] is None else run['final_micro_batch_size']} | {run['seconds']:.1f} |"
        )
    fraction = document["time_lost_fraction"]
    lines += [
        "",
        f"Time lost by the guarded run against the unsplit reference: {document['time_lost_seconds']:.1f} s"
        + (f" ({fraction:+.0%})" if fraction is not None else "")
        + " (CPU seconds of the process driving the simulated GPU).",
        f"Largest absolute difference of the final parameters, guarded vs reference: "
        f"{document['max_abs_parameter_difference']:.2e}.",
        "",
        "Reproduce: `python -m benchmarks.guard` (from the repository root).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``guard-simulated-cpu.json`` and ``.md`` into ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard", description=__doc__.split("\n\n")[0])
    defaults = GuardSetup()
    parser.add_argument("--samples", type=int, default=defaults.samples, help="sequences in the epoch")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="the batch size set by hand")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="longest sequence")
    parser.add_argument("--capacity", default=defaults.capacity, help="the simulated GPU's capacity")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    args = parser.parse_args(argv)
    setup = GuardSetup(
        samples=args.samples, batch_size=args.batch_size, max_length=args.max_length, capacity=args.capacity
    )
    document = run_benchmark(setup)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(document, args.out / f"{NAME}.json")
    (args.out / f"{NAME}.md").write_text(markdown_document(document), encoding="utf-8")
    sys.stdout.write(markdown_document(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
