"""Sweeps over ``train``: the objective a job returns, the sweep's summary table, the best Optuna
trial as an experiment preset, and DDP ranks that run their own sweep job only.

    python train.py -m model=gpt2-tiny,bert-mini task=sst2 optimizer.lr=1e-4,3e-4
    python train.py -m hparams_search=sst2-optuna
    lmforge-sweep wandb sst2-optuna          # the same search space as a W&B sweep (wandb_sweep.py)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmforge.distributed import is_rank_zero

log = logging.getLogger("lmforge")

JOB_FILE = "job.json"
SUMMARY_FILE = "summary.md"
# Rank 0 of a multirun job puts the job's overrides here for the DDP ranks Lightning starts.
SWEEP_JOB_VAR = "LMFORGE_SWEEP_JOB"
# What Lightning's DDP launcher appends to the command it restarts (lightning_fabric's _hydra_subprocess_cmd).
_LIGHTNING_APPENDED = ("hydra.run.dir=", "hydra.job.name=", "hydra.output_subdir=")
# What Lightning's DDP launcher sets in rank 0's environment; each sweep job starts without it.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_env_before_job: dict[str, str | None] = {}


def monitored(cfg: DictConfig) -> tuple[str, str]:
    """The metric a run is judged by and its direction, as the best checkpoint sees them: (``val/acc``, ``max``)."""
    monitor = OmegaConf.select(cfg, "callbacks.model_checkpoint.monitor") or cfg.task.get("monitor") or "val/loss"
    mode = OmegaConf.select(cfg, "callbacks.model_checkpoint.mode") or cfg.task.get("monitor_mode") or "min"
    return str(monitor), str(mode)


def objective(metrics: dict[str, float], monitor: str) -> float:
    """The value a sweeper optimizes: the best validation value of ``monitor`` (its last value without
    a checkpoint), NaN when the run never validated (Optuna then records the trial as failed)."""
    value = metrics.get(f"best_{monitor}", metrics.get(monitor))
    if value is None:
        log.warning("the run has no %s to optimize: validate at least once (trainer.val_check_interval).", monitor)
        return math.nan
    return float(value)


def _multirun_job() -> Any | None:
    """Hydra's config of the current multirun job, None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


def start_job(cfg: DictConfig) -> None:
    """Get a train job ready for its sweep: tell DDP ranks which job this is; say when ``hparams_search`` lacks ``-m``."""
    job = _multirun_job()
    if job is not None and is_rank_zero():
        os.environ[SWEEP_JOB_VAR] = json.dumps(list(job.overrides.task))
        _env_before_job.update({k: os.environ.get(k) for k in _DDP_ENV})
    from hydra.core.hydra_config import HydraConfig

    searching = HydraConfig.initialized() and HydraConfig.get().runtime.choices.get("hparams_search")
    if job is None and searching and is_rank_zero():
        from lmforge.console import setup_console

        setup_console()  # the run's own console format, not Hydra's
        log.warning("hparams_search only sets up a sweep: add -m to run it (this is one run with its base settings).")


def finish_job(cfg: DictConfig, records: list[dict[str, Any]]) -> float:
    """End a train job: in a multirun, write ``job.json`` (what the summary reads) into the job's sweep subdir.

    Args:
        cfg: the job's config.
        records: the results records of its runs (several for an experiment with stages).
    Returns:
        the objective (see :func:`objective`) of the last run, for the sweeper.
    """
    os.environ.pop(SWEEP_JOB_VAR, None)
    monitor, mode = monitored(cfg)
    last = records[-1]
    value = objective(last["metrics"], monitor)
    job = _multirun_job()
    if job is not None and is_rank_zero():
        _end_distributed()
        summary = {
            "num": job.job.num,
            "overrides": list(job.overrides.task),
            "monitor": monitor,
            "mode": mode,
            "objective": None if math.isnan(value) else value,
            "metrics": last["metrics"],
            "wall_time_s": round(sum(r["wall_time_s"] for r in records), 2),
            "run_dir": last["run_dir"],
        }
        out = Path(job.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return value


def _end_distributed() -> None:
    """Close this job's DDP process group and launcher environment, whose other ranks have exited:
    the next job would otherwise reuse both and wait on ranks that are gone."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in _env_before_job.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _env_before_job.clear()


def single_job_argv(argv: list[str]) -> list[str]:
    """The command line a DDP rank > 0 should run: its own sweep job, not the whole sweep again.

    Lightning starts ranks 1.. as copies of ``sys.argv`` with ``LOCAL_RANK`` set; under ``-m``
    that copy would start the sweep from its first job. Rank 0 exports the job's overrides
    (:func:`start_job`), which replace the sweep's here; Lightning's own additions stay.
    """
    job = os.environ.get(SWEEP_JOB_VAR)
    if not job or is_rank_zero() or not {"-m", "--multirun"} & set(argv[1:]):
        return argv
    appended = [a for a in argv[1:] if a.startswith(_LIGHTNING_APPENDED)]
    options: list[str] = []
    args = iter(argv[1:])
    for arg in args:  # keep Hydra's own options (--config-name x, -cd x), drop -m and the overrides
        if arg in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"):
            options += [arg, next(args, "")]
        elif arg.startswith("--config-") or (arg.startswith("-") and arg not in ("-m", "--multirun")):
            options.append(arg)
    return [argv[0], *options, *json.loads(job), *appended]


def read_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The ``job.json`` of every finished job of a sweep, in job order."""
    jobs = [json.loads(p.read_text(encoding="utf-8")) for p in Path(sweep_dir).glob(f"*/{JOB_FILE}")]
    return sorted(jobs, key=lambda j: j["num"])


def _override_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in overrides)


def _short(override_value: str | None) -> str | None:
    """An override value for the table: Optuna's floats come with 17 digits."""
    try:
        number = float(override_value)
    except (TypeError, ValueError):
        return override_value
    return f"{number:.4g}" if "." in override_value or "e" in override_value.lower() else override_value


def summary_table(jobs: list[dict[str, Any]]) -> str:
    """A markdown table of a sweep's jobs: the overrides that vary, the objective, test metrics, wall time, run dir."""
    if not jobs:
        return ""
    per_job = [_override_dict(j["overrides"]) for j in jobs]
    keys = list(dict.fromkeys(k for o in per_job for k in o))
    varying = [k for k in keys if len({o.get(k) for o in per_job}) > 1]
    tests = sorted({k for j in jobs for k in j["metrics"] if k.startswith("test/")})
    monitor, mode = jobs[0]["monitor"], jobs[0]["mode"]
    header = ["job", *varying, f"{monitor} ({mode})", *tests, "wall time (s)", "run dir"]

    def cell(value: Any) -> str:
        if value is None:
            return ""
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    rows = [
        [
            j["num"],
            *(_short(o.get(k)) for k in varying),
            j["objective"],
            *(j["metrics"].get(t) for t in tests),
            f"{j['wall_time_s']:.1f}",
            j["run_dir"],
        ]  # fmt: skip
        for j, o in zip(jobs, per_job)
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    scored = [j for j in jobs if j["objective"] is not None]
    if scored:
        best = (max if mode == "max" else min)(scored, key=lambda j: j["objective"])
        lines += ["", f"best: job {best['num']} ({monitor} = {best['objective']:.4f}), {best['run_dir']}"]
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """After a multirun, write ``summary.md`` (one row per job) into the sweep dir and show it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Collect the jobs' ``job.json`` files into the summary table."""
        sweep_dir = Path(config.hydra.sweep.dir)
        table = summary_table(read_jobs(sweep_dir))
        if not table:
            return
        (sweep_dir / SUMMARY_FILE).write_text(table, encoding="utf-8")
        # print: Hydra has set no console handler for lmforge's logger outside a job.
        print(f"\nsweep summary ({sweep_dir / SUMMARY_FILE}):\n\n{table}", flush=True)


def sqlite_path(storage: str | None) -> Path | None:
    """The database file of an SQLite storage URL (``sqlite:///outputs/optuna/x.db``), None for other storages."""
    if not storage or not str(storage).startswith("sqlite:///"):
        return None
    path = str(storage).removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


def create_study_tables(storage: str, attempts: int = 8) -> None:
    """Create Optuna's tables in a database server, trying again when another worker creates them too.

    Workers started together on an empty database otherwise race inside the sweeper: each checks that
    the tables are missing, and all but one then fail on a duplicate key.
    """
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            optuna.storages.RDBStorage(storage)
            return
        except (IntegrityError, ProgrammingError):  # another worker created them meanwhile
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))


class OptunaStudy(Callback):
    """Around an Optuna sweep: make the SQLite database's folder, or a server database's tables, first;
    afterwards write the study's best trial as an experiment preset
    (``conf/experiment/<study>-best.yaml``, and ``best.yaml`` in the sweep dir).

    Args:
        preset_dir: where the preset goes; None: this checkout's ``conf/experiment``.
    """

    def __init__(self, preset_dir: str | None = None) -> None:
        self.preset_dir = preset_dir

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """SQLite creates the database file but not its folder; a server's tables are made here, once."""
        storage = OmegaConf.select(config, "hydra.sweeper.storage")
        path = sqlite_path(storage)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif storage:
            create_study_tables(str(storage))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the preset from the sweeper's ``optimization_results.yaml`` (best over the whole study):
        into ``preset_dir``, else the first of the user's config dirs (``LMFORGE_CONF``), else lmforge's own."""
        from lmforge.config_dirs import CONF_DIR, env_config_dirs

        sweep_dir = Path(config.hydra.sweep.dir)
        results = sweep_dir / "optimization_results.yaml"
        if not results.is_file():
            return
        best = OmegaConf.load(results)
        if "best_params" not in best:  # several objectives: a Pareto front, no single best
            return
        study = OmegaConf.select(config, "hydra.sweeper.study_name") or "optuna"
        search = config.hydra.runtime.choices.get("hparams_search")
        overrides = [*(search_base(search) if search else []), *config.hydra.overrides.task]
        text = preset_yaml(study, overrides, OmegaConf.to_container(best.best_params), best.best_value, CONF_DIR)
        (sweep_dir / "best.yaml").write_text(text, encoding="utf-8")
        preset_dir = Path(self.preset_dir) if self.preset_dir else [*env_config_dirs(), CONF_DIR][0] / "experiment"
        preset_dir.mkdir(parents=True, exist_ok=True)
        (preset_dir / f"{study}-best.yaml").write_text(text, encoding="utf-8")
        print(f"best trial of study {study}: {best.best_value} with {dict(best.best_params)}\n"
              f"preset: {preset_dir / f'{study}-best.yaml'}; train it with: python train.py experiment={study}-best",
              flush=True)  # fmt: skip


def hparams_search_file(name: str, conf_dir: Path | None = None) -> Path:
    """The file of ``hparams_search=<name>``; one sentence naming the choices when there is none."""
    from lmforge.config_dirs import CONF_DIR, config_choices
    from lmforge.errors import LmforgeError

    conf_dir = conf_dir or CONF_DIR
    path = conf_dir / "hparams_search" / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(config_choices("hparams_search", conf_dir))
        raise LmforgeError(f"Unknown hparams_search '{name}'; choose one of: {choices}.")
    return path


def hydra_value(value: Any) -> str:
    """A Python value written as a Hydra override value (``true``, ``null``, ``[1,2]``, ``1e-4``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str) and any(c in value for c in " ,=()[]{}'\"\\:$"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _flatten(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), node)]


def search_base(name: str, conf_dir: Path | None = None) -> list[str]:
    """What an ``hparams_search`` config sets besides the search itself, as overrides (``task=sst2``,
    ``trainer.max_steps=300``): the base every trial starts from."""
    raw = OmegaConf.to_container(OmegaConf.load(hparams_search_file(name, conf_dir)), resolve=False)
    overrides = []
    for entry in raw.pop("defaults", []) or []:
        if isinstance(entry, dict):
            for key, choice in entry.items():
                group = key.removeprefix("override").strip().lstrip("/")
                if not group.startswith("hydra/") and group != "_self_":
                    overrides.append(f"{group}={hydra_value(choice)}")
    raw.pop("hydra", None)
    overrides += [f"{k}={hydra_value(v)}" for k, v in _flatten(raw)]
    return overrides


def search_params(name: str, conf_dir: Path | None = None) -> dict[str, str]:
    """The search space of an ``hparams_search`` config: ``hydra.sweeper.params`` (Hydra sweep syntax)."""
    raw = OmegaConf.load(hparams_search_file(name, conf_dir))
    params = OmegaConf.select(raw, "hydra.sweeper.params")
    return {str(k): str(v) for k, v in (params or {}).items()}


def preset_yaml(study: str, overrides: list[str], best: dict[str, Any], value: float, conf_dir: Path) -> str:
    """An experiment preset (``# @package _global_``) that re-trains a study's best trial.

    Args:
        study: the study's name, for the header.
        overrides: the trials' base: the search config's own settings, then the sweep's command line.
        best: the best trial's parameters; they replace the search space.
        value: the best trial's objective.
        conf_dir: the config tree, to tell group choices (``model=bert-mini``) from values.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    chosen = {k: hydra_value(v) for k, v in best.items()}
    kept = [
        o for o in overrides if not o.lstrip("+~").split("=", 1)[0].startswith(("hparams_search", "paths.", "hydra"))
    ]
    parsed = OverridesParser.create().parse_overrides([*kept, *(f"{k}={v}" for k, v in chosen.items())])
    final: dict[str, Any] = {}
    for override in parsed:
        if override.is_delete():
            continue
        key = override.key_or_group
        if key in chosen and override.is_sweep_override():
            continue  # the search space itself; the best value comes from `best`
        final[key] = override.value()
    groups = {k: v for k, v in final.items() if (conf_dir / k).is_dir()}
    values = OmegaConf.create()
    for key, v in final.items():
        if key not in groups:
            OmegaConf.update(values, key, v, force_add=True)
    # Another experiment is included (its own overrides come along), a group choice overridden;
    # _self_ last so that the best values win over both.
    defaults: list[Any] = [groups.pop("experiment")] if groups.get("experiment") else []
    defaults += [{f"override /{k}": v} for k, v in groups.items() if k != "experiment"]
    body: dict[str, Any] = {"defaults": [*defaults, "_self_"], **OmegaConf.to_container(values)}
    header = (
        "# @package _global_\n"
        f"# Best trial of the Optuna study {study} (objective {value}), written when its sweep ended.\n"
        f"#   python train.py experiment={study}-best        # add trainer.max_steps=... to train longer\n"
    )
    return header + OmegaConf.to_yaml(OmegaConf.create(body))
