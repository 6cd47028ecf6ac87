"""Secrets and safety: an API key never lands in a run's files; checkpoints load without pickled code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO, TINY, run_cli

SRC = REPO / "src"
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, the shape of a W&B key


@pytest.mark.slow
def test_wandb_api_key_is_written_nowhere(tmp_path):
    env = {"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"}
    result = run_cli([*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=all",
                      f"paths.output_root={tmp_path}"], env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("*/*"))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"config.yaml", "train.log", "metrics.json", "results.jsonl", "metrics.csv"} <= names
    assert any(p.suffix == ".wandb" for p in (run_dir / "wandb").rglob("*"))  # W&B's offline run was written
    for path in written:
        assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in result.stdout + result.stderr


def _python_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_torch_load_passes_weights_only_true():
    calls = 0
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "load":
                if not (isinstance(func.value, ast.Name) and func.value.id == "torch"):
                    continue
                calls += 1
                flags = [k.value for k in node.keywords if k.arg == "weights_only"]
                assert flags and isinstance(flags[0], ast.Constant) and flags[0].value is True, (
                    f"{path.relative_to(REPO)}:{node.lineno}: torch.load without weights_only=True"
                )
    assert calls, "no torch.load call found: has the loader moved?"


def test_trust_remote_code_is_never_turned_on():
    for path in _python_files():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for use in re.finditer(r"trust_remote_code\s*=?\s*[\w.]*", line):
                assert re.fullmatch(r"trust_remote_code\s*=\s*False", use.group()), (
                    f"{path.relative_to(REPO)}:{lineno}: {line.strip()}"
                )
