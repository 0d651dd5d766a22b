"""Hugging Face Trainer: batchfinder's ``find_trainer_batch_size`` against the Trainer's own
``auto_find_batch_size=True``, on the same Trainer and the same simulated GPU.

The workload is a small BERT built from a config (``BertForSequenceClassification``: vocabulary 500, hidden size 32,
2 layers, 2 heads) on synthetic token sequences of long-tailed lengths (most short, a few up to ``--longest`` tokens),
padded to the longest of each batch by ``DataCollatorWithPadding``, trained with the Trainer's default AdamW. The GPU
is a :class:`batchfinder.SimulatedGPU` of ``--capacity`` (its caching-allocator model) on the CPU.

For each finder and each shuffle seed (``--seeds``; the Trainer's ``seed`` and ``data_seed``):

* batchfinder: ``find_trainer_batch_size(trainer, device=SimulatedGPU(capacity))`` on a fresh Trainer; the size used
  is what it writes into ``args.per_device_train_batch_size`` (its recommended size). Its trials run on the largest
  samples, so its answer does not depend on the seed; it runs once and its size is tried with every seed.
* Trainer: ``auto_find_batch_size=True`` (Accelerate's shrink-only decorator: start at
  ``per_device_train_batch_size`` = ``--start``, x0.9 after each out-of-memory error), ``trainer.train()`` with
  ``max_steps=--steps`` inside ``with SimulatedGPU(capacity):``; the size used is the one it ends at
  (``trainer._train_batch_size``); its trials are the training restarts (``on_train_begin`` calls), its OOMs the
  restarts less one.

Then ONE FULL SHUFFLED EPOCH is trained at each size with a fresh Trainer (same initial weights, the shuffle of
that seed) inside a fresh simulated GPU of the same capacity: survived, or the step at which it ran out of memory.
Wall seconds are the finder's own (the Trainer's include its ``--steps`` training steps at the final size).

Run from the repository root::

    python -m benchmarks.hf_trainer          # writes benchmarks/results/hf-trainer-simulated-cpu.{md,json}
    python -m benchmarks.hf_trainer --seeds 0 --out /tmp/hf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import batchfinder as bf

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "hf-trainer-simulated-cpu"
VOCAB = 500


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def text_dataset(count: int, longest: int, seed: int = 1234) -> list[dict[str, Any]]:
    """Token sequences of long-tailed lengths (log-normal, median ~40, 8 to ``longest``; the 4 last are
    ``longest`` long), with a class label each."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(count, generator=generator) * 0.7 + math.log(40)).clamp(8, longest).long().tolist()
    lengths[-4:] = [longest] * 4
    return [
        {"input_ids": torch.randint(2, VOCAB, (n,), generator=generator).tolist(), "attention_mask": [1] * n,
         "labels": i % 2}
        for i, n in enumerate(lengths)
    ]


def padding_collator() -> Any:
    """``DataCollatorWithPadding`` with a word-level tokenizer built offline."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]", unk_token="[UNK]"
    )
    return transformers.DataCollatorWithPadding(tokenizer)


def make_trainer(data: list[dict[str, Any]], out: str, seed: int, **arguments: Any) -> Any:
    """A fresh Trainer on the CPU around the small BERT with the same initial weights every time."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=out, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        seed=seed, data_seed=seed, **arguments,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=padding_collator())
    trainer.remove_callback(transformers.PrinterCallback)  # no metrics printed after every run
    return trainer


def epoch_survives(data: list[dict[str, Any]], size: int, capacity: str, seed: int, out: str) -> dict[str, Any]:
    """Train one full shuffled epoch at ``size`` on a fresh simulated GPU: survived, or the step that ran out."""
    trainer = make_trainer(data, out, seed, per_device_train_batch_size=size, num_train_epochs=1)
    steps = math.ceil(len(data) / size)
    started = time.perf_counter()
    try:
        with bf.SimulatedGPU(capacity):
            trainer.train()
    except torch.OutOfMemoryError:
        step = trainer.state.global_step + 1
        return {"survived": False, "failed_step": step, "steps": steps, "seconds": time.perf_counter() - started}
    return {"survived": True, "failed_step": None, "steps": steps, "seconds": time.perf_counter() - started}


def run_batchfinder(data: list[dict[str, Any]], capacity: str, start: int, out: str) -> dict[str, Any]:
    from batchfinder.hf.trainer import find_trainer_batch_size

    trainer = make_trainer(data, out, 0, per_device_train_batch_size=start)
    started = time.perf_counter()
    result = find_trainer_batch_size(trainer, device=bf.SimulatedGPU(capacity))
    return {
        "size": trainer.args.per_device_train_batch_size,
        "max_batch_size": result.max_batch_size,
        "trials": result.num_trials,
        "confirmations": len(result.confirmations),
        "ooms": result.num_ooms,
        "tried": [t.batch_size for t in result.trials],
        "seconds": time.perf_counter() - started,
    }


def run_trainer_auto(data: list[dict[str, Any]], capacity: str, start: int, steps: int, seed: int,
                     out: str) -> dict[str, Any]:
    import transformers

    class Restarts(transformers.TrainerCallback):
        """Counts the training (re)starts and the batch size of each."""

        def __init__(self) -> None:
            self.sizes: list[int] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.sizes.append(int(state.train_batch_size))

    trainer = make_trainer(data, out, seed, per_device_train_batch_size=start, auto_find_batch_size=True,
                           max_steps=steps)
    restarts = Restarts()
    trainer.add_callback(restarts)
    started = time.perf_counter()
    error = None
    try:
        with bf.SimulatedGPU(capacity):
            trainer.train()
    except RuntimeError as exc:  # "No executable batch size found, reached zero."
        error = str(exc).splitlines()[0]
    return {
        "size": None if error else int(trainer._train_batch_size),
        "trials": len(restarts.sizes),
        "ooms": len(restarts.sizes) - (0 if error else 1),
        "tried": restarts.sizes,
        "error": error,
        "seconds": time.perf_counter() - started,
    }


def run(
    capacity: str, samples: int, longest: int, start: int, steps: int, seeds: list[int], out: str
) -> dict[str, Any]:
    """Both finders on the same data and capacity, and one shuffled epoch at each size they give."""
    data = text_dataset(samples, longest)
    lengths = sorted(len(s["input_ids"]) for s in data)
    finder = run_batchfinder(data, capacity, start, out)
    finder["epochs"] = {seed: epoch_survives(data, finder["size"], capacity, seed, out) for seed in seeds}
    trainer_runs = []
    for seed in seeds:
        record = run_trainer_auto(data, capacity, start, steps, seed, out)
        record["seed"] = seed
        if record["size"] is not None:
            record["epoch"] = epoch_survives(data, record["size"], capacity, seed, out)
        trainer_runs.append(record)
    return {
        "settings": {"capacity": capacity, "samples": samples, "longest": longest, "start": start, "steps": steps,
                     "seeds": seeds},
        "data": {"min": lengths[0], "median": lengths[len(lengths) // 2], "p90": lengths[int(0.9 * len(lengths))],
                 "max": lengths[-1]},
        "batchfinder": finder,
        "trainer_auto_find_batch_size": trainer_runs,
    }


def _epoch(outcome: dict[str, Any] | None) -> str:
    if outcome is None:
        return "-"
    if outcome["survived"]:
        return f"survived ({outcome['steps']} steps)"
    return f"**OOM at step {outcome['failed_step']} of {outcome['steps']}**"


def report(record: dict[str, Any]) -> str:
    s, d, env = record["settings"], record["data"], record["environment"]
    finder = record["batchfinder"]
    lines = [
        f"# Hugging Face Trainer: find_trainer_batch_size vs auto_find_batch_size ({NAME})",
        "",
        f"- Device: `batchfinder.SimulatedGPU(\"{s['capacity']}\")` on the CPU ({env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch thread)",
        f"- Versions: batchfinder {env['batchfinder']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"accelerate {env['accelerate']}, Python {env['python']}",
        f"- Command: `python -m benchmarks.hf_trainer`; total {record['seconds']:.1f} s",
        f"- Workload: BertForSequenceClassification from a config (vocabulary 500, hidden 32, 2 layers, 2 heads), "
        f"AdamW (the Trainer's default), {s['samples']:,} synthetic sequences padded per batch by "
        f"DataCollatorWithPadding; lengths min {d['min']}, median {d['median']}, p90 {d['p90']}, max {d['max']} "
        "tokens (4 sequences of the maximum)",
        f"- Trainer's finder: `auto_find_batch_size=True`, starting at {s['start']}, x0.9 after each OOM, "
        f"`max_steps={s['steps']}`; batchfinder starts at the same {s['start']}.",
        "",
        "Each size is then trained for one full shuffled epoch (seed = the Trainer's `seed` and `data_seed`) on a "
        "fresh Trainer and a fresh simulated GPU of the same capacity. Wall seconds vary from run to run; sizes, "
        "trials, OOMs and epoch outcomes do not.",
        "",
        "| finder | seed | size used | trials | OOMs | one shuffled epoch | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, (seed, outcome) in enumerate(finder["epochs"].items()):
        first = index == 0  # one search; its size is trained with every seed
        search = (
            f"{finder['trials']} + {finder['confirmations']} confirming | {finder['ooms']}" if first else "(same) | -"
        )
        seconds = f"{finder['seconds']:.1f}" if first else "-"
        lines.append(
            f"| batchfinder `find_trainer_batch_size` | {seed} | {finder['size']} (max {finder['max_batch_size']}) | "
            f"{search} | {_epoch(outcome)} | {seconds} |"
        )
    for run in record["trainer_auto_find_batch_size"]:
        size = run["size"] if run["size"] is not None else f"none ({run['error']})"
        lines.append(
            f"| Trainer `auto_find_batch_size` | {run['seed']} | {size} | {run['trials']} | {run['ooms']} | "
            f"{_epoch(run.get('epoch'))} | {run['seconds']:.1f} |"
        )
    survived = sum(o["survived"] for o in finder["epochs"].values())
    auto = record["trainer_auto_find_batch_size"]
    auto_survived = sum(bool(r.get("epoch", {}).get("survived")) for r in auto)
    mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
    lines += [
        "",
        "## Summary",
        "",
        "| finder | size per seed | epochs survived | trials | OOMs | seconds |",
        "|---|---|---|---|---|---|",
        f"| batchfinder | {', '.join(str(finder['size']) for _ in finder['epochs'])} (one search) | "
        f"{survived}/{len(finder['epochs'])} | {finder['trials']} + {finder['confirmations']} confirming | "
        f"{finder['ooms']} | {finder['seconds']:.1f} |",
        f"| Trainer auto_find_batch_size | {', '.join(str(r['size']) for r in auto)} | {auto_survived}/{len(auto)} | "
        f"{mean([r['trials'] for r in auto]):.1f} per seed | {mean([r['ooms'] for r in auto]):.1f} per seed | "
        f"{mean([r['seconds'] for r in auto]):.1f} per seed |",
        "",
        f"Sizes batchfinder tried: {', '.join(map(str, finder['tried']))}. Sizes the Trainer trained at, per seed: "
        + "; ".join(f"seed {r['seed']}: {', '.join(map(str, r['tried']))}" for r in auto) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", default="64MiB", help="simulated GPU capacity (default 64MiB)")
    parser.add_argument("--samples", type=int, default=1024, help="training sequences (default 1024)")
    parser.add_argument("--longest", type=int, default=250, help="longest sequence in tokens (default 250)")
    parser.add_argument("--start", type=int, default=128, help="starting batch size of both finders (default 128)")
    parser.add_argument("--steps", type=int, default=3, help="max_steps of the Trainer's own search (default 3)")
    parser.add_argument("--seeds", default="0,1,2", help="shuffle seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--out", default=str(RESULTS), help="where to write the .md and .json")
    options = parser.parse_args()
    torch.set_num_threads(1)  # small operations on a busy 2-core machine: one thread is the fastest
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = [int(s) for s in options.seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as scratch:  # the Trainers' output_dir: nothing is saved there
        record = run(options.capacity, options.samples, options.longest, options.start, options.steps, seeds, scratch)
    record["seconds"] = time.perf_counter() - started
    record["environment"] = {
        "batchfinder": bf.__version__, "torch": torch.__version__, "transformers": _version("transformers"),
        "accelerate": _version("accelerate"), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    (out / f"{NAME}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / f"{NAME}.md").write_text(report(record))
    print(report(record))


if __name__ == "__main__":
    main()
