"""The benchmark harness (benchmarks/compare.py) keeps working: a smoke run on the smallest model and capacity.

The benchmark itself is not a timed test: this checks the structure of what it writes, that every finder's
returned size was checked against the ground truth, and the ground-truth search on a stand-in oracle.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import batchfinder as bf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level package of the repository, not of the library

from benchmarks import compare  # noqa: E402
from benchmarks.truth import find_ground_truth  # noqa: E402
from benchmarks.workloads import RESNET50_CAPACITY, WORKLOADS  # noqa: E402

FINDER_KEYS = {
    "finder", "library", "mode", "settings", "returned", "recommended", "largest_fit_tried", "ratio", "fits",
    "fits_checked_with", "returned_was_tried", "trials", "steps", "traced_steps", "ooms", "seconds", "trial_sizes", "trial_fits",
    "error", "steps_vs_reference", "seconds_vs_reference",
}


def _leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("batchfinder-bench-*")}


@pytest.mark.slow
def test_smoke_run_on_the_smallest_model_and_capacity(tmp_path: Path) -> None:
    before = _leftovers()
    repo_files = {p for p in ROOT.iterdir()}
    status = compare.main(["--device", "simulated", "--models", "mnist_mlp", "--capacity", "4MiB", "--out",
                           str(tmp_path), "--quiet"])
    assert status == 0
    assert {p.name for p in tmp_path.iterdir()} == {"simulated-cpu.json", "simulated-cpu.md", "simulated-cpu.png"}
    assert _leftovers() == before, "Lightning's temporary root directory was left behind"
    assert {p for p in ROOT.iterdir()} == repo_files, "the harness wrote into the repository"

    document = json.loads((tmp_path / "simulated-cpu.json").read_text())
    assert document["schema"] == compare.SCHEMA_VERSION
    assert document["device"] == "simulated-cpu"
    env = document["environment"]
    for key in ("torch", "torch_cuda", "batchfinder", "pytorch_lightning", "accelerate", "nvml"):
        assert key in env
    assert env["nvml"]["available"] or env["nvml"]["reason"]

    (case,) = document["results"]
    assert case["model"] == "mnist_mlp" and case["capacity_bytes"] == 4 * 2**20
    truth = case["ground_truth"]
    best = truth["max_batch_size"]
    assert best > 0 and truth["consistent"]
    checks = case["fit_checks"]
    assert checks[str(best)] is True and checks[str(best + 1)] is False

    names = [row["finder"] for row in case["finders"]]
    assert names[:2] == ["batchfinder binsearch", "batchfinder power"]
    assert {"Lightning binsearch", "Lightning power", "Accelerate"} <= set(names)
    for row in case["finders"]:
        assert set(row) == FINDER_KEYS
        assert row["error"] is None, row
        assert row["returned"] is not None
        # every returned size was checked against the ground truth, with a real trial
        assert row["fits"] is (row["returned"] <= best)
        assert row["fits_checked_with"] == "batchfinder.try_batch_size"
        assert checks[str(row["returned"])] is row["fits"]
        assert row["ratio"] == pytest.approx(row["returned"] / best, abs=1e-4)
        assert row["trials"] == len(row["trial_sizes"]) >= 1 and row["steps"] >= row["trials"]
        assert row["ooms"] == sum(1 for fits in row["trial_fits"] if fits is False)
        assert row["seconds"] > 0
    reference = case["finders"][0]
    assert reference["ratio"] == 1.0 and reference["steps_vs_reference"] == 1.0

    markdown = (tmp_path / "simulated-cpu.md").read_text()
    assert "| mnist_mlp | 4MiB |" in markdown and "Lightning binsearch" in markdown
    assert (tmp_path / "simulated-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resnet50_is_in_the_zoo_at_a_capacity_where_about_a_dozen_fit() -> None:
    """The expensive-trial workload: its default simulated capacity keeps the exact largest size at 8-16, so that a
    trial costs seconds of CPU and the number of trials decides a finder's wall time."""
    workload = WORKLOADS["resnet50"]
    assert list(WORKLOADS)[-1] == "resnet50"  # the expensive one runs last
    assert workload.input_shape == (3, 224, 224) and workload.input_kind == "image" and workload.num_classes == 10
    assert workload.default_capacities["simulated"] == (RESNET50_CAPACITY,)
    cases = compare.plan("simulated", list(WORKLOADS), None)
    assert [(w.name, d.capacity_text) for w, d in cases][-1] == ("resnet50", "1536MiB")
    model = workload.build_model(0)
    assert model.fc.out_features == 10
    # exact for the default caching SimulatedGPU, for the cost of about one traced step
    prediction = bf.predict_max_batch_size(
        model, workload.input_shape, capacity=RESNET50_CAPACITY, optimizer=torch.optim.Adam
    )
    assert 8 <= prediction.max_batch_size <= 16


def test_help_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--capacity" in done.stdout and "Default capacities" in done.stdout
    assert re.search(r"resnet50\s+1536MiB", done.stdout)


class _StandInOracle:
    """fits(B) is B <= limit; peaks are linear above a knee, as on the simulated GPU."""

    def __init__(self, limit: int, length: int = 100_000) -> None:
        self.limit = limit
        self.length = length
        self.model = None  # the estimator cannot trace this: the guess falls back to measured peaks
        self.dataset = [None]
        self.calls: list[int] = []
        self.trials_run = 0
        self.seconds = 0.0
        self.estimate_seconds = 0.0

    def peak(self, batch_size: int) -> int:
        return max(1000, 200 + 10 * batch_size)

    def fits(self, batch_size: int) -> bool:
        self.calls.append(batch_size)
        self.trials_run += 1
        return batch_size <= self.limit

    def peak_without_limit(self, batch_size: int) -> int:
        self.trials_run += 1
        return self.peak(batch_size)


@pytest.mark.parametrize("limit", [1, 37, 1000, 4321])
def test_ground_truth_finds_the_boundary_and_checks_around_it(limit: int) -> None:
    oracle = _StandInOracle(limit)
    truth = find_ground_truth(oracle, capacity=oracle.peak(limit) + 5, window=2)  # type: ignore[arg-type]
    assert truth.max_batch_size == limit
    assert truth.consistent
    assert {limit, limit + 1} <= set(truth.window)
    assert truth.window[limit] and not truth.window[limit + 1]


def test_ground_truth_when_nothing_fits() -> None:
    oracle = _StandInOracle(0)
    truth = find_ground_truth(oracle, capacity=10, window=1)  # type: ignore[arg-type]
    assert truth.max_batch_size == 0
    assert truth.window == {1: False}


def test_the_library_does_not_import_benchmarks_or_examples() -> None:
    for path in (ROOT / "batchfinder").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("benchmarks", "examples"), f"{path} imports {name}"


def test_prediction_cost_measures_a_prediction_against_an_estimate() -> None:
    from benchmarks import prediction_cost

    measured = prediction_cost.measure("small_encoder_2x64", "estimate")
    seconds = measured["seconds"]
    assert set(seconds) == {"estimate (cold)", "predict (cold)", "estimate (warm)", "predict (warm)"}
    assert all(value > 0 for value in seconds.values())
    assert measured["traces"] == 1 and measured["method"] == "one trace, replayed at each size"
    assert measured["max_batch_size"] > 1000  # a small encoder on an A100-40GB
    row = {"model": "small_encoder_2x64", "max_batch_size": measured["max_batch_size"], "traces": 1,
           "estimate_cold": 1.0, "predict_cold": 1.2, "ratio_cold": 1.2, "estimate_warm": 0.5, "predict_warm": 0.5,
           "ratio_warm": 1.0}
    table = prediction_cost.markdown([row, {"model": "gpt2_small", "error": "ModuleNotFoundError"}],
                                     {"torch": "x", "python": "y", "cpu_count": 2})
    assert "| small_encoder_2x64 |" in table and "**1.20x**" in table and "error: ModuleNotFoundError" in table
