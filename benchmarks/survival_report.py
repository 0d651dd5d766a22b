"""Writing an epoch-survival document (:mod:`benchmarks.survival`) as Markdown and a PNG chart, and the part of it
that must not change between runs (for ``--verify``). The JSON is :func:`benchmarks.report.write_json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import cell, compare_views, environment_lines

__all__ = [
    "deterministic_view",
    "verify_differences",
    "markdown_tables",
    "markdown_document",
    "summary_rows",
    "write_chart",
]

DETERMINISTIC_FIELDS = (
    "size",
    "returned",
    "worst_case_fits",
    "survived",
    "trials",
    "ooms",
    "confirmations",
    "confirmation_ooms",
    "steps",
    "trial_sizes",
    "trial_fits",
    "error",
)
"""Per-seed fields of a finder's run that do not change from run to run on the simulated GPU (wall times do)."""
EPOCH_FIELDS = ("steps", "completed", "oom_step", "oom_input_shape")


def _entries(document: dict[str, Any]) -> list[tuple[str, str | None, int | None, str, Any]]:
    """(workload key, finder or None, shuffle seed or None, view key, value) for every deterministic figure."""
    entries: list[tuple[str, str | None, int | None, str, Any]] = []
    for case in document["workloads"]:
        key = f"{case['workload']} @ {case['capacity']}"
        entries.append((key, None, None, f"{key}: worst-case truth", case["truth"]["max_batch_size"]))
        for row in case["finders"]:
            for run in row["runs"]:
                epoch = run["epoch"] or {}
                value = {
                    **{name: run[name] for name in DETERMINISTIC_FIELDS},
                    **{f"epoch {name}": epoch.get(name) for name in EPOCH_FIELDS},
                }
                seed = run["shuffle_seed"]
                entries.append((key, row["finder"], seed, f"{key}: {row['finder']} (shuffle {seed})", value))
    scan = document.get("scan_speed")
    if scan:
        entries.append(
            ("scan speed", None, None, "scan speed: max batch sizes",
             [scan["find_max_batch_size"], scan["sizes_given_max_batch_size"]])
        )
    return entries


def deterministic_view(document: dict[str, Any]) -> dict[str, Any]:
    """What must be identical between two runs of the same code: truths, and per finder and shuffle seed the size,
    the worst-case check, the epoch's outcome, the trials and OOMs."""
    return {view_key: value for _, _, _, view_key, value in _entries(document)}


def verify_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Differences between the deterministic views of two documents, over what ``actual`` ran: the workloads, finders
    and shuffle seeds it ran (a ``--workloads``, ``--finders`` or ``--seeds`` subset is checked against those of a
    full run) and the scan speed when it measured it."""
    if expected.get("schema") != actual.get("schema"):
        return [
            f"schema: expected {expected.get('schema')!r}, got {actual.get('schema')!r} (the results were written by "
            "another version of the benchmark: regenerate them)"
        ]
    ran = {(key, finder, seed) for key, finder, seed, _, _ in _entries(actual)}
    workloads = {key for key, _, _ in ran}
    finders = {finder for _, finder, _ in ran if finder is not None}
    seeds = {seed for _, _, seed in ran if seed is not None}

    def relevant(key: str, finder: str | None, seed: int | None) -> bool:
        if key not in workloads:
            return False
        return finder is None or (finder in finders and seed in seeds)

    old = {view_key: value for key, finder, seed, view_key, value in _entries(expected) if relevant(key, finder, seed)}
    return compare_views(old, deterministic_view(actual))


# -- Markdown --------------------------------------------------------------------------------------------------------
def _list(values: list[Any]) -> str:
    return ", ".join(cell(value) for value in values)


def _sizes_cell(row: dict[str, Any]) -> str:
    """The size used per shuffle seed (batchfinder: its recommendation, then its ``max_batch_size`` per seed)."""
    errors = [run["error"] for run in row["runs"] if run["error"]]
    text = _list(row["sizes"])
    if row["library"] == "batchfinder" and any(value is not None for value in row["returned"]):
        text += f" (max {_list(row['returned'])})"
    if errors:
        text += f"; error: {errors[0].split(':')[0]}"
    return text


def _failure_text(failure: dict[str, Any]) -> str:
    where = f"shuffle {failure['shuffle_seed']}"
    if failure["step"] is not None:
        shape = "x".join(map(str, failure["input_shape"] or []))
        return f"{where}: step {failure['step']} of {failure['steps']}" + (f" ({shape})" if shape else "")
    return f"{where}: {failure['error'] or 'no epoch'}"


def _failures_cell(row: dict[str, Any]) -> str:
    if not row["failures"]:
        return "-"
    return "**" + "; ".join(_failure_text(failure) for failure in row["failures"]) + "**"


def _fraction(count: int, total: int, *, bold_short: bool = False) -> str:
    text = f"{count}/{total}"
    return f"**{text}**" if bold_short and count < total else text


def _counts_cell(row: dict[str, Any], key: str, extra_key: str) -> str:
    """Per seed, e.g. ``8, 8, 9 + 3 confirming``."""
    text = _list([run[key] for run in row["runs"]])
    extra = row[extra_key]
    return text + (f" + {extra} confirming" if extra else "")


def _workload_table(case: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, case["shuffle_seeds"]))
    lines = [
        f"| finder | size used (shuffle {seeds}) | median ratio | worst-case batch fits | epochs survived "
        "| out of memory (shuffle: step of steps, input) | trials | OOMs | seconds |",
        "|" + "|".join(["---"] * 9) + "|",
    ]
    for row in case["finders"]:
        lines.append(
            "| "
            + " | ".join(
                [
                    row["finder"],
                    _sizes_cell(row),
                    cell(row["median_ratio"], 3),
                    _fraction(row["worst_case_fits"], row["epochs"], bold_short=True),
                    _fraction(row["survived"], row["epochs"], bold_short=True),
                    _failures_cell(row),
                    _counts_cell(row, "trials", "confirmations"),
                    _counts_cell(row, "ooms", "confirmation_ooms"),
                    cell(row["seconds"], 1),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _workload_heading(case: dict[str, Any]) -> list[str]:
    sizes = case["sizes"]
    unit = case["size_unit"]
    truth = case["truth"]
    lines = [
        f"## {case['workload']} at {case['capacity']}",
        "",
        f"{case['description']}; {case['parameters']:,} parameters; collate `{case['collate_fn']}`. "
        f"{case['samples']:,} samples, stored {case['index_order']}; size in {unit}: min {cell(sizes['min'])}, "
        f"median {cell(sizes['median'])}, p90 {cell(sizes['p90'])}, p99 {cell(sizes['p99'])}, max {cell(sizes['max'])} "
        f"({sizes['count_at_max']:,} sample{'s' if sizes['count_at_max'] != 1 else ''}). Worst-case truth "
        f"{truth['max_batch_size']:,} ({truth['trials']} `try_batch_size` trials, {truth['seconds']:.1f} s; "
        + ", ".join(f"{b} {'fits' if fits else 'does not'}" for b, fits in truth["window"].items())
        + ("" if truth["consistent"] else "; **not monotonic in the window**")
        + f"). Shuffle seeds {', '.join(map(str, case['shuffle_seeds']))}: each finder searched on each shuffle and "
        "trained one epoch with it.",
    ]
    scans = [
        (row["finder"], run["data_scan"]) for row in case["finders"] for run in row["runs"] if run.get("data_scan")
    ]
    if scans:
        finder, scan = scans[0]
        lines += ["", f"batchfinder's data scan ({finder}): {scan['describe']}."]
    return lines


def summary_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Per finder over every workload and shuffle seed: epochs survived, sizes within the truth, the median ratio
    per workload, totals."""
    order: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for case in document["workloads"]:
        for row in case["finders"]:
            name = row["finder"]
            if name not in rows:
                order.append(name)
                rows[name] = {"finder": name, "workloads": 0, "epochs": 0, "survived": 0, "within_truth": 0,
                              "median_ratios": [], "trials": 0, "ooms": 0, "seconds": 0.0}
            entry = rows[name]
            entry["workloads"] += 1
            entry["epochs"] += row["epochs"]
            entry["survived"] += row["survived"]
            entry["within_truth"] += row["within_truth"]
            entry["median_ratios"].append(row["median_ratio"])
            entry["trials"] += row["trials"] + row["confirmations"]
            entry["ooms"] += row["ooms"] + row["confirmation_ooms"]
            entry["seconds"] += row["seconds"]
    return [rows[name] for name in order]


def _summary_table(document: dict[str, Any]) -> str:
    workloads = ", ".join(case["workload"] for case in document["workloads"])
    lines = [
        f"| finder | epochs survived | size <= worst-case truth | median ratio ({workloads}) | trials | OOMs "
        "| seconds |",
        "|" + "|".join(["---"] * 7) + "|",
    ]
    for row in summary_rows(document):
        ratios = ", ".join(cell(r, 2) for r in row["median_ratios"]) or "-"
        lines.append(
            f"| {row['finder']} | {_fraction(row['survived'], row['epochs'], bold_short=True)} | "
            f"{_fraction(row['within_truth'], row['epochs'])} | {ratios} | {row['trials']} | {row['ooms']} | "
            f"{row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _scan_lines(scan: dict[str, Any] | None) -> list[str]:
    if not scan:
        return ["## Scan speed", "", "Not measured (`--scan-samples 0`)."]
    sizes = scan["sizes"]
    lines = [
        "## Scan speed",
        "",
        f"{scan['samples']:,} samples `{scan['sample_format']}` (lengths: median {cell(sizes['median'])}, p99 "
        f"{cell(sizes['p99'])}, max {cell(sizes['max'])} tokens) behind a shuffled `DataLoader(batch_size=1, "
        f"collate_fn=pad_tokens)`, the {scan['workload']} workload's model at {scan['capacity']}:",
        "",
        "| what | seconds | result |",
        "|---|---|---|",
        f"| `BatchSource(loader)` (the scan alone) | {cell(scan['scan_seconds'], 2)} | {scan['scan'] or '-'} |",
        f"| `find_batch_size(model, loader)`, defaults (scan + search) | {cell(scan['find_seconds'], 2)} | "
        f"max {cell(scan['find_max_batch_size'])}, recommended {cell(scan['find_batch_size'])}, "
        f"{cell(scan['find_trials'])} trials |",
        f"| the same with `sample_size=` the lengths (no scan: the bare search) | "
        f"{cell(scan['sizes_given_seconds'], 2)} | max {cell(scan['sizes_given_max_batch_size'])}, "
        f"{cell(scan['sizes_given_trials'])} trials |",
    ]
    if scan["find_seconds"] is not None and scan["sizes_given_seconds"] is not None:
        lines += ["", f"The scan adds {scan['find_seconds'] - scan['sizes_given_seconds']:.2f} s to the search."]
    for key, error in scan["errors"].items():
        lines += ["", f"- {key}: {error}"]
    return lines


def markdown_tables(document: dict[str, Any]) -> str:
    """The summary and one table per workload (what ``main`` prints)."""
    parts = ["## Summary", "", _summary_table(document), ""]
    for case in document["workloads"]:
        parts += [*_workload_heading(case), "", _workload_table(case), ""]
    return "\n".join(parts)


def markdown_document(document: dict[str, Any]) -> str:
    """The Markdown report: setting, summary, one table per workload, the scan's cost, how to read them."""
    parts = [
        f"# Epoch survival: batch-size finders on variable-size data ({document['device']})",
        "",
        *environment_lines(document, default_command="python -m benchmarks.survival"),
        "",
        "For each shuffle seed, each finder runs on the workload's loader shuffled with that seed on a simulated GPU "
        "of the workload's capacity; then one full epoch shuffled with the same seed is trained at the size it gives "
        "(batchfinder: its recommended `result.batch_size`, *max* is its `max_batch_size`; Lightning and Accelerate: "
        "the size they return) on a fresh copy of the model and a fresh simulated GPU of the same capacity, the "
        "allocator's cache kept between steps. *epochs survived* is k of n over the seeds (the summary: over every "
        "workload and seed); *out of memory* gives, for each epoch that did not survive, the seed, the step and the "
        "shape of that batch's input. *worst-case "
        "truth* is the largest B whose worst-case batch (the B largest samples, collated with the workload's "
        "`collate_fn`) trains, found with `batchfinder.try_batch_size` on the samples sorted largest first; "
        "*worst-case batch fits* checks each size used the same way; *median ratio* is the median of size used / "
        "worst-case truth over the seeds. *trials* and *OOMs* are the finder's own, per seed (batchfinder's "
        "confirmation runs after the search counted separately, over all seeds); *seconds* is the finder's wall time "
        "over all seeds, epochs not included. Wall times vary from run to run; "
        "sizes, trials, OOMs and epoch outcomes do not on a simulated GPU.",
        "",
        markdown_tables(document),
        *_scan_lines(document.get("scan_speed")),
        "",
    ]
    return "\n".join(parts)


# -- chart -----------------------------------------------------------------------------------------------------------
SURVIVED = "#4c9f50"
OOM = "#d9534f"
MIXED = "#f0ad4e"
NO_SIZE = "#bbbbbb"


def _bar_style(row: dict[str, Any]) -> tuple[str, str]:
    """(colour, hatch) of one finder's bar: green when every epoch survived, red and hatched when none did, orange
    and hatched when some did, grey when there was no size at all."""
    if row["median_size"] is None:
        return NO_SIZE, ""
    if row["survived"] == row["epochs"]:
        return SURVIVED, ""
    if row["survived"] == 0:
        return OOM, "//"
    return MIXED, "//"


def _dot_colour(run: dict[str, Any]) -> str:
    if run["survived"]:
        return SURVIVED
    return OOM if run["epoch"] is not None else NO_SIZE


def write_chart(document: dict[str, Any], path: Path) -> None:
    """One panel per workload. Per finder a bar at its median size over the shuffle seeds (green: every epoch
    survived; orange, hatched: some did; red, hatched: none did), each seed's size as a dot (green: that epoch
    survived, red: it ran out of memory; seeds left to right), epochs survived k/n above the bar, and the worst-case
    truth as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cases = document["workloads"]
    columns = max(len(cases), 1)
    figure, axes = plt.subplots(1, columns, figsize=(4.2 * columns + 1, 5.4), squeeze=False)
    for axis, case in zip(axes[0], cases):
        rows = case["finders"]
        truth = case["truth"]["max_batch_size"]
        positions = list(range(len(rows)))
        heights = [row["median_size"] or 0 for row in rows]
        styles = [_bar_style(row) for row in rows]
        bars = axis.bar(positions, heights, width=0.7, color=[c for c, _ in styles], alpha=0.55, edgecolor="black",
                        linewidth=0.4)
        highest = max([truth, *heights])
        for x, bar, row, (_, hatch) in zip(positions, bars, rows, styles):
            bar.set_hatch(hatch)
            runs = row["runs"]
            offsets = [0.0] if len(runs) == 1 else [-0.25 + 0.5 * i / (len(runs) - 1) for i in range(len(runs))]
            for offset, run in zip(offsets, runs):
                if run["size"] is None:
                    continue
                highest = max(highest, run["size"])
                axis.plot(x + offset, run["size"], "o", markersize=5, color=_dot_colour(run),
                          markeredgecolor="black", markeredgewidth=0.5, zorder=3)
            top = max([row["median_size"] or 0, *[run["size"] or 0 for run in runs]])
            axis.annotate(f"{row['survived']}/{row['epochs']}", (x, top), xytext=(0, 5), textcoords="offset points",
                          ha="center", va="bottom", fontsize=8,
                          fontweight="bold" if row["survived"] < row["epochs"] else "normal")
        axis.axhline(truth, color="black", linestyle="--", linewidth=1)
        axis.set_xticks(positions)
        axis.set_xticklabels([row["finder"].replace(" ", "\n", 1) for row in rows], fontsize=7)
        axis.set_title(f"{case['workload']} at {case['capacity']} (worst-case truth {truth})", fontsize=10)
        axis.set_ylim(0, highest * 1.25 + 1)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("batch size used for the epoch")
    seeds = document["settings"].get("shuffle_seeds") or sorted(
        {run["shuffle_seed"] for case in cases for row in case["finders"] for run in row["runs"]}
    )
    handles = [
        Line2D([], [], color="black", linestyle="--", linewidth=1, label="worst-case truth"),
        Line2D([], [], marker="o", linestyle="", color=SURVIVED, markeredgecolor="black",
               label="a seed's size: survived"),
        Line2D([], [], marker="o", linestyle="", color=OOM, markeredgecolor="black",
               label="a seed's size: out of memory"),
        Patch(facecolor=SURVIVED, alpha=0.55, edgecolor="black", label="median size: every epoch survived"),
        Patch(facecolor=MIXED, alpha=0.55, hatch="//", edgecolor="black", label="median size: some survived"),
        Patch(facecolor=OOM, alpha=0.55, hatch="//", edgecolor="black", label="median size: none survived"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle(
        f"One full shuffled epoch at each finder's size, shuffle seeds {', '.join(map(str, seeds))} "
        f"(dots left to right), epochs survived above the bars ({document['device']})",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.09, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
