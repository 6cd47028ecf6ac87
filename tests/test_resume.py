"""A stopped or killed run continues where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, SimulatedCrash, crashed_run, free_port, requires_data, run_cli, torchrun_nodes
from lmforge.errors import LmforgeError
from lmforge.training import run_training

SPLIT = [*TINY, "trainer.max_steps=8", "trainer.val_check_interval=4", "model.dropout=0.1"]


# The same, for classification: a GRU on SST-2 (dropout on, so the random state must be restored too).
SPLIT_CLASSIFICATION = ["model=gru", "task=sst2", "model.hidden_size=16", "model.embedding_size=16", "logger=none",
                        "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
                        "trainer.log_every_n_steps=1", "test_after_fit=false"]  # fmt: skip

# And for seq2seq: a Transformer on Multi30k, with bucketed batches and dropout.
SPLIT_SEQ2SEQ = ["model=transformer", "task=multi30k", "model.n_layer=1", "model.n_decoder_layer=1", "model.d_model=32",
                 "model.d_ff=64", "model.n_head=2", "task.data.batch_size=16", "logger=none", "trainer.max_steps=8",
                 "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
                 "task.module.val_generate_limit=4", "task.module.max_new_tokens=4", "test_after_fit=false"]  # fmt: skip


@pytest.mark.parametrize(
    "split",
    [SPLIT, pytest.param(SPLIT_CLASSIFICATION, marks=requires_data), pytest.param(SPLIT_SEQ2SEQ, marks=requires_data)],
    ids=["language-model", "classifier", "seq2seq"],
)
def test_crash_then_resume_ends_where_an_uninterrupted_run_ends(cfg_factory, split):
    straight = run_training(cfg_factory(split))
    run_dir = crashed_run(cfg_factory, split)
    assert torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    resumed = run_training(cfg_factory([f"resume={run_dir}"]))
    assert resumed["run_dir"] == run_dir and resumed["steps"] == 8
    for key in ("train/loss", "val/loss"):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], abs=1e-5), key
    # The final checkpoint loads with weights_only=True and holds the generator states.
    ckpt = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8 and "rng_state" in ckpt
    assert (Path(run_dir) / "csv" / "metrics.part1.csv").is_file()  # the first part's metrics are kept


def test_resume_of_something_that_is_not_a_run_dir_is_one_sentence(cfg_factory, tmp_path):
    with pytest.raises(LmforgeError, match="not a run directory"):
        run_training(cfg_factory([f"resume={tmp_path}"]))
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"\x00" * 100)  # a save cut short
    with pytest.raises(LmforgeError, match="cannot be read"):
        run_training(cfg_factory([f"resume={tmp_path}"]))


def kill_once_checkpointed(args: list[str], root: Path, checkpoint: str, env: dict[str, str] | None = None) -> None:
    """Start ``train.py <args>`` and SIGKILL it as soon as a file under ``root`` matches the glob ``checkpoint``."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not list(root.glob(checkpoint)) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_end_with_one_results_line(tmp_path):
    args = ["experiment=shakespeare-char", "logger=none", "trainer.max_steps=120", "trainer.val_check_interval=60",
            "trainer.limit_val_batches=2", "callbacks.last_checkpoint.every_n_train_steps=10",
            f"paths.output_root={tmp_path}"]  # fmt: skip
    kill_once_checkpointed(args, tmp_path, "runs/*/*/checkpoints/last.ckpt")
    run_dir = next(tmp_path.glob("runs/*/*"))
    assert not (tmp_path / "results.jsonl").exists()

    result = run_cli([f"resume={run_dir}", f"paths.output_root={tmp_path}"])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 120
    assert json.loads(lines[0])["run_dir"] == str(run_dir)


def test_a_requeued_slurm_job_resumes_its_run_and_skips_the_finished_one(cfg_factory, monkeypatch):
    # What an sbatch job sees; Slurm adds SLURM_RESTART_COUNT when it runs the job again after a requeue.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("ENVIRONMENT", "BATCH")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = [*SPLIT, "callbacks.last_checkpoint.every_n_train_steps=2", "+callbacks.crash._target_=conftest.CrashAtStep",
           "+callbacks.crash.step=5"]  # fmt: skip
    with pytest.raises(SimulatedCrash):  # preempted after the checkpoint of step 4
        run_training(cfg_factory(job))
    (run_dir,) = (Path(cfg_factory(job).paths.output_root) / "runs").iterdir()
    assert run_dir.name.startswith("slurm-4242-")

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    resumed = run_training(cfg_factory(job))
    assert resumed["run_dir"] == str(run_dir) and resumed["steps"] == 8
    assert (run_dir / "csv" / "metrics.part1.csv").is_file()  # it continued the run, it did not start over

    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeued once more, after the run had finished
    again = run_training(cfg_factory(job))
    assert again == json.loads((run_dir / "metrics.json").read_text())
    monkeypatch.delenv("SLURM_RESTART_COUNT")  # the same command a second time in the batch script
    assert run_training(cfg_factory(job)) == again  # nothing written over
    results = Path(cfg_factory(job).paths.results_file).read_text().splitlines()
    assert len(results) == 1  # trained once, recorded once

    # Another run of the same job (a loop in the batch script, the next stage) has a dir of its own.
    other = run_training(cfg_factory([*SPLIT, "trainer.max_steps=2", "trainer.val_check_interval=2"]))
    assert other["steps"] == 2 and Path(other["run_dir"]).name.startswith("slurm-4242-")
    assert other["run_dir"] != str(run_dir)


TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize(
    ("env", "shared"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "ENVIRONMENT": "BATCH"}, "slurm-7"),  # sbatch, submitit
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # salloc: an interactive shell is not requeued
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "slurm-7"),  # srun's tasks must agree on one dir
        ({"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc"}, "torchrun-abc"),
        ({"WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "abc"}, "torchrun-abc"),  # one worker, which torchrun may restart
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "ENVIRONMENT": "BATCH", "TORCHELASTIC_RUN_ID": "abc"}, "slurm-7"),
        ({"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}, None),  # no --rdzv_id and no agent store to agree through
    ],
    ids=["alone", "slurm-batch", "salloc", "srun-tasks", "torchrun", "torchrun-1", "torchrun-in-sbatch", "no-rdzv-id"],
)
def test_which_runs_share_a_dir_name(monkeypatch, env, shared):
    from lmforge.distributed import shared_run_name

    for var in (*TORCHRUN_VARS, "SLURM_JOB_ID", "SLURM_NTASKS", "ENVIRONMENT", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert shared_run_name() == shared


def test_torchrun_ranks_without_an_rdzv_id_agree_on_a_name_through_its_store(monkeypatch):
    from torch.distributed import TCPStore

    from lmforge.distributed import shared_run_name

    names = []
    for _launch in range(2):
        agent_store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # what torchrun's agent hosts
        env = {"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(agent_store.port)}  # fmt: skip
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        ranks = {shared_run_name() for _rank in range(3)}  # each call asks as a rank of its own would
        assert len(ranks) == 1
        names.append(ranks.pop())
        del agent_store
    assert all(name.startswith("torchrun-") and len(name) == len("torchrun-") + 8 for name in names)
    assert names[0] != names[1]  # another launch, another name


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux)."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{pid}\n" in status.read_text():
                children.append(int(status.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return children


@pytest.mark.slow
def test_a_node_whose_worker_dies_under_torchrun_max_restarts_resumes_the_run(tmp_path):
    """Two torchrun agents (two nodes, c10d rendezvous); a worker of the second dies mid-run. torchrun
    restarts the workers of both nodes, and they resume from the run's checkpoint, in its run dir."""
    args = ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1", "trainer.accelerator=cpu",
            "experiment=shakespeare-char", "logger=none", "trainer.max_steps=200", "trainer.val_check_interval=100",
            "trainer.limit_val_batches=2", "task.module.num_samples=0", "model.n_layer=1", "model.n_embd=32",
            "model.n_head=2", "callbacks.last_checkpoint.every_n_train_steps=10", f"paths.output_root={tmp_path}"]  # fmt: skip
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--max_restarts=1", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=job7"]  # fmt: skip
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # else restarted workers cannot connect (pytorch#135712)
    with torchrun_nodes([rendezvous, rendezvous], args, env) as nodes:
        deadline = time.time() + 240
        while not list(tmp_path.glob("runs/*/checkpoints/last.ckpt")) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(child_processes(nodes[1].pid)[0], signal.SIGKILL)
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "an earlier attempt of this job started this run: resuming it" in "".join(outputs)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("torchrun-job7-")
    (record,) = (json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())
    assert (record["steps"], record["world_size"], record["run_dir"]) == (200, 2, str(run_dir))
    assert "(resuming from checkpoints/last.ckpt)" in (run_dir / "train.log").read_text()


def test_resume_takes_the_newest_of_last_and_lightnings_slurm_checkpoint(tmp_path):
    from lmforge.training import resume_checkpoint

    assert resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last, signalled = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"")
    assert resume_checkpoint(tmp_path) == last
    signalled.write_bytes(b"")  # saved by Lightning on Slurm's USR1 warning, after the last periodic save
    os.utime(last, (time.time() - 60, time.time() - 60))
    assert resume_checkpoint(tmp_path) == signalled
    os.utime(signalled, (time.time() - 120, time.time() - 120))  # the run went on and saved again
    assert resume_checkpoint(tmp_path) == last


@requires_data
@pytest.mark.slow
def test_a_requeued_two_stage_job_skips_the_finished_stage_and_resumes_the_other(tmp_path):
    # An sbatch job that runs both stages; Slurm kills it during the second and runs it again.
    batch_job = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1", "ENVIRONMENT": "BATCH", "SLURM_RESTART_COUNT": None}
    args = ["experiment=sst2-pretrain-finetune", "model=bert-tiny", "task.data.batch_size=8", "trainer.max_steps=60",
            "trainer.val_check_interval=60", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
            "callbacks.last_checkpoint.every_n_train_steps=5", "logger=none", f"paths.output_root={tmp_path}"]  # fmt: skip
    env = {k: v for k, v in {**os.environ, **batch_job}.items() if v is not None}
    kill_once_checkpointed(args, tmp_path, "runs/slurm-77-bert-tiny-sst2-*/checkpoints/last.ckpt", env)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1  # the first stage had finished

    result = run_cli(args, env={**batch_job, "SLURM_RESTART_COUNT": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "finished in an earlier attempt of this job" in output  # the first stage is not trained again
    assert "an earlier attempt of this job started this run: resuming it" in output
    pretrain, finetune = (json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())
    assert (pretrain["task"], pretrain["requeues"]) == ("mlm", 0)
    assert (finetune["task"], finetune["steps"], finetune["requeues"]) == ("sst2", 60, 1)
    assert "(resuming from checkpoints/last.ckpt)" in (Path(finetune["run_dir"]) / "train.log").read_text()
    assert len(list((tmp_path / "runs").iterdir())) == 2  # the same two run dirs, no new ones


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_to_where_an_uninterrupted_one_ends(tmp_path):
    # Two gloo ranks; the kill lands early in the first epoch, so the resumed ranks must skip part of it.
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "experiment=shakespeare-char", "logger=none",
           "trainer.max_steps=60", "trainer.val_check_interval=60", "trainer.limit_val_batches=2",
           "task.module.num_samples=0", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
           "callbacks.last_checkpoint.every_n_train_steps=10"]  # fmt: skip
    straight = run_cli([*ddp, f"paths.output_root={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    kill_once_checkpointed(
        [*ddp, f"paths.output_root={tmp_path / 'killed'}"], tmp_path, "killed/runs/*/*/checkpoints/last.ckpt"
    )
    run_dir = next(tmp_path.glob("killed/runs/*/*"))

    resumed = run_cli([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (expected,) = (json.loads(line) for line in (tmp_path / "straight" / "results.jsonl").read_text().splitlines())
    (record,) = (json.loads(line) for line in (tmp_path / "killed" / "results.jsonl").read_text().splitlines())
    assert record["steps"] == 60 and record["world_size"] == 2
    for key in ("train/loss", "val/loss"):
        assert record["metrics"][key] == pytest.approx(expected["metrics"][key], abs=1e-4), key
