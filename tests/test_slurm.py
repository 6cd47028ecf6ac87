"""Sweeps and DDP on a real Slurm cluster: a throwaway one-node cluster (munge, slurmctld, slurmd).

Skipped where Slurm's daemons are missing (Debian: apt-get install slurmd slurmctld slurm-client
munge) or the tests do not run as root (slurmd, which starts every job step, runs as root here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_sweeps import TINY_SWEEP

from conftest import REPO, run_cli

# What the fixture and submitit call: the daemons, and the client programs.
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, host: str, cpus: int) -> str:
    """One node with every core, one partition, no accounting, no cgroups."""
    return f"""\
ClusterName=lmforge-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm_cluster():
    """Start munge and a one-node Slurm cluster; yield the environment that talks to it."""
    # Debian puts the daemons in /usr/sbin, which a non-login PATH may lack.
    path = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin") for name in PROGRAMS}
    missing = [name for name, found in path.items() if not found]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs Slurm's programs and root (missing: {', '.join(missing) or 'root'})")
    root = Path(tempfile.mkdtemp(prefix="lmforge-slurm-"))
    (root / "state").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    start = lambda *args: subprocess.run(args, check=True, capture_output=True, env=env, timeout=30)  # noqa: E731
    try:
        try:
            start(path["munged"], "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
                  f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed")  # fmt: skip
            start(path["slurmctld"], "-f", str(conf))
            start(path["slurmd"], "-f", str(conf))
        except subprocess.CalledProcessError as err:  # this machine cannot host the daemons (a sandbox, no root)
            pytest.skip(f"Slurm's daemons did not start: {err.stderr.decode(errors='replace').strip()[-300:]}")
        deadline = time.monotonic() + 30
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout:
            if time.monotonic() > deadline:
                pytest.fail("the Slurm node never became idle:\n" + (root / "slurmctld.log").read_text()[-2000:])
            time.sleep(0.5)
        yield {"SLURM_CONF": str(conf), "OMP_NUM_THREADS": "1"}
    finally:
        # Jobs end a moment after submitit has read their results: let their steps finish first.
        subprocess.run(["scancel", "--quiet", "--partition=test"], env=env, timeout=30)
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env).stdout.strip()
        ):
            time.sleep(0.5)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            pid = root / pid_file
            if pid.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid.read_text()), signal.SIGTERM)
        time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)


# What each sweep job asks Slurm for: this one-node cluster has no GPUs and little memory.
ON_THE_TEST_CLUSTER = ["hydra/launcher=slurm", "hydra.launcher.partition=test", "hydra.launcher.gpus_per_node=0",
                       "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]  # fmt: skip


def _records(output_root: Path) -> list[dict]:
    return [json.loads(line) for line in (output_root / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_sweep_runs_as_slurm_jobs(tmp_path, slurm_cluster):
    result = run_cli(["-m", *ON_THE_TEST_CLUSTER, *TINY_SWEEP, "optimizer.lr=1e-3,3e-4",
                      f"paths.output_root={tmp_path}"], env=slurm_cluster, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(tmp_path)
    lrs = sorted(float(o.split("=")[1]) for r in records for o in r["overrides"] if o.startswith("optimizer.lr="))
    assert lrs == [3e-4, 1e-3]
    assert len({r["run_dir"] for r in records}) == 2 and all(r["steps"] == 2 for r in records)
    # Each job ran in its own Slurm allocation, and its record names the user's command, not submitit's.
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    assert len(list((sweep_dir / ".submitit").glob("*_*/*_result.pkl"))) == 2  # one array task per job
    assert all(" -m " in r["command"] and "train.py" in r["command"] for r in records)
    assert "| job |" in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_ddp_over_two_slurm_tasks_makes_one_run(tmp_path, slurm_cluster):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores for two tasks")
    result = run_cli(["-m", *ON_THE_TEST_CLUSTER, "hydra.launcher.tasks_per_node=2", *TINY_SWEEP, "trainer=ddp",
                      "trainer.devices=2", "trainer.accelerator=cpu", f"paths.output_root={tmp_path}"],
                     env=slurm_cluster, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = _records(tmp_path)  # both tasks trained; rank 0 alone wrote
    assert record["world_size"] == 2 and record["steps"] == 2
    (run_dir,) = (tmp_path / "runs").iterdir()  # the tasks agreed on one run dir, named after the job
    assert run_dir.name == Path(record["run_dir"]).name and run_dir.name.startswith("slurm-")
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    task_logs = sorted((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(task_logs) == 2  # one per Slurm task: ranks 0 and 1
    assert any("global_rank=1(2)" in log.read_text() for log in task_logs)


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_its_run(tmp_path, slurm_cluster):
    # Long enough that the requeue lands mid-run: a checkpoint every 20 steps, 600 steps in all.
    longer = [o for o in TINY_SWEEP if not o.startswith(("trainer.max_steps=", "trainer.val_check_interval="))]
    args = ["-m", *ON_THE_TEST_CLUSTER, *longer, "trainer.max_steps=600", "trainer.val_check_interval=600",
            "callbacks.last_checkpoint.every_n_train_steps=20", f"paths.output_root={tmp_path}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **slurm_cluster}
    sweep = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    slurm = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30).stdout.strip()  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("runs/*/checkpoints/last.ckpt")):
            assert time.monotonic() < deadline and sweep.poll() is None, "the job never wrote a checkpoint"
            time.sleep(0.2)
        job = slurm("squeue", "-h", "-o", "%i")
        slurm("scontrol", "requeue", job)  # what preemption does: the job is killed and queued again
        while slurm("squeue", "-h", "-j", job, "-o", "%T") != "PENDING":
            assert time.monotonic() < deadline, "the requeued job never went back to the queue"
            time.sleep(0.2)
        slurm("scontrol", "update", f"JobId={job}", "StartTime=now")  # else Slurm holds it back two minutes
        _, stderr = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, stderr[-3000:]
    (record,) = _records(tmp_path)  # the killed attempt left no record; the resumed one finished the run
    assert record["steps"] == 600 and record["requeues"] == 1 and record["slurm_job_id"] == job
    (run_dir,) = (tmp_path / "runs").iterdir()  # the second attempt found the first one's dir
    assert (run_dir / "csv" / "metrics.part1.csv").is_file()  # and continued its run, not a new one
    (task_log,) = (tmp_path / "multirun").glob("*/.submitit/*/*_log.out")
    assert "an earlier attempt of this job started this run: resuming it" in task_log.read_text()
