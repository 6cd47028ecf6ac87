"""New run directories: their names (date, time, model, task, id) and the files Hydra keeps of a run."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf


def make_run_dir(
    output_root: str | Path, model: str, task: str, shared_name: str | None = None, config_digest: str = ""
) -> tuple[str, Path]:
    """Create a new, unique run directory ``<root>/runs/<date>/<time>-<model>-<task>-<random>``.

    Args:
        shared_name: set when every rank of a job calls this (torchrun, SLURM): the run dir is
            then ``<root>/runs/<shared_name>-<model>-<task>-<config_digest>``, the same for all of
            them, and for the same job when it runs again (a Slurm requeue, a torchrun restart).
        config_digest: :func:`config_digest` of the run's config; it tells apart the runs of one job
            (stages, sweep points, a loop in a batch script).
    Returns:
        (run id, run directory). The random suffix keeps two runs started in the
        same second apart.
    """
    if shared_name:
        run_dir = (
            Path(output_root).resolve() / "runs" / "-".join(filter(None, (shared_name, model, task, config_digest)))
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        return "-".join(filter(None, (shared_name, config_digest))), run_dir
    now = datetime.now()
    while True:
        run_id = new_run_id(now)
        run_dir = (
            Path(output_root).resolve() / "runs" / f"{now:%Y-%m-%d}" / f"{now:%H-%M-%S}-{model}-{task}-{run_id[-6:]}"
        )
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_id, run_dir
        except FileExistsError:
            continue


def new_run_id(now: datetime | None = None) -> str:
    """A fresh run id (also the W&B run id): ``<date>-<time>-<6 random hex digits>``."""
    return f"{now or datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def hydra_output_dir() -> Path | None:
    """The run dir a user named through Hydra: ``hydra.run.dir`` (anything but lmforge's default ``.``),
    or in a multirun ``hydra.sweep.dir``/``hydra.sweep.subdir`` when either is overridden; else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        named = any(o.startswith(("hydra.sweep.dir=", "hydra.sweep.subdir=")) for o in hydra.overrides.hydra)
    else:
        named = str(hydra.run.dir) not in (".", "")
    return Path(hydra.runtime.output_dir) if named else None


def save_hydra_files(cfg, run_dir: Path) -> None:
    """Hydra's own record of the job in ``<run dir>/.hydra/`` (config.yaml as composed, overrides.yaml,
    hydra.yaml), as Hydra writes it into the output dirs it makes itself; kept from a run's first attempt."""
    from hydra.core.hydra_config import HydraConfig

    out = run_dir / ".hydra"
    if not HydraConfig.initialized() or out.exists():
        return
    hydra = HydraConfig.get()
    out.mkdir()
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra.overrides.task)), out / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra}), out / "hydra.yaml")


def config_digest(cfg) -> str:
    """Six hex digits that name a config as composed, before anything is resolved: the same in every
    rank of a job and in a requeued job, different when one override differs."""
    return hashlib.sha1(OmegaConf.to_yaml(cfg, resolve=False).encode()).hexdigest()[:6]
