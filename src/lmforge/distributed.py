"""Which process is rank 0, and how all ranks of one run agree on its run directory.

Three ways to start several ranks, three ways to share the run dir:
- Lightning's own launcher (``trainer=ddp`` on one machine) starts the other ranks as copies of
  the command: they inherit ``LMFORGE_RUN_DIR``/``LMFORGE_RUN_ID`` from rank 0.
- ``torchrun`` starts every rank itself: they share ``TORCHELASTIC_RUN_ID`` (``--rdzv_id``) or,
  when it was not given (a multi-node launch with ``--master_addr``), a name that the first rank
  to ask writes into torchrun's own key-value store.
- SLURM (srun, or the submitit launcher) starts every task itself: they share ``SLURM_JOB_ID``.

A Slurm batch job (sbatch, submitit) names its run dirs after the job too, even with one task: when
Slurm requeues the job (preemption, a time limit, ``scontrol requeue``) it runs the same command again,
with the same job id, and each run finds its own dir to resume from (see ``training.run_training``).
torchrun does the same when it restarts a failed job's workers (``--max_restarts``).

``LMFORGE_COMMAND`` carries the user's command line to every process of a run, including sweep
jobs that submitit runs on other machines, whose own ``sys.argv`` is submitit's.
"""

from __future__ import annotations

import os

RUN_DIR_VAR, RUN_ID_VAR, COMMAND_VAR = "LMFORGE_RUN_DIR", "LMFORGE_RUN_ID", "LMFORGE_COMMAND"


def global_rank() -> int:
    """This process's rank from the launcher's environment (0 when not distributed)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var):
            return int(os.environ[var]) + (int(os.environ.get("NODE_RANK", 0)) if var == "LOCAL_RANK" else 0)
    return 0


def is_rank_zero() -> bool:
    """True in the process that owns the run: it writes the run dir, logs and results."""
    return global_rank() == 0


def in_slurm_batch_job() -> bool:
    """True inside an sbatch or submitit job, which Slurm may requeue; False in salloc or a bare srun."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("ENVIRONMENT") == "BATCH"


def slurm_restarts() -> int:
    """How many times Slurm has requeued this batch job (0 on its first attempt, and outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) if in_slurm_batch_job() else 0


def torchrun_restart_caveat() -> str | None:
    """Why torchrun's restarts of failed workers would not resume this job, or None when they would."""
    if not int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0):
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Workers share the rendezvous' store, which keeps the keys of the attempt that failed (pytorch#135712).
        return (
            "torchrun would restart failed workers (--max_restarts), but they would read the failed ones' addresses "
            "from torchrun's shared store and fail to connect; start it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(on several nodes also --rdzv_backend=c10d --rdzv_id=<job id>)."
        )
    if os.environ.get("TORCHELASTIC_RUN_ID") == "none":
        return (
            "torchrun would restart failed workers (--max_restarts), but without --rdzv_id they would start "
            "the run afresh in a new run dir; give torchrun --rdzv_id=<job id>."
        )
    return None


def shared_run_name() -> str | None:
    """A name every rank of a torchrun or SLURM job computes alike, and the job again after a
    Slurm requeue or a torchrun restart; None for a run that has the machine to itself."""
    if os.environ.get("SLURM_JOB_ID") and (int(os.environ.get("SLURM_NTASKS", 1)) > 1 or in_slurm_batch_job()):
        # Before torchrun's id: a requeued job keeps its job id, while `--standalone` draws a new id.
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    if os.environ["TORCHELASTIC_RUN_ID"] != "none":
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID'][:12]}"
    launch_id = _launch_id_from_torchrun_store()
    return f"torchrun-{launch_id}" if launch_id else None


def _launch_id_from_torchrun_store() -> str | None:
    """A random id that all ranks of this torchrun launch read alike: the first to ask stores it in
    the agents' key-value store (at ``MASTER_ADDR:MASTER_PORT``), which outlives worker restarts."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import secrets
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=60)
    )
    # compare_set writes only where the key is still missing, and returns what the key then holds.
    return store.compare_set("lmforge/launch_id", "", secrets.token_hex(4)).decode()
