"""What a GPU-free prediction costs against one memory estimate, on models that are not in the comparison zoo.

``predict_max_batch_size(model, sample, gpu=...)`` searches every batch size for the largest that fits a GPU;
``estimate_memory(model, sample, batch_size)`` traces the training step at one size. The prediction traces the step
once and replays its allocations at every size (:mod:`batchfinder.memory.replay`), so it should cost about one estimate.
Each call runs first in a fresh Python process (nothing cached), and again in the same process (warm).

Run from the repository root::

    python -m benchmarks.prediction_cost                 # every model, results in benchmarks/results/
    python -m benchmarks.prediction_cost --models gpt2_small --no-write

Results: ``benchmarks/results/prediction-cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["MODELS", "measure", "main"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
GPU = "A100-40GB"
ESTIMATE_BATCH = 32


def _torchvision(name: str) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        import torchvision.models as models

        return getattr(models, name)(num_classes=1000), (torch.randn(3, 224, 224), torch.tensor(1))

    return build


def _encoder() -> tuple[nn.Module, Any]:
    """A 4-layer Transformer encoder classifier over 128 tokens (d_model 256), written here."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(8000, 256)
            layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.1, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = nn.Linear(256, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(tokens)).mean(dim=1))

    return Encoder(), (torch.randint(0, 8000, (128,)), torch.tensor(1))


def _gpt2_small() -> tuple[nn.Module, Any]:
    """GPT-2 small (124M parameters) from its configuration (no download), causal LM loss over 256 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config())
    tokens = torch.randint(0, 50257, (256,))
    return model, {"input_ids": tokens, "labels": tokens}


def _small_encoder() -> tuple[nn.Module, Any]:
    """The comparison zoo's small Transformer (2 layers, d_model 64, 64 tokens): a trace so cheap that the replays
    show."""
    from .workloads import TokenClassifier

    return TokenClassifier(), (torch.randint(0, 1000, (64,)), torch.tensor(1))


MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "resnet50": _torchvision("resnet50"),
    "resnet101": _torchvision("resnet101"),
    "densenet121": _torchvision("densenet121"),
    "vit_b_16": _torchvision("vit_b_16"),
    "encoder_4x256": _encoder,
    "gpt2_small": _gpt2_small,
    "small_encoder_2x64": _small_encoder,
}
"""Models measured, by name: a builder returning ``(model, one sample)``."""


def measure(name: str, first: str) -> dict[str, Any]:
    """In this process: build ``name``, run ``first`` (``"estimate"`` or ``"predict"``) then the other, then both
    again (warm); the seconds of each."""
    import batchfinder as bf

    torch.manual_seed(0)
    model, sample = MODELS[name]()
    calls: dict[str, Callable[[], Any]] = {
        "estimate": lambda: bf.estimate_memory(model, sample, ESTIMATE_BATCH),
        "predict": lambda: bf.predict_max_batch_size(model, sample, gpu=GPU),
    }
    order = [first, "predict" if first == "estimate" else "estimate"]
    seconds: dict[str, float] = {}
    answer: dict[str, Any] = {}
    for label in (*[f"{what} (cold)" for what in order], *[f"{what} (warm)" for what in order]):
        what = label.split(" ")[0]
        started = time.perf_counter()
        out = calls[what]()
        seconds[label] = round(time.perf_counter() - started, 3)
        if what == "predict":
            answer = {"max_batch_size": out.max_batch_size, "method": out.method, "traces": out.traces}
    return {"model": name, "first": first, "seconds": seconds, **answer}


def _in_subprocess(name: str, first: str) -> dict[str, Any]:
    code = (
        "import json, sys; from benchmarks.prediction_cost import measure; "
        f"print('RESULT ' + json.dumps(measure({name!r}, {first!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {"model": name, "first": first, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[len("RESULT ") :])


def run(models: Sequence[str]) -> list[dict[str, Any]]:
    """Per model: the prediction and the estimate each run first in a fresh process; the ratios of their times."""
    rows = []
    for name in models:
        runs = {first: _in_subprocess(name, first) for first in ("estimate", "predict")}
        error = next((r["error"] for r in runs.values() if "error" in r), None)
        if error is not None:
            rows.append({"model": name, "error": error})
            continue
        estimate_cold = runs["estimate"]["seconds"]["estimate (cold)"]
        predict_cold = runs["predict"]["seconds"]["predict (cold)"]
        estimate_warm = runs["estimate"]["seconds"]["estimate (warm)"]
        predict_warm = runs["estimate"]["seconds"]["predict (warm)"]
        rows.append({
            "model": name,
            "max_batch_size": runs["predict"]["max_batch_size"],
            "method": runs["predict"]["method"],
            "traces": runs["predict"]["traces"],
            "estimate_cold": estimate_cold,
            "predict_cold": predict_cold,
            "ratio_cold": round(predict_cold / estimate_cold, 2),
            "estimate_warm": estimate_warm,
            "predict_warm": predict_warm,
            "ratio_warm": round(predict_warm / estimate_warm, 2),
            "runs": runs,
        })
    return rows


def markdown(rows: list[dict[str, Any]], environment: dict[str, Any]) -> str:
    lines = [
        "# Prediction cost: `predict_max_batch_size` against one `estimate_memory`",
        "",
        f"- Prediction for an {GPU}; estimate at batch size {ESTIMATE_BATCH}; Adam; each call first in a fresh process "
        "(cold), then again in the same process (warm).",
        f"- torch {environment['torch']}, Python {environment['python']}, {environment['cpu_count']} CPUs",
        "- Command: `python -m benchmarks.prediction_cost`",
        "",
        "| model | predicted max | traces | estimate (s) | predict (s) | predict / estimate | warm: estimate | warm: predict | warm ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | error: {row['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {row['model']} | {row['max_batch_size']:,} | {row['traces']} | {row['estimate_cold']:.2f} | "
            f"{row['predict_cold']:.2f} | **{row['ratio_cold']:.2f}x** | {row['estimate_warm']:.2f} | "
            f"{row['predict_warm']:.2f} | {row['ratio_warm']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prediction_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory for prediction-cost.json and .md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    from .common import environment

    env = environment("cpu")
    rows = run(names)
    text = markdown(rows, env)
    print(text)
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prediction-cost.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
        (out / "prediction-cost.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
