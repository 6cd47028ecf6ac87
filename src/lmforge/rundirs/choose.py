"""Which directory a run trains in: the one it resumes, the one rank 0 made (a DDP worker), one the user
named or every rank and attempt of a job shares (Slurm, torchrun), or a new one under ``paths.output_root``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lmforge.distributed import RUN_DIR_VAR, RUN_ID_VAR, is_rank_zero, shared_run_name
from lmforge.errors import LmforgeError
from lmforge.rundirs.checkpoints import load_checkpoint, resume_checkpoint
from lmforge.rundirs.config import saved_config
from lmforge.rundirs.new import config_digest, make_run_dir, new_run_id

log = logging.getLogger(__name__)


def choose_run_dir(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any] | None]:
    """Where the run lives: the dir to resume, the dir rank 0 made (a DDP worker), a named or shared dir
    (``hydra.run.dir``, a Slurm or torchrun job's), or a new one under ``paths.output_root``.

    Returns:
        the config with ``paths.run_dir`` and ``run_id`` set (a saved run's config when the dir holds
        one to continue), and the record of a finished earlier attempt of a shared dir, else None.
    """
    shared_name = shared_run_name()
    named = cfg.paths.get("run_dir")  # hydra.run.dir / hydra.sweep.dir, or paths.run_dir: where the user wants it
    if cfg.get("resume"):
        cfg = resumed_config(cfg.resume, command_line_overrides())
        run_id, run_dir = cfg.run_id, Path(cfg.paths.run_dir)
    elif not is_rank_zero() and os.environ.get(RUN_DIR_VAR) and not shared_name:
        # A DDP worker started by Lightning: join the run dir that rank 0 made.
        run_id, run_dir = os.environ[RUN_ID_VAR], Path(os.environ[RUN_DIR_VAR])
    elif shared_name or named:
        run_id, run_dir = _named_run_dir(cfg, shared_name, named)
        # The dir may hold this run from an earlier attempt (a Slurm requeue, a torchrun restart, the
        # same command run again): continue it rather than write over it.
        if (run_dir / "metrics.json").is_file():
            if not shared_name:
                raise LmforgeError(
                    f"{run_dir} holds a finished run already; name another run dir (hydra.run.dir or "
                    "paths.run_dir), or leave it out for a new dir under paths.output_root."
                )
            log.info("run dir: %s finished in an earlier attempt of this job; not training it again", run_dir)
            return cfg, json.loads((run_dir / "metrics.json").read_text())
        if resume_checkpoint(run_dir) and (run_dir / "config.yaml").is_file():
            earlier = (
                "an earlier attempt of this job started this run"
                if shared_name
                else (f"run dir {run_dir} holds an unfinished run of this command")
            )
            log.info("%s: resuming it", earlier)
            cfg = resumed_config(str(run_dir), [])
            run_id = cfg.run_id
    else:
        run_id, run_dir = make_run_dir(cfg.paths.output_root, cfg.model.name, cfg.task.name)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
        cfg.run_id = run_id
    return cfg, None


def _named_run_dir(cfg: DictConfig, shared_name: str | None, named: str | None) -> tuple[str, Path]:
    """The id and dir of a run whose dir the user named, or that every rank and attempt of a job shares."""
    digest = config_digest(cfg)
    if named:
        run_dir = Path(named).expanduser().resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        return ("-".join(filter(None, (shared_name, digest))) if shared_name else new_run_id()), run_dir
    return make_run_dir(cfg.paths.output_root, cfg.model.name, cfg.task.name, shared_name, digest)


def command_line_overrides() -> list[str]:
    """``key=value`` overrides of the current Hydra job (empty outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def resumed_config(resume: str, overrides: list[str]) -> DictConfig:
    """The saved config of the run dir ``resume``, with dotted overrides such as ``trainer.max_steps=4000``.

    Anything else (a group choice such as ``model=gpt2``, a top-level key such as ``seed=2``) would
    change what the run is; unless it names what the run has already, it is refused in one sentence.
    """
    run_dir = Path(resume).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        raise LmforgeError(f"Cannot resume {run_dir}: it is not a run directory (no config.yaml in it).")
    checkpoint = resume_checkpoint(run_dir)
    if checkpoint is None:
        raise LmforgeError(f"Cannot resume {run_dir}: it has no checkpoints/last.ckpt yet; start a new run instead.")
    load_checkpoint(checkpoint)  # a damaged file fails here, in one sentence
    cfg = saved_config(run_dir)
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if "." in key or key in ("resume", "hydra") or key.startswith("hydra/"):
            continue
        saved = OmegaConf.select(cfg, key)
        saved = saved.get("name") if isinstance(saved, DictConfig) else saved
        if str(saved) != value:
            raise LmforgeError(
                f"Cannot resume {run_dir} with {key}={value}: the run was trained with {key}={saved}; drop "
                f"{key}= to continue it, or start a new run (init_from={run_dir} starts one from its weights)."
            )
    dotted = [o.lstrip("+") for o in overrides if "=" in o and "." in o.split("=", 1)[0]]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))
    cfg.resume = str(run_dir)
    cfg.paths.run_dir = str(run_dir)
    return cfg
