"""Hydra's conventions for where a run lives: hydra.run.dir, hydra.sweep.dir/subdir, and .hydra/ files."""

import json

import pytest
import yaml
from test_resume import kill_once_checkpointed

from conftest import run_cli

FAST = ["debug=fast", "logger=csv"]


def test_hydra_run_dir_is_the_run_dir_and_a_finished_one_is_not_written_over(tmp_path):
    named = tmp_path / "my-run"
    result = run_cli([*FAST, f"hydra.run.dir={named}", f"paths.output_root={tmp_path / 'out'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("config.yaml", "metrics.json", "tokenizer.json", "checkpoints/last.ckpt", "csv"):
        assert (named / name).exists(), name
    assert yaml.safe_load((named / ".hydra" / "overrides.yaml").read_text()) == [
        *FAST,
        f"paths.output_root={tmp_path / 'out'}",
    ]
    assert yaml.safe_load((named / ".hydra" / "config.yaml").read_text())["model"]["name"] == "gpt2-tiny"
    assert "hydra" in yaml.safe_load((named / ".hydra" / "hydra.yaml").read_text())
    assert not (tmp_path / "out" / "runs").exists()  # nothing in the default layout
    (record,) = (json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines())
    assert record["run_dir"] == str(named)

    before = (named / "metrics.json").read_bytes()
    again = run_cli([*FAST, f"hydra.run.dir={named}"], cwd=tmp_path)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"error: {named} holds a finished run already; name another run dir (hydra.run.dir or paths.run_dir), "
        "or leave it out for a new dir under paths.output_root."
    ]
    assert (named / "metrics.json").read_bytes() == before


def test_a_multirun_with_a_sweep_dir_puts_each_job_in_its_subdir(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=lr${optimizer.lr}", "optimizer.lr=1e-3,2e-3"]
    result = run_cli([*args, f"paths.output_root={tmp_path / 'out'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for job in ("lr0.001", "lr0.002"):
        assert (sweep / job / "metrics.json").is_file() and (sweep / job / ".hydra" / "overrides.yaml").is_file()
        assert json.loads((sweep / job / "metrics.json").read_text())["run_dir"] == str(sweep / job)
    assert not (tmp_path / "out" / "runs").exists()


def test_the_default_layout_stays_and_holds_hydras_files(tmp_path):
    result = run_cli([*FAST, f"paths.output_root={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = tmp_path.glob("runs/*/*")
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / "metrics.json").is_file()


@pytest.mark.slow
def test_a_killed_run_in_a_named_dir_continues_when_its_command_runs_again(tmp_path):
    named = tmp_path / "my-run"
    args = ["experiment=shakespeare-char", "logger=none", "trainer.max_steps=60", "trainer.val_check_interval=60",
            "trainer.limit_val_batches=2", "callbacks.last_checkpoint.every_n_train_steps=10",
            "task.module.num_samples=0", f"hydra.run.dir={named}", f"paths.output_root={tmp_path}"]  # fmt: skip
    kill_once_checkpointed(args, tmp_path, "my-run/checkpoints/last.ckpt")
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "holds an unfinished run of this command: resuming it" in result.stdout
    (record,) = (json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())
    assert record["steps"] == 60 and record["run_dir"] == str(named)
