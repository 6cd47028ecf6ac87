"""Which process is rank 0, and how all ranks of one run agree on its run directory.

Three ways to start several ranks, three ways to share the run dir:
- Lightning's own launcher (``trainer=ddp`` on one machine) starts the other ranks as copies of
  the command: they inherit ``LMFORGE_RUN_DIR``/``LMFORGE_RUN_ID`` from rank 0.
- ``torchrun`` starts every rank itself: they share ``TORCHELASTIC_RUN_ID``.
- SLURM (srun, or the submitit launcher) starts every task itself: they share ``SLURM_JOB_ID``.

A Slurm batch job (sbatch, submitit) names its run dirs after the job too, even with one task: when
Slurm requeues the job (preemption, a time limit, ``scontrol requeue``) it runs the same command again,
with the same job id, and each run finds its own dir to resume from (see ``training.run_training``).

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


def shared_run_name() -> str | None:
    """A name every rank of a torchrun or SLURM job computes alike, and a requeued SLURM job again; None otherwise."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID'][:12]}"
    if os.environ.get("SLURM_JOB_ID") and (int(os.environ.get("SLURM_NTASKS", 1)) > 1 or in_slurm_batch_job()):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return None
