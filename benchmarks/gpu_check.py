"""A five-minute check of batchfinder on a real CUDA GPU: the GPU tests, estimates against measured peaks, searches.

Run from the repository root on any machine with a CUDA GPU::

    python -m benchmarks.gpu_check                      # everything, in under 5 minutes on one GPU
    python -m benchmarks.gpu_check --skip-tests         # without the pytest run
    python -m benchmarks.gpu_check --out /tmp/check --memory-limit 4GiB

What it does, on the current CUDA device (``cuda:0`` unless ``torch.cuda.set_device`` says otherwise):

1. **Tests.** Runs ``pytest -m cuda tests/`` in a subprocess (at most ``--pytest-timeout`` seconds) and records how
   many passed, failed, were skipped or errored, and which failed.
2. **Estimates against measured peaks.** For each of four models (the MNIST MLP on 1x28x28 images, torchvision
   resnet18 on 3x64x64 images when torchvision imports, a 2-layer Transformer encoder classifier on 64 token ids,
   a small CNN with BatchNorm on 3x32x32 images) at a fixed batch size, on random data of the real shape: two
   training steps with Adam (forward, cross-entropy, backward, ``step()``, ``zero_grad(set_to_none=True)``) on the
   GPU, with ``torch.cuda.max_memory_allocated()`` and ``max_memory_reserved()`` measured from a reset taken before
   the model moves to the GPU; ``batchfinder.estimate_memory(...).peak`` for the same step; and the same two steps
   on a ``batchfinder.SimulatedGPU`` (its allocated peak, and its reserved peak where the simulated GPU has
   ``max_memory_reserved``). Tiny matmuls run first, forward and backward, so that both threads' cuBLAS
   workspaces, which the estimator does not model, are in every model's *baseline* (memory held before its model
   moved to the GPU, recorded as ``baseline_after_warm_up``) rather than in the first model's peak.
3. **Searches.** ``batchfinder.find_batch_size(..., device="cuda", memory_limit=...)`` in ``binsearch`` and
   ``guided`` mode on the MLP and the Transformer, each capped by ``--time-budget`` seconds: the largest size that
   fitted, the recommended size, trials, out-of-memory errors, seconds, why it stopped.
4. **Report.** Writes ``<out>/<gpu-name-slug>-check.md`` and ``.json`` (default ``benchmarks/results``, e.g.
   ``NVIDIA-H100-80GB-HBM3-check.md``): the GPU, torch/CUDA/cuDNN versions, the driver as NVML reports it, every
   figure above and, per model, the ratio ``estimate / max_memory_allocated``; then prints the Markdown.

Exit status: 0 when every test passed and every check ran, 1 when a test failed or a check raised (the report is
written either way), 2 without a CUDA GPU: then it prints one line and writes nothing.

The pieces that need no GPU (:func:`build_report`, :func:`parse_pytest_output`, :func:`gpu_slug`,
:func:`train_steps`, :func:`simulated_peaks`) are tested in ``tests/test_gpu_check.py``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import batchfinder as bf
from batchfinder.devices import nvml
from batchfinder.devices.cuda import warm_up_cublas
from batchfinder.units import format_bytes, parse_bytes
from batchfinder.zoo import mnist_mlp

from .workloads import CyclicDataset, TokenClassifier

__all__ = [
    "NO_GPU_MESSAGE",
    "ModelSpec",
    "MODELS",
    "SEARCH_MODELS",
    "PytestRun",
    "MemoryCheck",
    "SearchCheck",
    "cuda_available",
    "current_cuda_device",
    "environment",
    "measure_memory",
    "run_cuda_tests",
    "run_search",
    "warm_up",
    "parse_pytest_output",
    "gpu_slug",
    "train_steps",
    "simulated_peaks",
    "build_report",
    "write_report",
    "main",
]

SCHEMA_VERSION = 1
NO_GPU_MESSAGE = "no CUDA GPU here: gpu_check needs one; nothing was written"
EXIT_NO_GPU = 2
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
STEPS = 2
"""Training steps per measurement (Adam creates its state in the first)."""
POOL_SIZE = 256
"""Distinct random samples behind every dataset (they repeat)."""
SIMULATED_CAPACITY = 1 << 40
"""The simulated GPU the steps are replayed on is this large (1 TiB): nothing runs out of memory there."""
CHILD_ENV = "BATCHFINDER_GPU_CHECK_CHILD"
"""Set in the pytest subprocess, so that a test can never start another gpu_check run of the tests."""


# -- models -------------------------------------------------------------------------------------------------------
class BatchNormCNN(nn.Module):
    """Three 3x3 convolutions with BatchNorm and ReLU (32, 64, 128 channels), pooling, a linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _resnet18() -> nn.Module:
    from torchvision.models import (
        resnet18,  # ImportError when torchvision is missing: the model is skipped
    )

    return resnet18(num_classes=10)


@dataclass(frozen=True)
class ModelSpec:
    """A model of the check, the shape of its samples and the batch size its memory is measured at."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    """Batch size of the memory comparison (the searches find their own)."""
    vocab_size: int = 0
    """Above 0: the inputs are int64 token ids below this; otherwise float32 values."""

    @property
    def input_description(self) -> str:
        if self.vocab_size:
            return f"{self.input_shape[0]} token ids"
        return "x".join(map(str, self.input_shape)) + " float32"

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample (input and int64 target)."""
        numel = 1
        for size in self.input_shape:
            numel *= size
        return numel * (8 if self.vocab_size else 4) + 8

    def model(self, seed: int = 0) -> nn.Module:
        """A fresh model with weights drawn from ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()

    def dataset(self, length: int, seed: int = 0) -> CyclicDataset:
        """``length`` samples repeating :data:`POOL_SIZE` random ones: ``(input, class)`` pairs."""
        generator = torch.Generator().manual_seed(seed + 1)
        if self.vocab_size:
            inputs = torch.randint(0, self.vocab_size, (POOL_SIZE, *self.input_shape), generator=generator)
        else:
            inputs = torch.randn((POOL_SIZE, *self.input_shape), generator=generator)
        targets = torch.randint(0, self.num_classes, (POOL_SIZE,), generator=generator)
        return CyclicDataset(inputs, targets, length)

    def batch(self, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A host batch of ``batch_size`` samples, as a DataLoader would collate it."""
        data = self.dataset(max(batch_size, 1), seed)
        index = torch.arange(batch_size) % POOL_SIZE
        return data.inputs[index].contiguous(), data.targets[index].contiguous()


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("mnist_mlp", "MNIST MLP 784-128-10 (batchfinder.zoo)", mnist_mlp, (1, 28, 28), 10, 4096),
    ModelSpec("resnet18", "torchvision resnet18, 10 classes", _resnet18, (3, 64, 64), 10, 64),
    ModelSpec(
        "transformer", "Transformer encoder classifier, 2 layers, d=64, 4 heads", TokenClassifier, (64,), 2, 256,
        vocab_size=1000,
    ),
    ModelSpec("bn_cnn", "CNN, 3 conv + BatchNorm blocks (32-64-128 channels)", BatchNormCNN, (3, 32, 32), 10, 256),
)
"""The models whose estimates are compared with measured peaks, in the order they run."""
SEARCH_MODELS: tuple[str, ...] = ("mnist_mlp", "transformer")
SEARCH_MODES: tuple[str, ...] = ("binsearch", "guided")


# -- results ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PytestRun:
    """The outcome of ``pytest -m cuda tests/``."""

    command: list[str]
    returncode: int | None
    """None when it ran past its time limit."""
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    """``passed``, ``failed``, ``skipped``, ``errors``, ``deselected``, ... as pytest's summary line gives them."""
    failures: list[str] = field(default_factory=list)
    """Node ids of the tests that failed or errored."""
    summary: str = ""
    """pytest's last summary line (or why there is none)."""
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.counts.get("failed") and not self.counts.get("errors")


@dataclass(frozen=True)
class MemoryCheck:
    """One model's two training steps at a fixed batch size: estimated, measured on the GPU, and simulated."""

    model: str
    description: str
    input: str
    batch_size: int
    estimate_peak: int | None = None
    """``batchfinder.estimate_memory(model, sample, batch_size, optimizer=torch.optim.Adam).peak``."""
    estimate_phase: str | None = None
    """Where the estimator puts the peak, e.g. ``backward (step 2)``."""
    max_allocated: int | None = None
    """``torch.cuda.max_memory_allocated()`` over the two steps, from a reset before the model moved to the GPU."""
    baseline_allocated: int | None = None
    """``torch.cuda.memory_allocated()`` at that reset (cuBLAS's workspace, anything left over)."""
    max_reserved: int | None = None
    """``torch.cuda.max_memory_reserved()`` over the same steps."""
    simulated_peak: int | None = None
    """``SimulatedGPU.max_memory_allocated()`` of the same two steps on the CPU."""
    simulated_reserved: int | None = None
    """``SimulatedGPU.max_memory_reserved()``, where the simulated GPU has it."""
    seconds: float = 0.0
    skipped: str | None = None
    """Why the model was not measured (e.g. torchvision is missing)."""
    errors: list[str] = field(default_factory=list)
    """What failed, one line each (the figures that could be measured are kept)."""

    @property
    def ratio(self) -> float | None:
        """``estimate_peak / max_allocated``."""
        return _ratio(self.estimate_peak, self.max_allocated)

    @property
    def ratio_without_baseline(self) -> float | None:
        """``estimate_peak / (max_allocated - baseline_allocated)``: the estimate against what the step added."""
        if self.max_allocated is None or self.baseline_allocated is None:
            return None
        return _ratio(self.estimate_peak, self.max_allocated - self.baseline_allocated)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["ratio_without_baseline"] = self.ratio_without_baseline
        return data


@dataclass(frozen=True)
class SearchCheck:
    """One ``find_batch_size`` run on the GPU under a memory limit."""

    model: str
    mode: str
    memory_limit: int
    max_batch_size: int | None = None
    batch_size: int | None = None
    """The recommended size (``floor(0.8 * max_batch_size)``)."""
    trials: int | None = None
    ooms: int | None = None
    steps: int | None = None
    seconds: float = 0.0
    stop_reason: str | None = None
    predicted_max_batch_size: int | None = None
    """``guided``: the largest size the estimate alone put within the limit."""
    prediction_status: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(numerator: int | None, denominator: int | None) -> float | None:
    if numerator is None or not denominator or denominator <= 0:
        return None
    return round(numerator / denominator, 4)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- pure helpers -------------------------------------------------------------------------------------------------
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b")
_SUMMARY = re.compile(r"\d+ (passed|failed|skipped|deselected|xfailed|xpassed|errors?)\b|no tests ran")


def parse_pytest_output(output: str) -> tuple[dict[str, int], list[str], str]:
    """Counts from pytest's last summary line (``errors`` and ``warnings`` always plural), the node ids of the tests
    that failed or errored (from the ``-ra`` short summary), and the summary line itself."""
    lines = [line.strip().strip("=").strip() for line in output.splitlines()]
    summary = next((line for line in reversed(lines) if _SUMMARY.search(line)), "")
    counts: dict[str, int] = {}
    for number, word in _COUNT.findall(summary):
        key = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[key] = counts.get(key, 0) + int(number)
    failures = [line.split()[1] for line in lines if re.match(r"(FAILED|ERROR) \S", line)]
    return counts, failures, summary


def gpu_slug(name: str) -> str:
    """A file-name stem from a GPU name: ``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-.") or "cuda"


def train_steps(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int = STEPS) -> None:
    """``steps`` training steps as batchfinder runs them: forward, cross-entropy, backward, Adam ``step()``,
    ``zero_grad(set_to_none=True)``. The model and batch are used on the device they are on."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters())
    inputs, targets = batch
    for _ in range(steps):
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def simulated_peaks(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int = STEPS
) -> tuple[int, int | None]:
    """The allocated peak of :func:`train_steps` on a large ``SimulatedGPU`` (model and batch charged when first
    used, as a transfer would be), and its reserved peak where the simulated GPU reports one (None otherwise)."""
    gpu = bf.SimulatedGPU(SIMULATED_CAPACITY)
    with gpu:
        train_steps(model, batch, steps)
    reserved = gpu.max_memory_reserved() if hasattr(gpu, "max_memory_reserved") else None
    return int(gpu.max_memory_allocated()), None if reserved is None else int(reserved)


# -- the report -----------------------------------------------------------------------------------------------------
def _bytes(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _fixed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _environment_lines(env: dict[str, Any]) -> list[str]:
    driver = env.get("nvml") or {}
    if driver.get("available"):
        version, cuda = driver.get("driver_version") or "unknown", driver.get("cuda_driver_version") or "unknown"
        driver_line = (
            f"NVIDIA driver {version}, CUDA {cuda} (driver); NVML GPU {driver.get('gpu_index', '?')} "
            f"({driver.get('cuda_mapping') or 'mapping unknown'})"
        )
    else:
        driver_line = f"NVML: {driver.get('reason') or 'not queried'}"
    total = env.get("gpu_total_bytes")
    return [
        f"* GPU: {env.get('gpu_name', 'unknown')} (cuda:{env.get('gpu_index', 0)}"
        + (f", {format_bytes(total)}" if total else "")
        + (f", compute capability {env['compute_capability']}" if env.get("compute_capability") else "")
        + ")",
        f"* {driver_line}",
        (
            f"* torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda') or '?'}, cuDNN {env.get('cudnn') or '?'}), "
            f"torchvision {env.get('torchvision') or 'not installed'}, batchfinder {env.get('batchfinder', '?')}, "
            f"Python {env.get('python', '?')}"
        ),
        f"* {env.get('platform', '')}; run at {env.get('date', '?')}, {env.get('seconds', 0):.0f} s in all",
        *(
            [f"* allocated after the warm-up (both threads' cuBLAS workspaces), in every baseline: "
             f"{format_bytes(env['baseline_after_warm_up'])}"]
            if env.get("baseline_after_warm_up") is not None else []
        ),
    ]


def _tests_lines(tests: PytestRun | None) -> list[str]:
    lines = ["## CUDA tests", ""]
    if tests is None:
        return lines + ["Not run (`--skip-tests`).", ""]
    status = "timed out" if tests.returncode is None else f"exit status {tests.returncode}"
    counts = ", ".join(f"{tests.counts.get(key, 0)} {key}" for key in ("passed", "failed", "skipped", "errors"))
    lines.append(f"`{' '.join(tests.command)}`: {counts} ({status}, {tests.seconds:.1f} s).")
    if tests.summary:
        lines.append(f"pytest: `{tests.summary}`")
    if tests.failures:
        lines += ["", "Failed:", *[f"* `{node}`" for node in tests.failures]]
    return lines + [""]


def _memory_lines(memory: Sequence[MemoryCheck]) -> list[str]:
    lines = [
        f"## Estimate against measured peak ({STEPS} Adam steps)",
        "",
        (
            "| model | input | batch | estimate | max allocated | baseline | max reserved | simulated peak | "
            "simulated reserved | estimate / allocated | estimate / (allocated - baseline) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for check in memory:
        if check.skipped:
            lines.append(f"| {check.model} | {check.input} | {check.batch_size:,} | skipped: {check.skipped} |"
                         " | | | | | | |")
            continue
        lines.append(
            f"| {check.model} | {check.input} | {check.batch_size:,} | {_bytes(check.estimate_peak)} | "
            f"{_bytes(check.max_allocated)} | {_bytes(check.baseline_allocated)} | {_bytes(check.max_reserved)} | "
            f"{_bytes(check.simulated_peak)} | {_bytes(check.simulated_reserved)} | {_fixed(check.ratio)} | "
            f"{_fixed(check.ratio_without_baseline)} |"
        )
    lines += [
        "",
        (
            "*estimate*: `bf.estimate_memory(model, sample, batch, optimizer=torch.optim.Adam).peak`; *max allocated* "
            "/ *max reserved*: `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` from a reset before the "
            "model moved to the GPU; *baseline*: what was allocated at that reset (cuBLAS's workspace); *simulated*: "
            "the same steps on a `bf.SimulatedGPU` (`-` where it reports no reserved figure)."
        ),
    ]
    notes = [f"* {check.model}: {error}" for check in memory for error in check.errors]
    return lines + ([""] + notes if notes else []) + [""]


def _search_lines(searches: Sequence[SearchCheck]) -> list[str]:
    limits = sorted({s.memory_limit for s in searches})
    title = f" (memory_limit {', '.join(format_bytes(limit) for limit in limits)})" if limits else ""
    lines = [
        f"## find_batch_size on the GPU{title}",
        "",
        "| model | mode | max_batch_size | recommended | trials | OOMs | steps | seconds | stopped | predicted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in searches:
        if run.error:
            lines.append(f"| {run.model} | {run.mode} | error: {run.error} | | | | | {run.seconds:.1f} | | |")
            continue
        predicted = "-" if run.predicted_max_batch_size is None else (
            f"{run.predicted_max_batch_size:,} ({run.prediction_status})"
        )
        lines.append(
            f"| {run.model} | {run.mode} | {_number(run.max_batch_size)} | {_number(run.batch_size)} | "
            f"{_number(run.trials)} | {_number(run.ooms)} | {_number(run.steps)} | {run.seconds:.1f} | "
            f"{run.stop_reason or '-'} | {predicted} |"
        )
    return lines + [""]


def build_report(
    env: dict[str, Any],
    tests: PytestRun | None,
    memory: Sequence[MemoryCheck],
    searches: Sequence[SearchCheck],
) -> tuple[str, dict[str, Any]]:
    """The Markdown report and the JSON-ready dictionary of one check, from figures already measured."""
    title = f"# batchfinder GPU check: {env.get('gpu_name', 'unknown GPU')}"
    sections = [*_tests_lines(tests), *_memory_lines(memory), *_search_lines(searches)]
    markdown = "\n".join([title, "", *_environment_lines(env), "", *sections])
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "gpu_check",
        "environment": env,
        "tests": None if tests is None else {**asdict(tests), "ok": tests.ok},
        "memory": [check.as_dict() for check in memory],
        "searches": [run.as_dict() for run in searches],
    }
    return markdown.rstrip() + "\n", data


def write_report(out: Path, slug: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<out>/<slug>-check.md`` and ``.json``; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{slug}-check.md", out / f"{slug}-check.json"
    md_path.write_text(markdown, encoding="utf-8")
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return md_path, json_path


# -- measuring (needs a GPU) ----------------------------------------------------------------------------------------
def run_cuda_tests(timeout: float, paths: Sequence[str] = ("tests/",), cwd: Path = ROOT) -> PytestRun:
    """``pytest -m cuda tests/`` in a subprocess from the repository root (``paths`` and ``cwd`` for the tests)."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", *paths, "-q", "-ra", "-p", "no:cacheprovider"]
    shown = ["pytest", "-m", "cuda", *paths]
    env = {**os.environ, CHILD_ENV: "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        output, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        partial = [p.decode(errors="replace") if isinstance(p, bytes) else (p or "") for p in (exc.stdout, exc.stderr)]
        output, returncode = "".join(partial), None
    seconds = time.perf_counter() - start
    counts, failures, summary = parse_pytest_output(output)
    if returncode is None:
        summary = f"timed out after {timeout:.0f} s" + (f"; last summary: {summary}" if summary else "")
    tail = "\n".join(output.splitlines()[-40:])
    return PytestRun(shown, returncode, round(seconds, 2), counts, failures, summary, tail)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def current_cuda_device() -> torch.device:
    """The device everything runs on: ``cuda:<torch.cuda.current_device()>``."""
    return torch.device("cuda", torch.cuda.current_device())


def warm_up(device: torch.device) -> int:
    """Small matrix multiplies forward *and* backward (:func:`batchfinder.devices.cuda.warm_up_cublas`), so that the
    cuBLAS workspaces of both threads (the caller's and autograd's backward thread, 32 MiB each from Hopper on)
    exist before the first measurement: they then count in every model's baseline, not in the first model's peak.
    Returns the bytes allocated afterwards: the baseline the report subtracts."""
    warm_up_cublas(device)
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure_memory(spec: ModelSpec, device: torch.device, seed: int = 0) -> MemoryCheck:
    """Estimate, GPU measurement and simulated replay of ``spec``'s two training steps at its batch size."""
    base = MemoryCheck(spec.name, spec.description, spec.input_description, spec.batch_size)
    start = time.perf_counter()
    try:
        model = spec.model(seed)
    except ImportError as exc:
        return replace(base, skipped=f"{exc.name or 'a module'} does not import ({exc})")
    batch = spec.batch(spec.batch_size, seed)
    sample = (batch[0][0], batch[1][0])
    figures: dict[str, Any] = {}
    errors: list[str] = []
    try:
        estimate = bf.estimate_memory(model, sample, spec.batch_size, optimizer=torch.optim.Adam)
        figures.update(estimate_peak=estimate.peak, estimate_phase=estimate.peak_phase)
    except Exception as exc:  # recorded, and the other measurements still run
        errors.append(f"estimate: {_first_line(exc)}")
    try:
        peak, reserved = simulated_peaks(copy.deepcopy(model), batch)
        figures.update(simulated_peak=peak, simulated_reserved=reserved)
    except Exception as exc:
        errors.append(f"simulated GPU: {_first_line(exc)}")
    try:
        figures.update(_measure_cuda(copy.deepcopy(model), batch, device))
    except Exception as exc:
        errors.append(f"CUDA: {_first_line(exc)}")
    finally:
        _free_cuda()
    return replace(base, seconds=round(time.perf_counter() - start, 2), errors=errors, **figures)


def _measure_cuda(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> dict[str, int]:
    _free_cuda()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    model = model.to(device)
    on_device = (batch[0].to(device), batch[1].to(device))
    train_steps(model, on_device)
    torch.cuda.synchronize(device)
    figures = {
        "baseline_allocated": int(baseline),
        "max_allocated": int(torch.cuda.max_memory_allocated(device)),
        "max_reserved": int(torch.cuda.max_memory_reserved(device)),
    }
    del model, on_device
    return figures


def run_search(spec: ModelSpec, mode: str, memory_limit: int, time_budget: float, seed: int = 0) -> SearchCheck:
    """``find_batch_size`` on the GPU under ``memory_limit``, starting no new trial after ``time_budget`` seconds."""
    # No batch larger than the limit can fit (the inputs alone would not), so the dataset never stops the search.
    length = memory_limit // spec.sample_bytes + 1
    start = time.perf_counter()
    try:
        result = bf.find_batch_size(
            spec.model(seed),
            spec.dataset(length, seed),
            optimizer=torch.optim.Adam,
            device="cuda",
            memory_limit=memory_limit,
            mode=mode,
            time_budget=time_budget,
        )
    except Exception as exc:
        return SearchCheck(spec.name, mode, memory_limit, seconds=round(time.perf_counter() - start, 2),
                           error=_first_line(exc))
    finally:
        _free_cuda()
    return SearchCheck(
        spec.name,
        mode,
        memory_limit,
        max_batch_size=result.max_batch_size,
        batch_size=result.batch_size,
        trials=result.num_trials,
        ooms=result.num_ooms,
        steps=result.num_steps,
        seconds=round(result.seconds, 2),
        stop_reason=str(result.stop_reason),
        predicted_max_batch_size=result.predicted_max_batch_size,
        prediction_status=result.prediction_status,
    )


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # not installed
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """The GPU, the versions, and the driver as NVML reports it for this very GPU (matched by UUID)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    report = nvml.query()
    gpu = report.gpu_for_device(index) if report.available else None
    driver: dict[str, Any] = {"available": report.available, "reason": report.reason}
    if report.available:
        driver.update(
            driver_version=report.driver_version,
            cuda_driver_version=report.cuda_driver_version,
            nvml_version=report.nvml_version,
            cuda_mapping=report.cuda_mapping,
        )
    if gpu is not None:
        driver.update(
            gpu_index=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            total_bytes=gpu.total_bytes,
            used_bytes=gpu.used_bytes,
            this_process=gpu.this_process,
            used_by_this_process=gpu.used_by_this_process,
            used_by_other_processes=gpu.used_by_other_processes,
        )
    elif report.available:
        driver["reason"] = f"no NVML GPU matched cuda:{index} ({report.cuda_mapping})"
    return {
        "gpu_name": torch.cuda.get_device_name(index),
        "gpu_index": index,
        "gpu_total_bytes": int(props.total_memory),
        "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "torchvision": _version("torchvision"),
        "batchfinder": bf.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nvml": driver,
    }


# -- command line -------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="Check batchfinder on this machine's CUDA GPU in a few minutes: the cuda-marked tests, memory "
        "estimates against measured peaks, and searches under a memory limit; writes <gpu>-check.md and .json.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the report (default %(default)s)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda tests/")
    parser.add_argument("--pytest-timeout", type=float, default=120.0, help="seconds for the test run (default 120)")
    parser.add_argument("--memory-limit", default="2GiB", help="memory_limit of the searches (default 2GiB)")
    parser.add_argument("--time-budget", type=float, default=60.0,
                        help="each search starts no new trial after this many seconds (default 60)")
    parser.add_argument("--models", default=",".join(spec.name for spec in MODELS),
                        help="comma-separated models to measure and search (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and data (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not cuda_available():
        print(NO_GPU_MESSAGE)
        return EXIT_NO_GPU
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    known = {spec.name: spec for spec in MODELS}
    unknown = [name for name in names if name not in known]
    if unknown:
        _parser().error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        memory_limit = parse_bytes(args.memory_limit, argument="--memory-limit")
    except ValueError as exc:
        _parser().error(str(exc))
    start = time.perf_counter()

    tests: PytestRun | None = None
    if not args.skip_tests and not os.environ.get(CHILD_ENV):
        print("running pytest -m cuda tests/ ...", file=sys.stderr)
        tests = run_cuda_tests(args.pytest_timeout)  # first: this process holds no GPU memory yet
    device = current_cuda_device()
    env = environment(device)
    env["baseline_after_warm_up"] = warm_up(device)
    memory: list[MemoryCheck] = []
    for name in names:
        print(f"measuring {name} ...", file=sys.stderr)
        memory.append(measure_memory(known[name], device, args.seed))
    searches: list[SearchCheck] = []
    for name in (n for n in SEARCH_MODELS if n in names):
        for mode in SEARCH_MODES:
            print(f"searching {name} ({mode}) ...", file=sys.stderr)
            searches.append(run_search(known[name], mode, memory_limit, args.time_budget, args.seed))
    env["seconds"] = round(time.perf_counter() - start, 1)

    markdown, data = build_report(env, tests, memory, searches)
    md_path, json_path = write_report(args.out, gpu_slug(env["gpu_name"]), markdown, data)
    print(markdown)
    print(f"written: {md_path} and {json_path}", file=sys.stderr)
    failed = (tests is not None and not tests.ok) or any(c.errors for c in memory) or any(s.error for s in searches)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
