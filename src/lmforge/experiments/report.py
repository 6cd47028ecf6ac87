"""A benchmark suite's report, rendered from its ``results.jsonl`` alone (no training):
``report.md`` (the baseline rows first, then mean ± std over seeds, wall time, tokens/s, parameters,
then every seed), ``curves.png`` (the validation curve of each run), ``metric_vs_time.png`` (where
the baselines are horizontal lines) and, for a suite with ``bars: true``, ``bars.png`` (each column's
value per run, for rows that score different tasks).

    lmforge-report outputs/benchmarks/shakespeare
    lmforge-report benchmarks/suites/* --results-md benchmarks/RESULTS.md   # also rewrite each suite's section there
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

REPORT_FILE = "report.md"
RESULTS_FILE = "results.jsonl"  # one record per (run, seed), appended as runs finish
SUITE_FILE = "suite.json"  # the suite as it was declared
CURVES_PNG = "curves.png"
TIME_PNG = "metric_vs_time.png"
BARS_PNG = "bars.png"
BASELINE = "baseline"  # the ``kind`` of a baseline row's record: no training, so no seed, steps, time or parameters
NOT_APPLICABLE = "—"


def is_baseline(record: dict[str, Any]) -> bool:
    """Whether a record is a baseline row (experiments/baselines.py) rather than a trained run."""
    return record.get("kind") == BASELINE


def read_records(out: Path) -> list[dict[str, Any]]:
    """The records of ``<out>/results.jsonl``, oldest first (a later record of the same run and seed wins)."""
    path = out / RESULTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_suite(out: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A report folder's suite description and its latest record per (run, seed): the baselines first,
    then the runs, each in declared order."""
    out = Path(out)
    if not (out / SUITE_FILE).is_file():
        raise LmforgeError(f"{out} is not a benchmark report folder (no {SUITE_FILE}; lmforge-benchmark writes one).")
    meta = json.loads((out / SUITE_FILE).read_text(encoding="utf-8"))
    latest = {(r["run"], r["seed"]): r for r in read_records(out) if r.get("report", True)}
    order = {name: i for i, name in enumerate([*meta.get("baselines", []), *meta["runs"]])}
    records = sorted(
        latest.values(), key=lambda r: (not is_baseline(r), order.get(r["run"], len(order)), r["seed"] or 0)
    )
    return meta, records


def trained(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of trained runs (not baselines)."""
    return [r for r in records if not is_baseline(r)]


# Columns a suite may name besides metrics: fields of the records, and what is derived from them.
RECORD_COLUMNS = {"trainable_share": "trainable (% of backbone)", "step_ms": "ms/step", "peak_memory_mb": "peak MB"}


def value(record: dict[str, Any], key: str) -> float | None:
    """A record's value for a table column: a metric, ``trainable_share`` (percent) or a record field."""
    if key in record["metrics"]:
        return record["metrics"][key]
    if key == "trainable_share":
        return 100 * record["trainable_parameters"] / record["parameters"] if record.get("parameters") else None
    return record.get(key)


def _columns(meta: dict[str, Any]) -> list[str]:
    """The suite's metric first, then its other columns."""
    return [meta["metric"], *[c for c in meta["columns"] if c != meta["metric"]]]


def by_run(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by run name, keeping their order."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["run"]].append(r)
    return dict(groups)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def number(value: float | None) -> str:
    """A value for a table: 4 decimals below 10 (losses, accuracies), 2 up to 1,000 (BLEU, F1 in percent), then none."""
    if value is None:
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _mean_cell(values: list[float], fmt=number) -> str:
    if not values:
        return ""
    mean, std = mean_std(values)
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def _minutes(value: float) -> str:
    return f"{value:.1f}"


def _count(n: float | None) -> str:
    return "" if n is None else f"{n:,.0f}"


def summary_table(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The markdown table of a suite: one row per run, metrics as mean ± std over its seeds."""
    columns = _columns(meta)
    better = "higher" if meta["mode"] == "max" else "lower"
    header = ["run", "seeds", f"{columns[0]} ({better} is better)", *(RECORD_COLUMNS.get(c, c) for c in columns[1:]),
              "steps", "wall time (min)", "tokens/s", "parameters", "trainable"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in by_run(records).items():
        if is_baseline(runs[0]):
            values = [value(runs[0], c) for c in columns]  # a record field (ms/step) has none: not applicable
            cells = [
                f"{name} (baseline)",
                NOT_APPLICABLE,
                *(number(v) if v is not None else NOT_APPLICABLE for v in values),
            ]
            lines.append("| " + " | ".join([*cells, *[NOT_APPLICABLE] * 5]) + " |")  # nothing trained
            continue
        cells = [name, str(len(runs))]
        cells += [_mean_cell([v for r in runs if (v := value(r, c)) is not None]) for c in columns]
        tokens = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
        cells += [
            _count(statistics.fmean(r["steps"] for r in runs)),
            _mean_cell([r["wall_time_s"] / 60 for r in runs], _minutes),
            _count(statistics.fmean(tokens)) if tokens else "",
            _count(runs[0]["parameters"]),
            _count(runs[0]["trainable_parameters"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Every (run, seed) record of a trained run: its metrics, steps, wall time and tokens/s."""
    columns = _columns(meta)
    header = ["run", "seed", *(RECORD_COLUMNS.get(c, c) for c in columns), "steps", "wall time (min)", "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in trained(records):
        cells = [r["run"], str(r["seed"]), *(number(value(r, c)) for c in columns)]
        cells += [_count(r["steps"]), _minutes(r["wall_time_s"] / 60), _count(r.get("tokens_per_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(records: list[dict[str, Any]]) -> str:
    """Where the records were measured: CPU or GPUs, threads, torch and Lightning versions, dates."""
    if not records:
        return ""
    hw = records[-1].get("hardware") or {}
    versions = records[-1].get("versions") or {}
    where = ", ".join(hw.get("gpus") or []) or f"{hw.get('cpu', '?')} ({hw.get('cpu_count', '?')} cores)"
    threads = {r.get("threads") for r in records} - {None}
    dates = sorted(r["finished_at"][:10] for r in records)
    parts = [
        where,
        f"{', '.join(map(str, sorted(threads)))} thread(s) per run" if threads else None,
        f"torch {versions.get('torch')}" if versions.get("torch") else None,
        f"pytorch-lightning {versions.get('pytorch-lightning')}" if versions.get("pytorch-lightning") else None,
        f"git {records[-1]['git_sha'][:7]}" if records[-1].get("git_sha") else None,
        dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}",
    ]
    return "measured on " + "; ".join(p for p in parts if p) + "."


def plot_curves(meta: dict[str, Any], records: list[dict[str, Any]], png: Path) -> Path | None:
    """The suite's validation curve against step: one line per run (the mean of its seeds where steps match),
    a horizontal line per baseline."""
    key = meta.get("curve")
    runs = {n: rs for n, rs in by_run(trained(records)).items() if any(r["curves"].get(key) for r in rs)} if key else {}
    if not runs:
        return None
    plt, fig, ax = _figure()
    for name, rs in runs.items():
        per_step: dict[int, list[float]] = defaultdict(list)
        for r in rs:
            for step, point in r["curves"].get(key, []):
                per_step[int(step)].append(point)
        steps = sorted(per_step)
        ax.plot(steps, [statistics.fmean(per_step[s]) for s in steps], marker="o", markersize=3, label=name)
    _baseline_lines(ax, records, key)
    return _save(plt, fig, ax, meta["title"], "step", key, png)


def plot_metric_vs_time(meta: dict[str, Any], records: list[dict[str, Any]], png: Path) -> Path | None:
    """Each run's metric against its wall time: the mean over seeds, with one standard deviation as bars;
    a horizontal line per baseline."""
    metric = meta["metric"]
    points = {n: [r for r in rs if metric in r["metrics"]] for n, rs in by_run(trained(records)).items()}
    points = {n: rs for n, rs in points.items() if rs}
    if not points:
        return None
    plt, fig, ax = _figure()
    for name, rs in points.items():
        minutes, minutes_std = mean_std([r["wall_time_s"] / 60 for r in rs])
        score, score_std = mean_std([r["metrics"][metric] for r in rs])
        ax.errorbar(minutes, score, xerr=minutes_std or 0, yerr=score_std or 0, fmt="o", capsize=3, label=name)
    _baseline_lines(ax, records, metric)
    return _save(plt, fig, ax, meta["title"], "wall time (min)", metric, png)


def bar_groups(meta: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, list[tuple[str, float, float, bool]]]:
    """Column -> ``(row, mean over seeds, standard deviation or 0, is a baseline)`` for each row that has it."""
    groups = by_run(records)
    bars: dict[str, list[tuple[str, float, float, bool]]] = {}
    for column in _columns(meta):
        bars[column] = []
        for name, rs in groups.items():
            values = [v for r in rs if (v := r["metrics"].get(column)) is not None]
            if values:
                mean, std = mean_std(values)
                bars[column].append((name, mean, std or 0.0, is_baseline(rs[0])))
    return bars


def plot_bars(meta: dict[str, Any], records: list[dict[str, Any]], png: Path) -> Path | None:
    """For a suite with ``bars: true``: a group of bars per table column, a bar per row that has the column
    (rows that score different tasks compare column by column); baselines hatched."""
    groups = bar_groups(meta, records) if meta.get("bars") else {}
    if not any(groups.values()):
        return None
    colours = {name: f"C{i % 10}" for i, name in enumerate(by_run(records))}
    plt, fig, ax = _figure()
    labelled: set[str] = set()
    for x, bars in enumerate(groups.values()):
        width = 0.8 / max(len(bars), 1)
        for i, (name, mean, std, baseline) in enumerate(bars):
            label = None if name in labelled else f"{name} (baseline)" if baseline else name
            labelled.add(name)
            ax.bar(x - 0.4 + width * (i + 0.5), mean, width, yerr=std, capsize=2, color=colours[name],
                   hatch="//" if baseline else None, label=label)  # fmt: skip
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    return _save(plt, fig, ax, meta["title"], "", "score", png)


def _baseline_lines(ax, records: list[dict[str, Any]], key: str) -> None:
    """A horizontal line at each baseline's ``key`` (a baseline has one value, whatever the x axis)."""
    lines = [r for r in records if is_baseline(r) and key in r["metrics"]]
    for r, style in zip(lines, ["--", ":", "-.", (0, (5, 1, 1, 1))] * len(lines)):
        ax.axhline(r["metrics"][key], linestyle=style, linewidth=1.2, color="0.35", label=f"{r['run']} (baseline)")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    return plt, fig, ax


def _save(plt, fig, ax, title: str, xlabel: str, ylabel: str, png: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title.replace("`", ""), fontsize=10)
    ax.grid(alpha=0.3)
    # Beside the plot, where many runs (the PEFT suite has 18) do not hide the lines.
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def section(out: str | Path, relative_to: Path | None = None, heading: str = "##") -> str:
    """The markdown of a suite's report: title, notes, command, machine, tables, plots.

    Args:
        relative_to: the folder of the markdown file the section goes into (image links are relative to it).
    """
    out = Path(out)
    meta, records = read_suite(out)
    base = relative_to or out
    parts = [f"{heading} {meta['title']}", ""]
    if meta.get("notes"):
        parts += [meta["notes"], ""]
    parts += [f"`lmforge-benchmark suite={meta['name']}` (runs declared in `conf/suite/{meta['name']}.yaml`), "
              f"{machine_line(trained(records) or records)}", ""]  # fmt: skip
    if not records:
        return "\n".join([*parts, "No run of this suite has finished yet.", ""])
    parts += [summary_table(meta, records), ""]
    for png, what in (
        (CURVES_PNG, "validation curves"),
        (TIME_PNG, "metric against wall time"),
        (BARS_PNG, "each column"),
    ):
        if (out / png).is_file():
            parts.append(f"![{meta['name']}: {what}]({Path(os.path.relpath(out / png, base)).as_posix()})")
    if trained(records):
        parts += ["", "<details><summary>Every seed</summary>", "", seeds_table(meta, records), "", "</details>"]
    parts.append("")
    return "\n".join(parts)


def write_report(out: str | Path) -> Path:
    """Render ``report.md`` and the plots of a report folder from its records; return the report's path."""
    out = Path(out)
    meta, records = read_suite(out)
    for png, plot in ((CURVES_PNG, plot_curves), (TIME_PNG, plot_metric_vs_time), (BARS_PNG, plot_bars)):
        if plot(meta, records, out / png) is None:
            (out / png).unlink(missing_ok=True)
    report = out / REPORT_FILE
    report.write_text(section(out, heading="#"), encoding="utf-8")
    return report


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- suite:{name} (lmforge-report writes this section) -->", f"<!-- /suite:{name} -->"


def update_markdown(markdown: str | Path, out: str | Path) -> None:
    """Replace the suite's section in a markdown file (between its markers), or append it at the end."""
    markdown, out = Path(markdown), Path(out)
    name = read_suite(out)[0]["name"]
    start, end = _markers(name)
    block = f"{start}\n{section(out, relative_to=markdown.parent).rstrip()}\n{end}"
    text = markdown.read_text(encoding="utf-8") if markdown.is_file() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    markdown.write_text(text, encoding="utf-8")


def render(folders: list[str], results_md: str | None = None) -> list[Path]:
    """``lmforge-report``: re-render each folder's report; with ``results_md``, update its sections there too."""
    reports = [write_report(folder) for folder in folders]
    if results_md:
        for folder in folders:
            update_markdown(results_md, folder)
    return reports
