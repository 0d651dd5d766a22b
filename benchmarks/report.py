"""Writing a benchmark document as JSON (for machines), Markdown (for people) and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "write_json",
    "write_markdown",
    "write_chart",
    "markdown_table",
    "summary_rows",
    "markdown_document",
    "deterministic_view",
    "compare_deterministic",
    "compare_views",
    "cell",
    "environment_lines",
]

DETERMINISTIC_FIELDS = ("returned", "fits", "trials", "steps", "traced_steps", "ooms")
"""Per-finder fields that do not change from run to run on the simulated GPU (wall times do)."""


def deterministic_view(document: dict[str, Any]) -> dict[str, Any]:
    """What must be identical between two runs of the same code on a simulated GPU: truths, sizes, counts."""
    view: dict[str, Any] = {}
    for case in document["results"]:
        key = f"{case['model']} @ {case['capacity']}"
        view[f"{key}: ground truth"] = case["ground_truth"]["max_batch_size"]
        for row in case["finders"]:
            view[f"{key}: {row['finder']}"] = {
                field: row[field] for field in (*DETERMINISTIC_FIELDS, "trial_sizes", "trial_fits", "error")
            }
    return view


def compare_deterministic(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Differences in :func:`deterministic_view` between two documents (empty when they agree)."""
    return compare_views(deterministic_view(expected), deterministic_view(actual))


def compare_views(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per key whose value differs between two deterministic views (empty when they agree)."""
    differences = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            differences.append(f"{key}: expected {old.get(key)!r}, got {new.get(key)!r}")
    return differences


def write_json(document: dict[str, Any], path: Path) -> None:
    """The whole document, indented, keys in a stable order."""
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def cell(value: Any, digits: int = 2) -> str:
    """A table cell: ``-`` for None, ``yes`` / ``**NO**`` for booleans, thousands separators, ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(document: dict[str, Any]) -> str:
    """One row per model, capacity and finder."""
    header = (
        "| model | capacity | true max | finder | returned | ratio | fits? | trials | steps | OOMs | seconds "
        "| steps vs bf binsearch | time vs bf binsearch |"
    )
    lines = [header, "|" + "|".join(["---"] * 13) + "|"]
    for case in document["results"]:
        truth = case["ground_truth"]["max_batch_size"]
        for i, row in enumerate(case["finders"]):
            first = i == 0
            returned = cell(row["returned"])
            if row["error"]:
                returned = f"error: {row['error'].split(':')[0]}"
            elif row["returned"] is not None and row["returned_was_tried"] is False:
                returned += " (untried)"
            lines.append(
                "| "
                + " | ".join(
                    [
                        case["model"] if first else "",
                        case["capacity"] if first else "",
                        cell(truth) if first else "",
                        row["finder"],
                        returned,
                        cell(row["ratio"], 3),
                        cell(row["fits"]),
                        cell(row["trials"]),
                        cell(row["steps"]) + (f" (+{row['traced_steps']} traced)" if row.get("traced_steps") else ""),
                        cell(row["ooms"]),
                        cell(row["seconds"], 1),
                        cell(row["steps_vs_reference"]),
                        cell(row["seconds_vs_reference"]),
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def summary_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Per finder, over every case: exact answers, mean ratio, sizes that fit, and the totals."""
    order: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for case in document["results"]:
        for row in case["finders"]:
            name = row["finder"]
            if name not in rows:
                order.append(name)
                rows[name] = {"finder": name, "cases": 0, "exact": 0, "ratios": [], "all_ratios": [], "fit": 0, "trials": 0,
                              "steps": 0, "ooms": 0, "seconds": 0.0}
            entry = rows[name]
            entry["cases"] += 1
            entry["exact"] += int(row["ratio"] == 1.0)
            if row["ratio"] is not None:
                entry["all_ratios"].append(row["ratio"])
                if row["fits"]:
                    entry["ratios"].append(row["ratio"])
            entry["fit"] += int(bool(row["fits"]))
            for key in ("trials", "steps", "ooms", "seconds"):
                entry[key] += row[key]
    result = []
    reference = rows.get(document["settings"]["reference_finder"])
    for name in order:
        entry = rows[name]
        ratios, all_ratios = entry.pop("ratios"), entry.pop("all_ratios")
        entry["mean_ratio"] = sum(ratios) / len(ratios) if ratios else None  # over the returned sizes that fit
        entry["min_ratio"] = min(all_ratios) if all_ratios else None
        entry["max_ratio"] = max(all_ratios) if all_ratios else None
        entry["steps_vs_reference"] = entry["steps"] / reference["steps"] if reference and reference["steps"] else None
        entry["seconds_vs_reference"] = (
            entry["seconds"] / reference["seconds"] if reference and reference["seconds"] else None
        )
        result.append(entry)
    return result


def _summary_table(document: dict[str, Any]) -> str:
    lines = [
        "| finder | exact answers | returned size fits | mean ratio when it fits | ratio range | trials | steps "
        "| OOMs | seconds | steps vs bf binsearch | time vs bf binsearch |",
        "|" + "|".join(["---"] * 11) + "|",
    ]
    for row in summary_rows(document):
        lines.append(
            f"| {row['finder']} | {row['exact']}/{row['cases']} | {row['fit']}/{row['cases']} | "
            f"{cell(row['mean_ratio'], 3)} | {cell(row['min_ratio'], 3)}-{cell(row['max_ratio'], 3)} | "
            f"{row['trials']:,} | {row['steps']:,} | "
            f"{row['ooms']:,} | {row['seconds']:.1f} | {cell(row['steps_vs_reference'])} | "
            f"{cell(row['seconds_vs_reference'])} |"
        )
    return "\n".join(lines)


def environment_lines(document: dict[str, Any], default_command: str = "python -m benchmarks.compare") -> list[str]:
    """Markdown bullets: the device, the versions, NVML's view of the GPUs, the command, total time and load."""
    env = document["environment"]
    nvml = env["nvml"]
    if nvml["available"] and nvml["gpus"]:
        gpus = "; ".join(
            f"GPU {g['index']} {g['name']}, {g['total_bytes'] / 2**30:.1f} GiB total, "
            f"{g['used_bytes'] / 2**30:.2f} GiB used when the run ended" for g in nvml["gpus"]
        )
        gpu_line = f"NVML: driver {nvml['driver_version']}, CUDA {nvml['cuda_driver_version']} (driver); {gpus}"
    else:
        gpu_line = f"NVML: {nvml['reason']}"
    if env["device_kind"] == "simulated":
        device = "simulated GPUs (`batchfinder.SimulatedGPU`) on the CPU, one per capacity"
    else:
        device = f"{env['gpu_name']} ({env['gpu_total_bytes'] / 2**30:.1f} GiB), capped per capacity with " \
                 "`torch.cuda.set_per_process_memory_fraction`"
    return [
        f"- Device: {device}; {env['cpu_count']} CPUs, {env['torch_threads']} torch threads",
        f"- Versions: batchfinder {env['batchfinder']}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
        f"pytorch-lightning {env['pytorch_lightning']}, accelerate {env['accelerate']}, "
        f"torchvision {env['torchvision']}, Python {env['python']}",
        f"- {gpu_line}",
        f"- Command: `{document['command'] or default_command}`; total {document['total_seconds']} s; "
        f"load average at start {_load(env.get('load_average_at_start'))}, at the end {_load(env.get('load_average'))}",
    ]


def _load(values: list[float] | None) -> str:
    return "unknown" if not values else "/".join(f"{v:.2f}" for v in values)


def markdown_document(document: dict[str, Any]) -> str:
    """The Markdown report: setting, summary per finder, every result, and how to read them."""
    settings = document["settings"]
    parts = [
        f"# Batch-size finders compared: {document['device']}",
        "",
        *environment_lines(document),
        "",
        "Every finder trains the same model (fresh copy, same seed) with Adam and cross-entropy on the same synthetic "
        "data, one after another in one process, against the same device capacity. *true max* is the exact largest "
        "batch size that fits, found independently with `batchfinder.try_batch_size` (B fits, B+1 does not; every "
        f"size from B-{settings['window'] - 1} to B+{settings['window']} checked). *returned* is what the finder returns (batchfinder: "
        "`max_batch_size`, which it recommends using at x0.8; Lightning binsearch: after its 5% margin); "
        "*(untried)* marks a size the finder returned without having run it. *fits?* is checked with "
        "`try_batch_size`. *steps* counts calls of the training step (forward + loss) on real tensors, including "
        "failed ones and batchfinder's probe; *(+N traced)* are calls under fake tensors (batchfinder's guided mode "
        "estimating memory: nothing is computed or allocated). "
        "*OOMs* counts trials that ran out of memory. Wall times vary from run to run; sizes, trials, steps and "
        "OOMs do not on a simulated GPU.",
        "",
        "## Summary",
        "",
        _summary_table(document),
        "",
        "## Every model and capacity",
        "",
        markdown_table(document),
        "",
    ]
    return "\n".join(parts)


def write_markdown(document: dict[str, Any], path: Path) -> None:
    path.write_text(markdown_document(document), encoding="utf-8")


def write_chart(document: dict[str, Any], path: Path) -> None:
    """Three panels, one group of bars per model and capacity: steps, wall seconds, returned/true ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = document["results"]
    finders = document["settings"]["finders"]
    labels = [f"{c['model']}\n{c['capacity']}" for c in cases]
    width = 0.8 / max(len(finders), 1)
    figure, axes = plt.subplots(3, 1, figsize=(max(8.0, 1.6 * len(cases) + 3), 11), sharex=True)
    panels = (("steps", "training steps"), ("seconds", "wall seconds"), ("ratio", "returned / true max"))
    colours = plt.get_cmap("tab10")
    highest_ratio = 1.0
    for axis, (key, title) in zip(axes, panels):
        for j, name in enumerate(finders):
            values, hatches, errors = [], [], []
            for case in cases:
                row = next((r for r in case["finders"] if r["finder"] == name), None)
                values.append(float(row[key]) if row and row[key] is not None else 0.0)
                hatches.append("//" if row and row["fits"] is False else "")
                errors.append(bool(row and row["error"]))
            positions = [i + (j - (len(finders) - 1) / 2) * width for i in range(len(cases))]
            bars = axis.bar(positions, values, width, label=name, color=colours(j % 10), edgecolor="black",
                            linewidth=0.3)
            if key == "ratio":
                highest_ratio = max([highest_ratio, *values])
                for bar, hatch, error, x in zip(bars, hatches, errors, positions):
                    bar.set_hatch(hatch)
                    if error:
                        axis.text(x, 0.02, "error", rotation=90, ha="center", va="bottom", fontsize=7)
        axis.set_ylabel(title)
        axis.grid(axis="y", alpha=0.3)
        if key == "seconds":
            axis.set_yscale("log")
        if key == "ratio":
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.set_ylim(0, max(1.1, highest_ratio + 0.1))
            axis.text(1.0, 1.0, "hatched: the returned size does not fit ", transform=axis.transAxes, ha="right",
                      va="bottom", fontsize=8)
    axes[0].legend(ncol=min(len(finders), 4), fontsize=8)
    axes[0].set_title(f"Batch-size finders on {document['device']}: cost and accuracy")
    axes[-1].set_xticks(range(len(cases)))
    axes[-1].set_xticklabels(labels, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
