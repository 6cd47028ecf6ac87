"""What the recipe benchmarks share: run `python train.py <overrides>` timed, read back its results and curves."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_recipe(overrides: list[str], output_root: Path) -> tuple[dict, float, int]:
    """Train one recipe (CSV logging only) under ``output_root``.

    Returns:
        the last results record (the last stage of a staged recipe), the whole command's wall
        time in seconds, and the number of records (stages) it wrote.
    """
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, "logger=none", f"paths.output_root={output_root}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (output_root / "results.jsonl").read_text().splitlines()]
    return records[-1], wall, len(records)


def csv_rows(run_dir: str | Path) -> list[dict]:
    """The rows of a run's ``csv/metrics.csv``."""
    with open(Path(run_dir) / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def logged(run_dir: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of ``key`` in a run's CSV metrics."""
    return [(int(r["step"]), float(r[key])) for r in csv_rows(run_dir) if r.get(key)]
