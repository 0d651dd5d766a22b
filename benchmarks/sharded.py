"""Sharded models: what a search costs under FSDP2, and whether its answer holds in a brute-force sharded run.

A 7-layer MLP is sharded with ``fully_shard`` per layer and at the root and trained with Adam on ``world_size``
CPU ranks over gloo, each rank with a simulated GPU of its own capacity (the last rank's is smaller, so that one rank
decides). For world sizes 2 and 4 it records:

1. **the search**: ``batchfinder.find_batch_size`` on the sharded model on every rank: trials, training steps,
   out-of-memory trials, wall seconds, the largest size and the recommended one (every rank must return the same).
2. **brute force**: plain sharded training runs (``steps`` steps of forward, backward and Adam on a freshly sharded
   copy, under a fresh simulated GPU of the same capacity on every rank), without batchfinder's agreement between
   ranks: a rank that runs out of memory simply stops, and the others leave the collective they wait in when their
   process group's time limit (``--collective-timeout``) ends. Each run uses a new process group, so a run left
   half-way never disturbs the next. The brute-force largest size is found from scratch (doubling from 1, then
   bisection), and the search's recommended size, its largest and the size above it are run as well.

The answer is **tight** when the search's largest size fits in a brute-force run and the next size does not. The
brute-force runs build the model on the simulated GPU (as a model is on the GPU before its training starts); what that
construction leaves in the allocator's cache is not what the search's trials start from (the model's shards charged
at once, the cache emptied), so under memory pressure the two can part by a few samples (see the results).

Run from the repository root::

    python -m benchmarks.sharded                      # writes benchmarks/results/sharded-simulated-cpu.{json,md}
    python -m benchmarks.sharded --worlds 2 --out /tmp/sharded
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.units import format_bytes, parse_bytes

from .common import environment
from .report import write_json

__all__ = ["run_world", "run_benchmark", "markdown_document", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "sharded-simulated-cpu"
LAYERS, WIDTH, CLASSES = 7, 512, 10
JOIN_TIMEOUT_S = 900


def sharded_mlp(width: int = WIDTH, group: Any = None) -> nn.Module:
    """The benchmark's model (same weights on every rank), each layer then the root sharded over ``group``."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for index in range(LAYERS):
        out = CLASSES if index == LAYERS - 1 else width
        layers.append(nn.Linear(width, out))
    model = nn.Sequential(*layers)
    mesh = None if group is None else DeviceMesh.from_group(group, "cpu")
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def dataset(samples: int, width: int = WIDTH) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(samples, width, generator=generator),
                         torch.randint(0, CLASSES, (samples,), generator=generator))


def _capacity(capacity: str, rank: int, world: int) -> str:
    """The last rank's simulated GPU is 15% smaller than the others'."""
    if rank == world - 1:
        return format_bytes(int(parse_bytes(capacity) * 0.85))
    return capacity


def _brute_force_fits(batch_size: int, capacity: str, steps: int, timeout_s: float, data: TensorDataset) -> bool:
    """One plain sharded training run at ``batch_size`` on every rank; True when it fitted on every rank."""
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    fitted = True
    try:
        gpu = bf.SimulatedGPU(capacity)
        with gpu:  # built on the device, as a model is before its training starts
            model = sharded_mlp(data.tensors[0].shape[1], group)
        optimizer = torch.optim.Adam(model.parameters())
        # One batch of its own per step, made on the host (as a DataLoader collates it) and dropped when the next
        # one arrives; a slice of the data set would be a view of its whole storage.
        generator = torch.Generator().manual_seed(2)
        width = data.tensors[0].shape[1]
        batches = [(torch.randn(batch_size, width, generator=generator),
                    torch.randint(0, CLASSES, (batch_size,), generator=generator)) for _ in range(steps)]
        with gpu:
            while batches:
                inputs, targets = batches.pop(0)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(inputs), targets).backward()
                optimizer.step()
    except torch.OutOfMemoryError:
        fitted = False
    except RuntimeError:  # another rank ran out of memory: its collective never came and this one timed out
        fitted = False
    flag = torch.tensor([1 if fitted else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # the default group, untouched by the run
    dist.destroy_process_group(group)
    return bool(flag.item())


def _brute_force_largest(capacity: str, steps: int, timeout_s: float, data: TensorDataset) -> tuple[int, int]:
    """The largest size that fits in brute-force runs (doubling from 1, then bisection), and the runs it took."""
    runs = 0
    fits, fails, size = 0, None, 1
    while fails is None:
        runs += 1
        if size <= len(data) and _brute_force_fits(size, capacity, steps, timeout_s, data):
            fits, size = size, size * 2
        else:
            fails = size
    while fails - fits > 1:
        middle = (fits + fails) // 2
        runs += 1
        if _brute_force_fits(middle, capacity, steps, timeout_s, data):
            fits = middle
        else:
            fails = middle
    return fits, runs


def _rank(rank: int, world: int, port: int, options: dict[str, Any], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        capacity = _capacity(options["capacity"], rank, world)
        data = dataset(options["samples"], options["width"])
        model = sharded_mlp(options["width"])
        optimizer = torch.optim.Adam(model.parameters())
        started = time.perf_counter()
        result = bf.find_batch_size(model, data, optimizer=optimizer, device=bf.SimulatedGPU(capacity))
        search_seconds = time.perf_counter() - started
        steps, timeout_s = options["steps"], options["collective_timeout"]
        started = time.perf_counter()
        checks = {
            "recommended_fits": _brute_force_fits(result.batch_size, capacity, steps, timeout_s, data),
            "largest_fits": _brute_force_fits(result.max_batch_size, capacity, steps, timeout_s, data),
            "next_fits": _brute_force_fits(result.max_batch_size + 1, capacity, steps, timeout_s, data),
        }
        brute_largest, brute_runs = (
            _brute_force_largest(capacity, steps, timeout_s, data) if options["full_brute_force"] else (None, 0)
        )
        brute_seconds = time.perf_counter() - started
        queue.put({
            "rank": rank,
            "capacity": capacity,
            "largest": result.max_batch_size,
            "recommended": result.batch_size,
            "trials": len(result.trials),
            "steps": result.num_steps,
            "out_of_memory_trials": result.num_ooms,
            "search_seconds": round(search_seconds, 2),
            "brute_force_largest": brute_largest,
            "brute_force_runs": brute_runs,
            "brute_force_seconds": round(brute_seconds, 2),
            **checks,
        })
        dist.destroy_process_group()
    except BaseException:  # reported to the parent, which fails the benchmark
        queue.put({"rank": rank, "error": traceback.format_exc()})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, options: dict[str, Any]) -> dict[str, Any]:
    """The search and the brute-force runs on ``world`` spawned ranks; one row of the benchmark."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    processes = [context.Process(target=_rank, args=(rank, world, port, options, queue)) for rank in range(world)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for process in processes:
        process.join(max(1.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            raise RuntimeError(f"a rank of the world of {world} was still running after {JOIN_TIMEOUT_S} s")
    reports = sorted((queue.get() for _ in processes), key=lambda report: report["rank"])
    errors = [report["error"] for report in reports if "error" in report]
    if errors:
        raise RuntimeError(f"a rank of the world of {world} failed:\n{errors[0]}")
    first = reports[0]
    agree = all(report["largest"] == first["largest"] and report["recommended"] == first["recommended"]
                for report in reports)
    return {
        "world_size": world,
        "capacities": [report["capacity"] for report in reports],
        "ranks_agree": agree,
        **{key: first[key] for key in ("largest", "recommended", "trials", "steps", "out_of_memory_trials",
                                       "brute_force_largest", "brute_force_runs", "recommended_fits",
                                       "largest_fits", "next_fits")},
        "search_seconds": max(report["search_seconds"] for report in reports),
        "brute_force_seconds": max(report["brute_force_seconds"] for report in reports),
        "tight": first["largest_fits"] and not first["next_fits"],
    }


def run_benchmark(worlds: list[int], options: dict[str, Any]) -> dict[str, Any]:
    rows = [run_world(world, options) for world in worlds]
    return {
        "benchmark": "sharded",
        "setup": {"model": f"MLP of {LAYERS} Linear layers {options['width']} wide, fully_shard per layer and at the root",
                  "optimizer": "Adam", **options},
        "rows": rows,
        "environment": environment("simulated"),
    }


def markdown_document(document: dict[str, Any]) -> str:
    setup = document["setup"]
    lines = [
        "# Sharded search (FSDP2) against brute-force sharded runs (simulated GPUs, CPU ranks over gloo)",
        "",
        f"{setup['model']}; {setup['optimizer']}; {setup['samples']:,} samples. Each rank has a simulated GPU of "
        f"{setup['capacity']}, the last rank one 15% smaller. Brute force: plain sharded training runs of "
        f"{setup['steps']} steps on every rank (doubling from 1, then bisection), a rank that runs out of memory "
        f"leaving the others to their collective's time limit ({setup['collective_timeout']} s).",
        "",
        "| ranks | capacities | trials | steps | out of memory | search s | largest | recommended | ranks agree "
        "| brute-force largest | brute-force runs | brute-force s | recommended fits | largest fits | next fits | tight |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in document["rows"]:
        cells = [row["world_size"], " / ".join(row["capacities"]), row["trials"], row["steps"],
                 row["out_of_memory_trials"], row["search_seconds"], row["largest"], row["recommended"],
                 "yes" if row["ranks_agree"] else "**no**", _cell(row["brute_force_largest"]), row["brute_force_runs"],
                 row["brute_force_seconds"], _yes(row["recommended_fits"]), _yes(row["largest_fits"]),
                 "no" if not row["next_fits"] else "**yes**", "yes" if row["tight"] else "**no**"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += ["", "Search seconds are wall seconds of the slowest rank (all ranks share the machine's CPU cores).", "",
              "Reproduce: `python -m benchmarks.sharded` (from the repository root)."]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _yes(value: bool) -> str:
    return "yes" if value else "**no**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="world sizes (default: 2 4)")
    parser.add_argument("--capacity", default="64MiB", help="simulated GPU memory per rank (default: 64MiB)")
    parser.add_argument("--width", type=int, default=WIDTH, help=f"width of the MLP's layers (default: {WIDTH})")
    parser.add_argument("--samples", type=int, default=4096, help="samples in the data set (default: 4096)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per brute-force run (default: 2)")
    parser.add_argument("--collective-timeout", type=float, default=10.0,
                        help="seconds a brute-force rank waits in a collective for a rank that ran out of memory")
    parser.add_argument("--checks-only", action="store_true",
                        help="run only the brute-force checks of the search's answer, not the brute-force search")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    options = {"width": args.width, "capacity": args.capacity, "samples": args.samples, "steps": args.steps,
               "collective_timeout": args.collective_timeout, "full_brute_force": not args.checks_only}
    document = run_benchmark(args.worlds, options)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(document, args.out / f"{NAME}.json")
    (args.out / f"{NAME}.md").write_text(markdown_document(document))
    sys.stdout.write(markdown_document(document))
    return 0 if all(row["ranks_agree"] and row["recommended_fits"] for row in document["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
