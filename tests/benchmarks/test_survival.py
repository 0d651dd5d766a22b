"""The epoch-survival benchmark (benchmarks/survival.py) keeps working: its data, its worst-case truth, one epoch,
a run on a tiny variable-size workload with two finders and two shuffle seeds, a finder's record over several seeds,
and the command line with --seeds and --verify on the cheap fixed-size control.

The benchmark itself is not a timed test: this checks the structure of what it records and that the worst-case
truth is right (the truth's worst-case batch trains, truth+1's does not), established again here without the
benchmark's own sorting.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import batchfinder as bf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level package of the repository, not of the library

from benchmarks import survival  # noqa: E402
from benchmarks.devices import BenchDevice  # noqa: E402
from benchmarks.finders import FinderData  # noqa: E402
from benchmarks.report import compare_views, write_json  # noqa: E402
from benchmarks.survival_report import (  # noqa: E402
    deterministic_view,
    markdown_document,
    verify_differences,
    write_chart,
)
from benchmarks.varlen import (  # noqa: E402
    SURVIVAL_WORKLOADS,
    TEXT_LONG_LEN,
    ListDataset,
    LSTMClassifier,
    SurvivalWorkload,
    build_image_data,
    build_text_data,
    pad_images,
    pad_tokens,
    text_long_samples,
)
from benchmarks.workloads import make_optimizer, training_step  # noqa: E402

TINY_CAPACITY = 22 * 2**20
"""With the caching allocator the tiny LSTM's worst-case truth here is in the tens."""


def _tiny_text() -> SurvivalWorkload:
    return SurvivalWorkload(
        "tiny_text",
        "tiny LSTM on 300 sequences of 4-64 tokens",
        lambda: LSTMClassifier(embed_dim=16, hidden=32),
        lambda seed: build_text_data(300, seed, max_len=64),
        pad_tokens,
        "22MiB",
        "tokens",
    )


def test_text_data_is_long_tailed_short_first_and_padded_by_its_collate() -> None:
    data = build_text_data(500, seed=3, max_len=128)
    lengths = [len(tokens) for tokens, _ in data.dataset]
    assert lengths == data.sizes == sorted(lengths)  # the short ones first
    assert max(lengths) == 128 and min(lengths) >= 4
    assert sorted(lengths)[len(lengths) // 2] < 48  # most are short
    tokens, labels = pad_tokens([data.dataset[0], data.dataset[499]])
    assert tokens.dtype == labels.dtype == torch.int64
    assert tokens.shape == (2, 128) and labels.shape == (2,)
    assert (tokens[0, lengths[0]:] == 0).all() and (tokens[1] != 0).all()
    as_lists = build_text_data(500, seed=3, max_len=128, as_lists=True, short_first=False)
    first, label = as_lists.dataset[0]
    assert isinstance(first, list) and isinstance(first[0], int) and isinstance(label, int)
    assert sorted(as_lists.sizes) == lengths  # the same lengths, in generation order
    assert build_text_data(500, seed=3, max_len=128).sizes == data.sizes  # deterministic


def test_text_data_can_have_a_few_samples_much_longer_than_the_rest() -> None:
    data = build_text_data(500, seed=3, max_len=128, long_samples=3, long_len=(300, 400))
    lengths = [len(tokens) for tokens, _ in data.dataset]
    assert lengths == data.sizes == sorted(lengths)
    assert [length for length in lengths if length > 128] == lengths[-3:]  # exactly 3 long ones, stored last
    assert 300 <= lengths[-3] and lengths[-1] == 400 and lengths[-4] == 128
    assert text_long_samples(2000) == 4 and text_long_samples(100) == 1
    plain = build_text_data(500, seed=3, max_len=128)
    assert max(plain.sizes) == 128  # without long_samples the tail stops at max_len
    with pytest.raises(ValueError):
        build_text_data(50, seed=0, max_len=128, long_samples=1, long_len=(100, 200))  # not above max_len
    text = SURVIVAL_WORKLOADS["text"].build_data(0)
    assert max(text.sizes) == TEXT_LONG_LEN[1] and sum(size > 256 for size in text.sizes) == 4


def test_image_data_has_one_largest_image_that_is_tallest_and_widest() -> None:
    data = build_image_data(200, seed=1)
    shapes = [tuple(image.shape) for image, _ in data.dataset]
    assert all(c == 3 and 16 <= h <= 96 and 16 <= w <= 96 for c, h, w in shapes)
    assert data.sizes == [h * w for _, h, w in shapes] == sorted(data.sizes)
    assert shapes[-1] == (3, 96, 96)
    images, labels = pad_images([data.dataset[0], data.dataset[-1]])
    assert images.shape == (2, 3, 96, 96) and labels.shape == (2,)


def test_an_epoch_far_above_the_truth_runs_out_of_memory_and_says_where() -> None:
    workload = _tiny_text()
    data = workload.build_data(0)
    finder_data = FinderData(data.dataset, pad_tokens, shuffle=True, seed=0)
    epoch = survival.train_epoch(workload, finder_data, TINY_CAPACITY, 300, seed=0)
    assert not epoch.survived and epoch.steps == 1 and epoch.oom_step == 1 and epoch.completed == 0
    assert epoch.oom_input_shape == [300, 64] and "out of memory" in epoch.oom_error
    small = survival.train_epoch(workload, finder_data, TINY_CAPACITY, 4, seed=0)
    assert small.survived and small.steps == small.completed == 75 and small.oom_step is None
    assert small.largest_input_shape == [4, 64]  # the epoch drew the longest sequence
    assert 0 < small.peak_reserved_bytes <= TINY_CAPACITY


@pytest.mark.slow
def test_a_tiny_run_records_every_figure_per_seed_and_a_right_worst_case_truth(tmp_path: Path) -> None:
    workload = _tiny_text()
    finders = survival.select_finders(["batchfinder binsearch", "Accelerate"])
    case = survival.run_workload(workload, finders, seed=0, shuffle_seeds=(0, 1))

    assert case["workload"] == "tiny_text" and case["capacity_bytes"] == TINY_CAPACITY
    assert case["samples"] == 300 and case["sizes"]["max"] == 64 and case["index_order"] == "smallest first"
    assert case["shuffle_seeds"] == [0, 1]
    truth = case["truth"]["max_batch_size"]
    assert 8 <= truth < 300 and case["truth"]["consistent"]
    assert case["fit_checks"][str(truth)] is True and case["fit_checks"][str(truth + 1)] is False

    # The truth again, independently: the longest sequences first, sorted here, on fresh simulated GPUs.
    data = workload.build_data(0)
    samples = sorted(data.dataset.samples, key=lambda sample: -len(sample[0]))
    worst = DataLoader(ListDataset(samples), batch_size=1, collate_fn=pad_tokens)
    model = workload.build_model(0)

    def fits(batch_size: int) -> bool:
        trial = bf.try_batch_size(
            model, worst, batch_size, optimizer=make_optimizer, step_fn=training_step,
            device=bf.SimulatedGPU(TINY_CAPACITY),
        )
        return trial.fits

    assert fits(truth) and not fits(truth + 1)

    rows = {row["finder"]: row for row in case["finders"]}
    assert list(rows) == ["batchfinder binsearch", "Accelerate"]
    for row in rows.values():
        runs = row["runs"]
        assert [run["shuffle_seed"] for run in runs] == row["shuffle_seeds"] == [0, 1]
        assert row["sizes"] == [run["size"] for run in runs] and row["epochs"] == 2
        assert row["survived"] == sum(1 for run in runs if run["survived"])
        assert row["trials"] == sum(run["trials"] for run in runs)
        assert [f["shuffle_seed"] for f in row["failures"]] == [r["shuffle_seed"] for r in runs if not r["survived"]]
        for run in runs:
            assert run["error"] is None, run
            size = run["size"]
            assert size is not None and size >= 1
            assert run["ratio"] == pytest.approx(size / truth, abs=1e-4)
            assert run["worst_case_fits"] is case["fit_checks"][str(size)]
            epoch = run["epoch"]
            assert epoch["batch_size"] == size and epoch["steps"] == math.ceil(300 / size)
            assert run["survived"] is epoch["survived"]
            if epoch["survived"]:
                assert epoch["completed"] == epoch["steps"] and epoch["oom_step"] is None
            else:
                assert 1 <= epoch["oom_step"] <= epoch["steps"] and epoch["completed"] == epoch["oom_step"] - 1
            assert run["trials"] == len(run["trial_sizes"]) >= 1
            assert run["ooms"] == sum(1 for fits_ in run["trial_fits"] if fits_ is False)
            assert run["seconds"] > 0
    batchfinder_row = rows["batchfinder binsearch"]
    assert batchfinder_row["size_is"].startswith("recommended")
    assert all(run["size"] <= run["returned"] for run in batchfinder_row["runs"])
    assert batchfinder_row["survived"] == 2 and batchfinder_row["failures"] == []  # it trains on the worst case
    assert rows["Accelerate"]["sizes"] == rows["Accelerate"]["returned"]

    document = _document(case, finders, (0, 1))
    write_json(document, tmp_path / "s.json")
    reread = json.loads((tmp_path / "s.json").read_text())
    assert compare_views(deterministic_view(reread), deterministic_view(document)) == []
    assert "tiny_text @ 22MiB: Accelerate (shuffle 1)" in deterministic_view(document)
    changed = json.loads(json.dumps(document))
    changed["workloads"][0]["finders"][0]["runs"][1]["epoch"]["oom_step"] = 99
    differences = verify_differences(document, changed)
    assert len(differences) == 1 and "batchfinder binsearch (shuffle 1)" in differences[0]
    markdown = markdown_document(document)
    assert "## tiny_text at 22MiB" in markdown and "| batchfinder binsearch |" in markdown
    assert "size used (shuffle 0, 1)" in markdown and "| 2/2 |" in markdown
    write_chart(document, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _document(case: dict[str, Any], finders: list[Any], seeds: tuple[int, ...]) -> dict[str, Any]:
    """A survival document around one workload's record, as run_survival writes it."""
    return {
        "schema": survival.SCHEMA_VERSION,
        "benchmark": "survival",
        "device": survival.LABEL,
        "command": None,
        "environment": {**survival.environment("simulated"), "load_average_at_start": None},
        "settings": {"finders": [f.name for f in finders], "shuffle_seeds": list(seeds)},
        "total_seconds": 1.0,
        "workloads": [case],
        "scan_speed": None,
    }


def _run(seed: int, size: int | None, *, oom_step: int | None = None, error: str | None = None) -> dict[str, Any]:
    """A per-seed record as survival._seed_record writes it, with only what the aggregates read."""
    epoch = None
    if size is not None:
        epoch = {"batch_size": size, "steps": 10, "completed": 10 if oom_step is None else oom_step - 1,
                 "oom_step": oom_step, "oom_input_shape": None if oom_step is None else [size, 64],
                 "error": None, "survived": oom_step is None, "seconds": 0.5}
    return {
        "shuffle_seed": seed, "size": size, "returned": size, "ratio": None if size is None else size / 20,
        "worst_case_fits": None if size is None else size <= 20, "epoch": epoch,
        "survived": None if epoch is None else epoch["survived"], "trials": 3, "ooms": 1, "confirmations": 0,
        "confirmation_ooms": 0, "steps": 9, "traced_steps": 0, "seconds": 1.0, "trial_sizes": [8, 16, 32],
        "trial_fits": [True, True, False], "data_scan": None, "confirmation_runs": [], "error": error,
    }


def test_a_finders_record_adds_up_its_seeds_and_says_where_each_epoch_failed(tmp_path: Path) -> None:
    (finder,) = survival.select_finders(["Lightning binsearch"])
    runs = [_run(0, 18), _run(1, 30, oom_step=5), _run(2, None, error="RuntimeError: boom"), _run(3, 19)]
    row = survival._finder_record(finder, runs, {"mode": "binsearch"})
    assert row["sizes"] == [18, 30, None, 19] and row["median_size"] == 19 and row["median_ratio"] == 0.95
    assert (row["epochs"], row["survived"], row["worst_case_fits"], row["within_truth"]) == (4, 2, 2, 2)
    assert row["failures"] == [
        {"shuffle_seed": 1, "step": 5, "steps": 10, "input_shape": [30, 64], "error": None},
        {"shuffle_seed": 2, "step": None, "steps": None, "input_shape": None, "error": "RuntimeError: boom"},
    ]
    assert (row["trials"], row["ooms"], row["seconds"], row["epoch_seconds"]) == (12, 4, 4.0, 1.5)
    case = {
        "workload": "w", "description": "d", "parameters": 1, "collate_fn": "c", "capacity": "1MiB",
        "capacity_bytes": 2**20, "samples": 10, "size_unit": "tokens",
        "sizes": {"min": 1, "median": 1, "mean": 1.0, "p90": 1, "p99": 1, "max": 1, "count_at_max": 1},
        "index_order": "smallest first", "shuffle_seeds": [0, 1, 2, 3],
        "truth": {"max_batch_size": 20, "trials": 5, "seconds": 1.0, "window": {"20": True, "21": False},
                  "consistent": True},
        "finders": [row], "fit_checks": {},
    }
    document = _document(case, [finder], (0, 1, 2, 3))
    markdown = markdown_document(document)
    assert "| Lightning binsearch | 18, 30, -, 19; error: RuntimeError | 0.950 | **2/4** | **2/4** |" in markdown
    assert "**shuffle 1: step 5 of 10 (30x64); shuffle 2: RuntimeError: boom**" in markdown
    assert "| Lightning binsearch | **2/4** | 2/4 | 0.95 | 12 | 4 | 4.0 |" in markdown  # the summary
    write_chart(document, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_command_line_runs_several_seeds_and_verifies_a_subset(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    # the collector frozen (the default) keeps the truth's 19 trials' collections cheap
    common = ["--workloads", "fixed", "--scan-samples", "0", "--quiet", "--no-chart"]
    finders = ["--finders", "batchfinder guided,Accelerate"]
    assert survival.main([*common, *finders, "--seeds", "0,1", "--out", str(first)]) == 0
    document = json.loads((first / f"{survival.LABEL}.json").read_text())
    assert document["schema"] == 2 and document["settings"]["shuffle_seeds"] == [0, 1]
    (case,) = document["workloads"]
    assert [row["finder"] for row in case["finders"]] == ["batchfinder guided", "Accelerate"]
    assert all(row["shuffle_seeds"] == [0, 1] and row["survived"] == 2 for row in case["finders"])  # fixed size
    expected = str(first / f"{survival.LABEL}.json")
    # a subset (one seed, one finder) of the same run checks against it
    subset = ["--finders", "Accelerate", "--seeds", "1", "--out", str(second), "--verify", expected]
    assert survival.main([*common, *subset]) == 0
    changed = json.loads(json.dumps(document))
    changed["workloads"][0]["finders"][1]["runs"][1]["size"] = 7
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    subset[-1] = str(tmp_path / "changed.json")
    assert survival.main([*common, *subset]) == 1
    with pytest.raises(SystemExit):
        survival.main([*common, "--seeds", "0,0", "--out", str(second)])
    with pytest.raises(SystemExit):
        survival.main([*common, "--seeds", "a", "--out", str(second)])


def test_scan_speed_is_measured_or_says_why_not() -> None:
    record = survival.measure_scan_speed(2000, seed=0, workload=_tiny_text())
    assert record["samples"] == 2000 and record["sizes"]["max"] == TEXT_LONG_LEN[1]  # the text workload's tail
    assert record["scan_seconds"] is not None or "scan" in record["errors"]
    assert record["find_seconds"] is not None or "find" in record["errors"]


def test_the_default_workloads_finders_and_seeds_exist() -> None:
    assert list(SURVIVAL_WORKLOADS) == ["text", "images", "fixed"]
    assert survival.DEFAULT_SEEDS == (0, 1, 2)
    assert survival.build_parser().parse_args([]).seeds == "0,1,2"
    names = [f.name for f in survival.select_finders(None)]
    assert names == list(survival.DEFAULT_FINDERS)
    with pytest.raises(SystemExit):
        survival.select_finders(["no such finder"])
    assert BenchDevice("simulated", TINY_CAPACITY).capacity_text == "22MiB"
