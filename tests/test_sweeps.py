"""Sweeps: the multirun summary, Optuna studies and their best-trial preset, W&B sweep files, DDP jobs."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, run_cli
from lmforge.config_dirs import CONF_DIR, config_choices
from lmforge.experiments.sweeps import SWEEP_JOB_VAR, preset_yaml, search_base, single_job_argv, summary_table
from lmforge.experiments.wandb_sweep import COMMAND, wandb_parameter, wandb_sweep_config

# A few steps of a 1-layer char GPT: enough to validate once and be scored.
TINY_SWEEP = ["experiment=shakespeare-char", "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=2", "task.module.num_samples=0", "model.n_embd=32", "model.n_head=2"]  # fmt: skip


def _job(num, lr, loss, test=None):
    return {"num": num, "overrides": ["task=sst2", f"optimizer.lr={lr}"], "monitor": "val/loss", "mode": "min",
            "objective": loss, "metrics": {"val/loss": loss, **(test or {})}, "wall_time_s": 2.0,
            "run_dir": f"runs/{num}"}  # fmt: skip


def test_summary_table_shows_what_varies_and_the_best_job():
    table = summary_table([_job(0, "0.001", 1.5, {"test/acc": 0.8}), _job(1, "0.00030000000000000003", 1.25)])
    lines = table.splitlines()
    assert lines[0] == "| job | optimizer.lr | val/loss (min) | test/acc | wall time (s) | run dir |"
    assert lines[2] == "| 0 | 0.001 | 1.5 | 0.8 | 2.0 | runs/0 |"  # task=sst2 is the same in every job: no column
    assert lines[3] == "| 1 | 0.0003 | 1.25 |  | 2.0 | runs/1 |"
    assert lines[-1] == "best: job 1 (val/loss = 1.2500), runs/1"


def test_a_ddp_rank_of_a_sweep_job_runs_that_job_alone(monkeypatch):
    argv = ["train.py", "-m", "model=gpt2-tiny,bert-mini", "trainer=ddp", "--config-name", "train",
            'hydra.run.dir="."', "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]  # fmt: skip
    monkeypatch.setenv(SWEEP_JOB_VAR, json.dumps(["model=bert-mini", "trainer=ddp"]))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert single_job_argv(argv) == ["train.py", "--config-name", "train", "model=bert-mini", "trainer=ddp",
                                     'hydra.run.dir="."', "hydra.job.name=train_ddp_process_1",
                                     "hydra.output_subdir=null"]  # fmt: skip
    monkeypatch.setenv("LOCAL_RANK", "0")  # rank 0 is the sweep itself
    assert single_job_argv(argv) == argv
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert single_job_argv(["train.py", "trainer=ddp"]) == ["train.py", "trainer=ddp"]  # not a sweep


def test_hparams_search_configs_compose_with_a_direction_and_sqlite_storage():
    assert config_choices("hparams_search") == ["sst2-optuna", "tinyshakespeare-optuna"]
    expected = {"sst2-optuna": ("maximize", "sst2"), "tinyshakespeare-optuna": ("minimize", "tinyshakespeare")}
    for name, (direction, task) in expected.items():
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"hparams_search={name}"], return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        assert sweeper.direction == direction and cfg.task.name == task
        assert sweeper.storage == f"sqlite:///outputs/optuna/{name}.db"
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.params


def test_preset_from_the_best_params_composes(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    overrides = [*search_base("tinyshakespeare-optuna"), "logger=none", "paths.output_root=/tmp/x",
                 "optimizer.lr=tag(log, interval(1e-4, 3e-3))"]  # fmt: skip
    best = {"optimizer.lr": 0.00123, "model.n_layer": 2, "tokenizer": "word"}
    text = preset_yaml("study", overrides, best, 1.5, conf)
    assert text.startswith("# @package _global_\n")
    (conf / "experiment" / "study-best.yaml").write_text(text)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=study-best"])
    assert cfg.optimizer.lr == 0.00123 and cfg.model.n_layer == 2 and cfg.tokenizer.name == "word"
    assert cfg.model.n_positions == 64  # from experiment=shakespeare-char, the search's base
    assert cfg.trainer.max_steps == 500 and "wandb" not in cfg.logger
    assert cfg.paths.output_root == "outputs"  # where a run goes is not part of the preset


def test_wandb_parameters_follow_optuna_distributions():
    assert wandb_parameter("lr", "tag(log, interval(1e-5, 1e-3))") == {
        "distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3}  # fmt: skip
    assert wandb_parameter("p", "interval(0, 0.3)") == {"distribution": "uniform", "min": 0.0, "max": 0.3}
    assert wandb_parameter("model", "choice(gpt2-tiny, bert-mini)") == {"values": ["gpt2-tiny", "bert-mini"]}
    assert wandb_parameter("n", "range(2, 6)") == {"distribution": "int_uniform", "min": 2, "max": 6}
    assert wandb_parameter("n", "range(2, 8, 2)") == {"values": [2, 4, 6, 8]}
    assert wandb_parameter("steps", "300") == {"value": 300}


@pytest.mark.parametrize("name", ["sst2-optuna", "tinyshakespeare-optuna"])
def test_wandb_sweep_file_and_its_agent_command_line(name):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    config = wandb_sweep_config(name)
    assert config["program"] == "train.py" and config["method"] == "bayes" and config["command"] == COMMAND
    goal = "maximize" if name == "sst2-optuna" else "minimize"
    assert config["metric"] == {"name": "best_val/acc" if goal == "maximize" else "best_val/loss", "goal": goal}
    assert config["parameters"]["optimizer.lr"]["distribution"] == "log_uniform_values"
    # One sample, handed over the way `wandb agent` does it (`${args_no_hyphens}`).
    sample = {}
    for key, spec in config["parameters"].items():
        sample[key] = spec.get("value", spec.get("values", [spec.get("min")])[-1])
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in sample.items()}})["args_no_hyphens"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args)
    assert cfg.optimizer.lr == sample["optimizer.lr"] and cfg.task.data.batch_size == sample["task.data.batch_size"]
    assert cfg.trainer.max_steps == sample["trainer.max_steps"]
    assert cfg.task.name == name.removesuffix("-optuna")
    assert yaml.safe_load(yaml.safe_dump(config)) == config  # plain YAML, as `wandb sweep` reads it


def test_unknown_hparams_search_is_one_sentence_and_exit_1(tmp_path):
    result = run_cli(["-m", "hparams_search=nope", f"paths.output_root={tmp_path}"])
    expected = "error: Unknown hparams_search 'nope'; choose one of: sst2-optuna, tinyshakespeare-optuna."
    assert result.returncode == 1 and result.stderr.strip() == expected
    sweep = subprocess.run([sys.executable, "-c", "from lmforge.cli import sweep; sweep()", "wandb", "nope"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert sweep.returncode == 1 and sweep.stderr.strip() == expected


@pytest.mark.slow
def test_multirun_writes_one_summary_with_a_row_per_job(tmp_path):
    # joblib: the jobs run in worker processes, so the summary can only come from their files.
    result = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY_SWEEP,
                      "optimizer.lr=1e-3,3e-4", f"paths.output_root={tmp_path}"], timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    table = (sweep_dir / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert [row.split(" | ")[:2] for row in rows] == [["| 0", "0.001"], ["| 1", "0.0003"]]
    run_dirs = {json.loads(line)["run_dir"] for line in (tmp_path / "results.jsonl").read_text().splitlines()}
    assert run_dirs == {row.split(" | ")[-1].rstrip(" |") for row in rows}
    assert table in result.stdout


@pytest.mark.slow
def test_optuna_study_continues_in_sqlite_and_writes_a_best_preset(tmp_path):
    import optuna

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)  # the preset is written into conf/experiment
    args = ["-m", "hparams_search=tinyshakespeare-optuna", *TINY_SWEEP, f"paths.output_root={tmp_path}"]
    env = {"LMFORGE_CONF": str(conf)}
    storage = f"sqlite:///{tmp_path}/optuna/tinyshakespeare-optuna.db"
    for n_trials, total in ((2, 2), (1, 3)):
        result = run_cli([*args, f"hydra.sweeper.n_trials={n_trials}"], env=env, timeout=240)
        assert result.returncode == 0, result.stderr[-2000:]
        study = optuna.load_study(study_name="tinyshakespeare-optuna", storage=storage)
        assert len(study.trials) == total  # the second command added to the same study
    sweep_dir = max((tmp_path / "multirun").iterdir())
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == pytest.approx(study.best_value)
    preset = conf / "experiment" / "tinyshakespeare-optuna-best.yaml"
    assert preset.read_text() == (sweep_dir / "best.yaml").read_text()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tinyshakespeare-optuna-best"])
    for key, value in study.best_params.items():
        assert OmegaConf.select(cfg, key) == value
    assert cfg.trainer.max_steps == 2 and cfg.model.n_embd == 32  # the sweep's own overrides came along
    assert "experiment=tinyshakespeare-optuna-best" in result.stdout


@pytest.mark.slow
def test_ddp_multirun_runs_each_job_once_on_two_ranks(tmp_path):
    result = run_cli(["-m", *TINY_SWEEP, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                      "optimizer.lr=1e-3,3e-4", f"paths.output_root={tmp_path}"], timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Launching 2 jobs") == 1  # the ranks Lightning started did not sweep again
    assert result.stdout.count("device: cpu x2") == 2
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len({r["run_dir"] for r in records}) == 2
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    assert (sweep_dir / "summary.md").is_file()


def _postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server programs (initdb, pg_ctl), when they are installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on a Unix socket, with an empty ``optuna`` database; its URL."""
    pytest.importorskip("psycopg2")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("needs PostgreSQL's server programs (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
    # initdb refuses to run as root: the server then runs as the postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", "54329"
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=60)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
        "-o", f"-k {root} -p {port} -c listen_addresses=''", "start")  # fmt: skip
    try:
        run(str(bin_dir / "createdb"), "-h", str(root), "-p", port, "-U", "postgres", "optuna")
        yield f"postgresql://postgres@/optuna?host={root}&port={port}"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_optuna_study_through_postgresql(tmp_path, postgres_url):
    import optuna

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)  # the best preset is written into conf/experiment
    args = ["-m", "hparams_search=tinyshakespeare-optuna", *TINY_SWEEP, "hydra.sweeper.n_trials=2",
            f"hydra.sweeper.storage='{postgres_url}'"]  # fmt: skip
    env = {**os.environ, "LMFORGE_CONF": str(conf)}
    workers = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args, f"paths.output_root={tmp_path / name}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="tinyshakespeare-optuna", storage=postgres_url)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]  # one study, trials from both workers
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for name in ("a", "b"):  # each worker's best preset is the study's best so far when it ended
        best = OmegaConf.load(max((tmp_path / name / "multirun").iterdir()) / "optimization_results.yaml")
        assert best.best_value >= study.best_value
