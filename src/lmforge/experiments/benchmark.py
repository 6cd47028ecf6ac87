"""``lmforge-benchmark suite=<name>``: train a suite's declared runs over its seeds, one after the other,
and keep one record per (run, seed) in ``<out>/results.jsonl``; then render the report (report.py).

A suite (``conf/suite/<name>.yaml``) names its runs and the overrides of ``train.py`` each one takes:

    name: sst2-backbones
    title: SST-2 from scratch, every backbone
    metric: best_val/acc      # the leading column, and which way is better
    mode: max
    curve: val/acc            # the validation curve to plot
    columns: [test/acc]       # more metrics for the table (or trainable_share, step_ms, peak_memory_mb)
    bars: false               # true: also bars.png, a bar per run for each of these columns
    seeds: [1337, 1]
    groups:                   # named lists of overrides; "@name" in a run's list expands to one
      transformer: [task=sst2, scheduler=linear]
    runs:
      gru: [experiment=sst2-gru]
      bert-mini: ["@transformer", model=bert-mini]
      mlm: {overrides: [task=mlm], report: false}      # a run others start from, not a table row
      mlm-then-sst2: ["@transformer", "init_from={run:mlm}"]  # the run dir of `mlm` at the same seed
      lstm: {overrides: [experiment=sst2-lstm], seeds: [1337, 1, 2]}  # a headline row at more seeds
    task: sst2                # the task whose splits and metric code the baselines use
    baselines:                # rows computed without training (experiments/baselines.py), shown first
      majority: {method: majority}

A run's own ``seeds`` replace the suite's for it; ``seeds=`` on the command line sets every run's.
Running the same command again skips every (run, seed) that has a record with the same overrides,
and every baseline recorded with the same method, so a suite that was stopped continues where it was.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmforge.errors import LmforgeError
from lmforge.experiments.baselines import SuiteBaseline, parse_baselines, run_baselines
from lmforge.experiments.report import RESULTS_FILE, SUITE_FILE, read_records, write_report
from lmforge.tracking import append_result, csv_history, logged_values

log = logging.getLogger("lmforge")

_RUN_REFERENCE = re.compile(r"\{run:([^}]+)\}")


@dataclass
class SuiteRun:
    """One declared run of a suite: its name, its ``train.py`` overrides, whether it is a table row, and
    its own seeds (None: the suite's)."""

    name: str
    overrides: list[str]
    report: bool = True
    seeds: list[int] | None = None

    @property
    def needs(self) -> list[str]:
        """The earlier runs whose run dirs this one's overrides name (``{run:<name>}``)."""
        return [m for o in self.overrides for m in _RUN_REFERENCE.findall(o)]


@dataclass
class Suite:
    """A benchmark suite as declared in ``conf/suite/<name>.yaml``."""

    name: str
    title: str
    runs: list[SuiteRun]
    seeds: list[int]
    metric: str
    mode: str = "min"
    curve: str | None = None
    columns: list[str] = field(default_factory=list)
    bars: bool = False
    notes: str = ""
    task: str | None = None
    baselines: list[SuiteBaseline] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        """What the report needs besides the records (written to ``suite.json``)."""
        return {
            "name": self.name,
            "title": self.title,
            "metric": self.metric,
            "mode": self.mode,
            "curve": self.curve,
            "columns": list(self.columns),
            "bars": self.bars,
            "notes": self.notes,
            "runs": [r.name for r in self.runs if r.report],
            "baselines": [b.name for b in self.baselines],
        }


def load_suite(cfg: DictConfig) -> Suite:
    """Check and expand a suite config: ``@group`` references, ``{run:<name>}`` references, the mode."""
    name = str(cfg.get("name") or "")
    if not name:
        raise LmforgeError("The suite config has no name: set `name:` in conf/suite/<name>.yaml.")
    groups = _plain(cfg.get("groups"))
    runs: list[SuiteRun] = []
    for run_name, spec in _plain(cfg.get("runs")).items():
        spec = spec if isinstance(spec, dict) else {"overrides": spec}
        overrides, report = spec.get("overrides") or [], bool(spec.get("report", True))
        own_seeds = _declared_seeds(spec.get("seeds"), f"Suite {name}, run {run_name}") or None
        expanded = _expand(overrides, groups, f"Suite {name}, run {run_name}")
        runs.append(SuiteRun(str(run_name), expanded, report, own_seeds))
    if not runs:
        raise LmforgeError(f"Suite {name} declares no runs (`runs:` is empty).")
    suite_seeds = _declared_seeds(cfg.get("seeds"), f"Suite {name}") or [1337]
    _check_starting_runs(name, runs, suite_seeds)
    mode = str(cfg.get("mode") or "min")
    if mode not in ("min", "max"):
        raise LmforgeError(f"Suite {name}: mode must be min or max, not {mode}.")
    task = str(cfg.task) if cfg.get("task") else None
    baselines = parse_baselines(_plain(cfg.get("baselines")), task, name, [r.name for r in runs])
    return Suite(
        name=name,
        title=str(cfg.get("title") or name),
        runs=runs,
        seeds=suite_seeds,
        metric=str(cfg.metric),
        mode=mode,
        curve=cfg.get("curve"),
        columns=[str(c) for c in cfg.get("columns") or []],
        bars=bool(cfg.get("bars")),
        notes=str(cfg.get("notes") or "").strip(),
        task=task,
        baselines=baselines,
    )


def _declared_seeds(value: Any, where: str) -> list[int]:
    """A suite's or a run's ``seeds:`` (one integer or a list) as a list; a bad one is one sentence."""
    try:
        return _as_list(value, int, "seeds", "integers")
    except LmforgeError as err:
        raise LmforgeError(f"{where}: {err}") from None


def _check_starting_runs(suite: str, runs: list[SuiteRun], suite_seeds: list[int]) -> None:
    """Every run a run starts from is declared before it and trained at each of its seeds."""
    declared: dict[str, SuiteRun] = {}
    for run in runs:
        for needed in run.needs:
            if needed not in declared:
                raise LmforgeError(
                    f"Suite {suite}, run {run.name} starts from run '{needed}', which is not declared before it."
                )
            missing = sorted(set(run.seeds or suite_seeds) - set(declared[needed].seeds or suite_seeds))
            if missing:
                raise LmforgeError(
                    f"Suite {suite}, run {run.name} is trained at seed(s) {missing}, where run '{needed}' it "
                    f"starts from is not: give '{needed}' those seeds too."
                )
        declared[run.name] = run


def training_plan(suite: Suite, runs: list[SuiteRun], seeds: list[int] | None = None) -> list[tuple[int, SuiteRun]]:
    """The (seed, run) pairs to train, seed after seed in declared order: every run at ``seeds`` (the
    command line's) when given, else each run at its own seeds or the suite's."""
    if seeds:
        return [(seed, run) for seed in seeds for run in runs]
    order = list(dict.fromkeys([*suite.seeds, *(s for r in runs for s in r.seeds or [])]))
    return [(seed, run) for seed in order for run in runs if seed in (run.seeds or suite.seeds)]


def _plain(node: Any) -> dict[str, Any]:
    """A config mapping as plain Python (empty when missing)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


def _expand(overrides: list[Any], groups: dict[str, list[Any]], where: str, seen: tuple[str, ...] = ()) -> list[str]:
    """Overrides with each ``@group`` replaced by that group's list (groups may name other groups)."""
    expanded: list[str] = []
    for item in overrides:
        item = str(item)
        if not item.startswith("@"):
            expanded.append(item)
            continue
        group = item[1:]
        if group not in groups:
            raise LmforgeError(f"{where}: no group '{group}' under `groups:`.")
        if group in seen:
            raise LmforgeError(f"{where}: group '{group}' includes itself.")
        expanded += _expand(groups[group] or [], groups, where, (*seen, group))
    return expanded


def selected_runs(suite: Suite, only: list[str] | None) -> list[SuiteRun]:
    """The runs to train: those ``only`` names (shell patterns such as ``gpt2-tiny-*``; all without it)
    and the runs they start from. A pattern may name baselines instead (:func:`selected_baselines`)."""
    if not only:
        return suite.runs
    by_name = {r.name: r for r in suite.runs}
    baselines = [b.name for b in suite.baselines]
    pending: list[str] = []
    for pattern in only:
        matched = fnmatch.filter(by_name, pattern)
        if not matched and not fnmatch.filter(baselines, pattern):
            names = ", ".join(by_name) + (f"; its baselines are {', '.join(baselines)}" if baselines else "")
            raise LmforgeError(f"Suite {suite.name} has no run matching {pattern}; its runs are {names}.")
        pending += matched
    wanted: set[str] = set()
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending += by_name[name].needs
    return [r for r in suite.runs if r.name in wanted]


def selected_baselines(suite: Suite, only: list[str] | None) -> list[SuiteBaseline]:
    """The baselines to compute: those ``only`` names or matches (all without it)."""
    if not only:
        return suite.baselines
    return [b for b in suite.baselines if any(fnmatch.fnmatch(b.name, pattern) for pattern in only)]


def run_overrides(run: SuiteRun, seed: int, run_dirs: dict[str, str]) -> list[str]:
    """A run's overrides at one seed, ``{run:<name>}`` replaced by that run's dir."""
    return [_RUN_REFERENCE.sub(lambda m: run_dirs[m.group(1)], o) for o in run.overrides] + [f"seed={seed}"]


def train_command(overrides: list[str]) -> list[str]:
    """The command that trains one run: this Python, lmforge's train entry point, the overrides."""
    return [sys.executable, "-m", "lmforge.cli", *overrides]


def run_suite(cfg: DictConfig) -> Path:
    """Compute the baselines of ``cfg.suite`` and train every (run, seed) that has no record yet, then
    write the report.

    Returns:
        the report folder (``cfg.out``).
    Raises:
        LmforgeError: when a run fails (after the other runs have been tried and the report written).
    """
    from lmforge.console import setup_console

    setup_console()
    suite = load_suite(cfg.suite)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / SUITE_FILE).write_text(json.dumps(suite.meta(), indent=2) + "\n", encoding="utf-8")
    seeds = _as_list(cfg.get("seeds"), int, "seeds", "integers")
    only = _as_list(cfg.get("only"), str, "only", "run names")
    runs = selected_runs(suite, only)
    extra = [str(o) for o in cfg.get("extra") or []]
    # Baselines first: seconds each, and a trained row is read against them.
    failed = [f"baseline {name}" for name in run_baselines(suite, selected_baselines(suite, only), out, cfg.rerun)]
    done = {(r["run"], r["seed"]): r for r in read_records(out)}
    run_dirs: dict[int, dict[str, str]] = {}  # seed -> run name -> its run dir at that seed
    for seed, run in training_plan(suite, runs, seeds):
        trained = run_dirs.setdefault(seed, {})
        if any(n not in trained for n in run.needs):
            log.warning("skipping %s seed %d: a run it starts from failed", run.name, seed)
            continue
        overrides = [*run_overrides(run, seed, trained), *extra]
        previous = done.get((run.name, seed))
        if previous and previous["overrides"] == overrides and not cfg.rerun:
            log.info("%s seed %d: recorded already (rerun=true trains it again)", run.name, seed)
            trained[run.name] = previous["run_dir"]
            continue
        record = _train_one(suite, run, seed, overrides, out, cfg)
        if record is None:
            failed.append(f"{run.name} (seed {seed})")
            continue
        trained[run.name] = record["run_dir"]
        done[(run.name, seed)] = record
    report = write_report(out)
    log.info("report: %s", report)
    if failed:
        raise LmforgeError(
            f"{len(failed)} run(s) failed: {', '.join(failed)}; see the log above and the run logs in {out / 'logs'}."
        )
    return out


def _as_list(value: Any, kind: type, key: str, what: str) -> list[Any]:
    """A command-line option given as one value (``seeds=3``) or a list (``seeds=[1,2]``), as a list of ``kind``."""
    if value is None:
        return []
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, list) else [value]
    try:
        parsed = [kind(v) for v in values]
    except (TypeError, ValueError):
        parsed = None
    # A value that changes when converted (seed 1.5 or true) is refused, not truncated to 1.
    if parsed is None or any(str(p) != str(v) for p, v in zip(parsed, values, strict=True)):
        raise LmforgeError(f"{key} must be a list of {what}, as in {key}=[1,2], not {value}.")
    return parsed


def _train_one(
    suite: Suite, run: SuiteRun, seed: int, overrides: list[str], out: Path, cfg: DictConfig
) -> dict[str, Any] | None:
    """Train one (run, seed) in a subprocess, timed start to exit; append and return its record (None on failure)."""
    output_root = out / "train" / f"{run.name}-s{seed}"
    results_file = output_root / "results.jsonl"
    results_file.unlink(missing_ok=True)  # a rerun's stages only
    command = train_command([*overrides, f"paths.output_root={output_root}", f"logger={cfg.logger}"])
    env = dict(os.environ)
    if cfg.get("threads"):
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    log_file = logs / f"{run.name}-s{seed}.log"
    log.info("%s seed %d: %s", run.name, seed, shlex.join(command[3:]))
    start = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    stages = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    if done.returncode or not stages:
        tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or ["no output"]
        log.error("%s seed %d failed (exit %d): %s", run.name, seed, done.returncode, tail[0])
        return None
    last = stages[-1]
    record = {
        "suite": suite.name,
        "run": run.name,
        "seed": seed,
        "report": run.report,
        "overrides": overrides,
        "wall_time_s": round(wall, 1),
        "stages": len(stages),
        "steps": last["steps"],
        "parameters": last["parameters"],
        "trainable_parameters": last["trainable_parameters"],
        "tokens_per_s": last.get("tokens_per_s"),
        "step_ms": last.get("step_ms"),
        "peak_memory_mb": last.get("peak_memory_mb"),
        "metrics": last["metrics"],
        "curves": logged_values(csv_history(Path(last["run_dir"]) / "csv"), [suite.curve] if suite.curve else []),
        "run_dir": last["run_dir"],
        "finished_at": datetime.now().isoformat(timespec="seconds"),
        "threads": cfg.get("threads"),
        "model": last.get("model"),
        "task": last.get("task"),
        "git_sha": last.get("git_sha"),
        "git_dirty": last.get("git_dirty"),
        "versions": last.get("versions"),
        "hardware": last.get("hardware"),
    }
    append_result(out / RESULTS_FILE, record)
    # A row of a suite of several tasks may score only some columns: the first it has.
    shown = next((k for k in [suite.metric, *suite.columns] if k in record["metrics"]), None)
    if run.report and shown:
        log.info("%s seed %d: %s %s in %.0f s", run.name, seed, shown, record["metrics"][shown], wall)
    else:
        log.info("%s seed %d: done in %.0f s", run.name, seed, wall)
    return record
