"""benchmarks/gpu_check.py: its ``--cpu-smoke`` runs every check's code path at tiny sizes on the CPU (the GPU
sizes are run by hand on a GPU), and a check that fails is reported, not fatal to the others."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA_DIR, REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
NO_CUDA = "skipped (no CUDA)"


def expected_statuses() -> dict[str, str]:
    """Every check's status on a CPU: the CUDA-only ones skip; multi30k needs the data mirror."""
    multi30k = DATA_DIR and (Path(DATA_DIR) / "multi30k").is_dir()
    return {"train": "ok", "hf_gpt2": "ok", "compile": "ok", "memory": NO_CUDA, "sdpa": NO_CUDA, "fp16": NO_CUDA,
            "ddp": "ok", "fsdp": NO_CUDA, "multi30k": "ok" if multi30k else "skipped (no data)",
            "generation": "ok"}  # fmt: skip


def gpu_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python benchmarks/gpu_check.py --cpu-smoke <args>``, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def table(stdout: str) -> dict[str, list[str]]:
    """The Markdown table's rows: check name -> [status, numbers, seconds]."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in stdout.splitlines()]
    return {row[0]: row[1:] for row in rows if len(row) == 4 and row[0] not in ("check", "---")}


def summary(stdout: str) -> dict[str, str]:
    """The closing ``gpu_check key=value ...`` line as a dict."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check "), last
    return dict(pair.split("=", 1) for pair in last.split()[1:])


@pytest.mark.slow
def test_cpu_smoke_runs_every_check():
    result = gpu_check(timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table(result.stdout)
    statuses = {name: row[0] for name, row in rows.items()}
    assert statuses == expected_statuses(), result.stdout
    assert not any("FAIL" in status for status in statuses.values())
    pairs = summary(result.stdout)
    assert pairs["mode"] == "cpu-smoke"
    assert int(pairs["failed"]) == 0
    assert int(pairs["passed"]) == list(statuses.values()).count("ok")
    assert int(pairs["passed"]) + int(pairs["skipped"]) == len(statuses)
    for key in ("tokens_per_s", "hf_tokens_per_s", "speedup_vs_hf", "tokens_per_s_compiled", "gen_b16_tokens_per_s"):
        assert float(pairs[key]) > 0, key
    assert int(pairs["ddp_resumed_steps"]) == 2 * int(pairs["ddp_steps"])  # resumed from its checkpoint
    assert pairs["sdpa_no_mask"] != "none"  # the profiler saw the attention kernel (the CPU's)
    assert pairs["gen_tokens_equal"] == "true"  # same weights, greedy: the same tokens as transformers
    if statuses["multi30k"] == "ok":
        assert float(pairs["multi30k_rel_diff"]) <= 0.02


def test_a_failed_check_is_reported_with_its_reason():
    result = gpu_check("--only", "train", "sdpa", "fsdp", "--timeout", "1", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = table(result.stdout)
    assert [rows[name][0] for name in ("train", "sdpa", "fsdp")] == ["FAIL", "FAIL", NO_CUDA]
    assert "FAIL train:\n    timed out after 1 s" in result.stdout
    pairs = summary(result.stdout)
    assert (pairs["passed"], pairs["failed"], pairs["skipped"]) == ("0", "2", "1")


def test_gpu_timeouts_fit_in_eight_minutes(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert set(module.CHECKS) == set(expected_statuses())
    assert sum(check.gpu_timeout for check in module.CHECKS.values()) < 8 * 60
