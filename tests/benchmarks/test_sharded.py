"""The sharded benchmark (benchmarks/sharded.py) at a tiny size, two ranks: every rank gets the same answer, and
brute-force sharded runs (without batchfinder) fit at the recommended size and not one above the largest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level package of the repository, not of the library

from benchmarks import sharded  # noqa: E402


def test_two_ranks_agree_and_the_answer_is_tight_in_brute_force_runs(tmp_path):
    argv = ["--worlds", "2", "--width", "128", "--capacity", "4MiB", "--samples", "2048", "--collective-timeout", "3", "--checks-only",
            "--out", str(tmp_path)]
    assert sharded.main(argv) == 0
    document = json.loads((tmp_path / "sharded-simulated-cpu.json").read_text())
    (row,) = document["rows"]
    assert row["world_size"] == 2 and row["ranks_agree"]
    assert 1 <= row["recommended"] < row["largest"] < 2048
    assert row["recommended_fits"] and not row["next_fits"]
    assert row["trials"] >= 2 and row["steps"] >= 2 * row["trials"] - 2 * row["out_of_memory_trials"]
    assert row["brute_force_largest"] is None  # --checks-only
    assert "| 2 |" in (tmp_path / "sharded-simulated-cpu.md").read_text()
