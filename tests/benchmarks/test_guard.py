"""The OOMGuard benchmark (benchmarks/guard.py) at a tiny size: the plain loop dies, the guarded one finishes and
ends where the unsplit reference does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level package of the repository, not of the library

from benchmarks import guard  # noqa: E402


def test_the_plain_loop_dies_and_the_guarded_one_trains_as_the_reference(tmp_path):
    argv = ["--samples", "96", "--batch-size", "16", "--max-length", "96", "--capacity", "8MiB", "--out", str(tmp_path)]
    assert guard.main(argv) == 0
    document = json.loads((tmp_path / "guard-simulated-cpu.json").read_text())
    runs = {run["name"]: run for run in document["runs"]}
    assert not runs["plain"]["finished"] and runs["plain"]["died_at_step"] is not None
    assert runs["guarded"]["finished"] and runs["guarded"]["splits"] >= 1
    assert runs["guarded"]["retried_steps"] == runs["guarded"]["splits"]
    assert runs["reference"]["finished"] and runs["reference"]["splits"] == 0
    assert document["max_abs_parameter_difference"] < 1e-4
    assert "| guarded |" in (tmp_path / "guard-simulated-cpu.md").read_text()
