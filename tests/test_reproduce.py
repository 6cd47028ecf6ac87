"""Reproducibility: equal runs from equal seeds, what a run dir records of its making, lmforge-reproduce."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, entry_cfg, make_cfg
from lmforge import tracking
from lmforge.compose.run import resolve_deterministic
from lmforge.errors import LmforgeError
from lmforge.experiments.reproduce import check_options, compare_metrics, format_table, reproduce_run
from lmforge.training import run_training


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny language-model run (seed 1337), shared by the tests of this file."""
    return run_training(make_cfg(TINY, tmp_path_factory.mktemp("original")))


def _weights(record: dict) -> dict[str, torch.Tensor]:
    return torch.load(Path(record["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from lmforge.cli import reproduce; sys.argv = ['lmforge-reproduce', *sys.argv[1:]]; reproduce()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_deterministic_auto_is_on_for_the_cpu_only(monkeypatch, tmp_path):
    assert make_cfg(TINY, tmp_path).trainer.deterministic == "auto"
    assert resolve_deterministic("auto", "cpu") == "warn"
    assert resolve_deterministic("auto", "gpu") is False
    assert resolve_deterministic(True, "gpu") is True and resolve_deterministic(False, "cpu") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_deterministic("auto", "auto") == "warn"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_deterministic("auto", "auto") is False


@pytest.mark.slow
def test_same_config_and_seed_give_equal_metrics_and_weights(tiny_run, tmp_path):
    again = run_training(make_cfg(TINY, tmp_path))
    assert torch.are_deterministic_algorithms_enabled()  # trainer.deterministic=auto on the CPU
    assert again["metrics"] == tiny_run["metrics"] and "val/loss" in again["metrics"]
    first, second = _weights(tiny_run), _weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.slow
def test_another_seed_gives_other_metrics_and_weights(tiny_run, tmp_path):
    other = run_training(make_cfg([*TINY, "seed=7"], tmp_path))
    assert other["metrics"]["val/loss"] != tiny_run["metrics"]["val/loss"]
    first, second = _weights(tiny_run), _weights(other)
    assert not all(torch.equal(first[name], second[name]) for name in first)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)  # fmt: skip


def test_git_diff_is_saved_only_when_the_tree_is_dirty(tmp_path):
    repo, run_dir = tmp_path / "repo", tmp_path / "run"
    repo.mkdir()
    run_dir.mkdir()
    assert tracking.git_diff(repo) is None and tracking.git_state(repo) == {"git_sha": None, "git_dirty": None}
    assert tracking.save_git_diff(run_dir, repo) is None and not (run_dir / "git.diff").exists()
    _git(repo, "init", "-q")
    (repo / "model.py").write_text("n_layer = 4\n")
    _git(repo, "add", "model.py")
    _git(repo, "commit", "-qm", "first")
    assert tracking.git_state(repo)["git_dirty"] is False and len(tracking.git_state(repo)["git_sha"]) == 40
    assert tracking.save_git_diff(run_dir, repo) is None
    (repo / "model.py").write_text("n_layer = 6\n")
    (repo / "notes.txt").write_text("untracked: not part of the diff\n")
    assert tracking.git_state(repo)["git_dirty"] is True
    saved = tracking.save_git_diff(run_dir, repo)
    assert saved == run_dir / "git.diff"
    text = saved.read_text()
    assert "-n_layer = 4" in text and "+n_layer = 6" in text and "notes.txt" not in text
    _git(repo, "checkout", "-q", "model.py")
    assert tracking.save_git_diff(run_dir, repo) is None and not saved.exists()  # a stale diff goes


@pytest.mark.slow
def test_run_dir_records_how_the_run_was_made(tiny_run):
    run_dir = Path(tiny_run["run_dir"])
    record = json.loads((run_dir / "metrics.json").read_text())
    assert shlex.split(record["command"]) == sys.argv
    assert record["cwd"] == str(Path.cwd()) and record["overrides"] == []  # no Hydra job around run_training
    assert record["git_sha"] == tracking.git_state()["git_sha"] and record["seed"] == 1337
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["lmforge"]
    assert record["hardware"]["torch_threads"] == torch.get_num_threads() and record["device"] == "cpu"
    diff = run_dir / "git.diff"
    assert diff.is_file() == bool(record["git_dirty"])
    if record["git_dirty"]:
        assert diff.read_text() == tracking.git_diff()
    results = Path(tiny_run["run_dir"]).parents[2] / "results.jsonl"
    assert json.loads(results.read_text().splitlines()[-1])["git_sha"] == record["git_sha"]


@pytest.mark.slow
def test_reproduce_reports_a_match(tiny_run):
    report = reproduce_run(entry_cfg("reproduce", [f"run={tiny_run['run_dir']}"]))
    new_dir = Path(report["reproduction"])
    assert report["match"] and report["tolerance"] == 0.0 and report["original"] == tiny_run["run_dir"]
    assert new_dir != Path(tiny_run["run_dir"]) and new_dir.parents[2] == Path(tiny_run["run_dir"]).parents[2]
    assert json.loads((new_dir / "reproduce.json").read_text()) == json.loads(json.dumps(report))
    assert report["metrics"]["val/loss"] == {"original": tiny_run["metrics"]["val/loss"],
                                             "reproduced": tiny_run["metrics"]["val/loss"], "abs_diff": 0.0,
                                             "match": True}  # fmt: skip
    assert report["weights"] == {"compared": True, "max_abs_diff": 0.0, "match": True}
    assert report["notes"] == []  # same code, same packages, same machine
    # The new run's checkpoints and logs are its own, not written into the original's dir.
    assert (new_dir / "checkpoints" / "last.ckpt").is_file() and (new_dir / "csv" / "metrics.csv").is_file()


@pytest.mark.slow
def test_reproduce_of_a_tampered_run_says_so_and_exits_1(tiny_run, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(tiny_run["run_dir"], original)
    record = json.loads((original / "metrics.json").read_text())
    record["metrics"]["val/loss"] += 0.01
    record["versions"]["torch"] = "1.0.0"
    (original / "metrics.json").write_text(json.dumps(record))
    result = _cli(f"run={original}", f"paths.output_root={tmp_path / 'out'}")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: The reproduction does not match") and "val/loss" in error, result.stderr
    (report_file,) = (tmp_path / "out").glob("runs/*/*/reproduce.json")
    report = json.loads(report_file.read_text())
    assert not report["match"] and not report["metrics"]["val/loss"]["match"]
    assert report["metrics"]["train/loss"]["match"]
    assert report["metrics"]["val/loss"]["abs_diff"] == pytest.approx(0.01)
    assert report["weights"]["match"] and any("torch 1.0.0 originally" in note for note in report["notes"])
    assert "val/loss" in result.stdout and "NO" in result.stdout  # the table
    # The reproduction's own record names the command and Hydra overrides that made it.
    made = json.loads((report_file.parent / "metrics.json").read_text())
    assert made["overrides"] == [f"run={original}", f"paths.output_root={tmp_path / 'out'}"]
    assert shlex.split(made["command"])[0] == "lmforge-reproduce"


def test_bad_input_is_one_sentence(tmp_path):
    with pytest.raises(LmforgeError, match="not a run directory"):
        reproduce_run(entry_cfg("reproduce", [f"run={tmp_path}"]))
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(LmforgeError, match="no metrics.json"):
        reproduce_run(entry_cfg("reproduce", [f"run={tmp_path}"]))
    check_options(["run=x", "tolerance=1e-6", "device=cpu", "paths.output_root=o", "data_dir=d", "--cfg", "job"])
    for arg in ("trainer.max_steps=5", "+trainer.max_steps=5", "seed=2"):
        with pytest.raises(LmforgeError, match="cannot be set"):
            check_options([arg])
    result = _cli(f"run={tmp_path}", "trainer.max_steps=5")
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0 and "trainer.max_steps" in result.stderr


def test_metrics_within_tolerance_and_the_table():
    rows = compare_metrics({"val/loss": 1.0, "val/ppl": 2.0}, {"val/loss": 1.0000005, "test/loss": 3.0}, 1e-6)
    assert rows["val/loss"]["match"] and not rows["val/ppl"]["match"] and not rows["test/loss"]["match"]
    assert rows["val/ppl"]["reproduced"] is None and rows["test/loss"]["abs_diff"] is None
    table = format_table(rows, {"compared": False}, 1e-6).splitlines()
    assert table[0].split() == ["metric", "original", "reproduced", "abs", "diff", "within", "1e-06"]
    assert [line.split()[0] for line in table[2:]] == ["test/loss", "val/loss", "val/ppl"]
