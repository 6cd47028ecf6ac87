"""Run tracking: run directories, loggers (W&B online or offline, CSV, TensorBoard), run metadata,
the results table and the curves plot."""

from __future__ import annotations

import csv
import json
import logging
import netrc
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from lmforge.distributed import COMMAND_VAR
from lmforge.hub.network import host_reachable

log = logging.getLogger(__name__)

PACKAGES = ("torch", "pytorch-lightning", "hydra-core", "wandb", "torchmetrics", "datasets", "tokenizers", "lmforge")


def wandb_has_credentials() -> bool:
    """True when a W&B API key is in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(mode: str | None = None) -> str:
    """Pick the W&B mode: the config's, else ``WANDB_MODE``, else online when a key is present and
    the server answers within a few seconds, else offline."""
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not wandb_has_credentials():
        return "offline"
    if not host_reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        log.warning("W&B has a key but its server cannot be reached; logging offline.")
        return "offline"
    return "online"


def wandb_logger(
    save_dir: str,
    run_id: str,
    name: str,
    project: str = "lmforge",
    entity: str | None = None,
    mode: str | None = None,
    tags: list[str] | None = None,
    init_timeout: float = 10.0,
):
    """A Lightning W&B logger that never prompts and never hangs a run.

    Without an API key it writes offline files under ``save_dir/wandb`` (upload them
    later with ``wandb sync``); ``WANDB_MODE`` is respected.
    """
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    resolved = wandb_mode(mode)
    settings = wandb.Settings(
        silent=True, console="off", init_timeout=init_timeout, x_disable_stats=resolved != "online"
    )
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        run_id = os.environ["WANDB_RUN_ID"]  # started by `wandb agent`: the sweep waits for the run it named
    logger = WandbLogger(
        save_dir=save_dir,
        id=run_id,
        name=name,
        project=project,
        entity=entity,
        tags=list(tags or []),
        mode=resolved,
        settings=settings,
    )
    # Lightning always passes `anonymous`, which recent wandb versions warn about.
    logger._wandb_init.pop("anonymous", None)
    return logger


def prestart_wandb_service() -> None:
    """Start W&B's background service while Lightning imports (it mostly waits on a subprocess)."""
    import threading

    def setup() -> None:
        try:
            import wandb

            wandb.setup()
        except Exception:  # the run itself reports W&B problems; this is only a head start
            pass

    threading.Thread(target=setup, daemon=True).start()


def start_wandb(logger) -> None:
    """Start the W&B run now; if an online start fails (no network, bad key), switch it to offline.

    Safe to call from a worker thread, so that W&B starts while the data and model are built.
    """
    try:
        logger.experiment  # noqa: B018 -- starting the run is the point
    except Exception as err:  # wandb raises several unrelated types for network and auth failures
        log.warning("W&B could not start online (%s); logging offline instead.", str(err).splitlines()[0][:200])
        # A fresh id: the failed online attempt may still hold the first one.
        logger._wandb_init.update(mode="offline", id=f"{logger._wandb_init['id']}-offline")
        logger._experiment = None
        logger.experiment  # noqa: B018


def finish_wandb(exit_code: int = 0) -> None:
    """End the process's current W&B run, if W&B was imported and a run is open."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def describe_wandb(logger) -> str:
    """One line saying where a W&B logger writes and whether it is online."""
    run = logger.experiment
    if run.settings.mode == "offline":
        return f"W&B offline: {run.dir.rsplit('/files', 1)[0]} (upload later with `wandb sync`)"
    return f"W&B online: {run.url}"


def _git(cwd: str | Path, *args: str) -> str | None:
    """The output of a git command in ``cwd``, or None when git is missing, fails or is not a checkout there."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _code_dir(cwd: str | Path | None) -> Path:
    """Where git is asked: the given folder, else lmforge's own source tree (the code that runs)."""
    return Path(cwd) if cwd else Path(__file__).resolve().parent


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    """The git commit of the working tree and whether it has uncommitted changes (None outside git)."""
    cwd = _code_dir(cwd)
    sha = _git(cwd, "rev-parse", "HEAD")
    dirty = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha.strip() if sha else None, "git_dirty": bool(dirty.strip()) if dirty is not None else None}


def git_diff(cwd: str | Path | None = None) -> str | None:
    """The uncommitted changes to tracked files (``git diff HEAD``); None when there are none or outside git.

    Untracked files are not part of it, as they are not part of ``git_dirty``.
    """
    diff = _git(_code_dir(cwd), "diff", "HEAD")
    return diff or None


def save_git_diff(run_dir: str | Path, cwd: str | Path | None = None) -> Path | None:
    """Write ``git diff HEAD`` to ``<run_dir>/git.diff`` when the tree is dirty; return the file, or None.

    A clean tree (or no git) leaves no file, and removes one a resumed run's first part left behind,
    so that the file always goes with the run's ``git_dirty``.
    """
    path = Path(run_dir) / "git.diff"
    diff = git_diff(cwd)
    if diff is None:
        path.unlink(missing_ok=True)
        return None
    path.write_text(diff, encoding="utf-8")
    return path


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    """CPU, core count, torch's CPU threads and GPU names of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    # The thread count splits CPU reductions differently, so it decides the last bits of CPU results.
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus}


def peak_memory_mb() -> float:
    """Peak memory of this process so far: GPU memory allocated by torch on a GPU, else the peak resident set."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def run_metadata(seed: int, overrides: list[str] | None = None, git: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to tell how a run was made: command, git, versions, hardware, seed.

    Args:
        overrides: the Hydra overrides of the job (a sweep job's own, not the whole sweep's).
        git: :func:`git_state` as taken when the run started; None takes it now.
    Returns:
        ``command`` (the user's command line, shell-quoted: ``shlex.split`` gives it back; for a
        sweep job that submitit started, the sweep's command, not submitit's), ``cwd``, ``overrides``,
        ``git_sha``, ``git_dirty``, ``versions``, ``hardware`` and ``seed``.
    """
    return {
        "command": os.environ.get(COMMAND_VAR) or shlex.join(sys.argv),
        "cwd": os.getcwd(),
        "overrides": list(overrides or []),
        **(git if git is not None else git_state()),
        "versions": package_versions(),
        "hardware": hardware(),
        "seed": seed,
    }


def append_result(results_file: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the results table (one write, so concurrent runs do not interleave)."""
    path = Path(results_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically."""
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to a file beside ``path`` and rename it into place: ``path`` is never half written."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def keep_csv_history(csv_dir: str | Path) -> None:
    """Before a resume, move ``metrics.csv`` aside (Lightning's CSV logger would delete it)."""
    current = Path(csv_dir) / "metrics.csv"
    if current.is_file():
        part = len(list(current.parent.glob("metrics.part*.csv"))) + 1
        current.rename(current.with_name(f"metrics.part{part}.csv"))


def csv_history(csv_dir: str | Path) -> list[Path]:
    """The CSV logger's metrics files of a run, oldest first (one per resume, then the current one)."""
    csv_dir = Path(csv_dir)
    parts = sorted(csv_dir.glob("metrics.part*.csv"), key=lambda p: int(p.stem.removeprefix("metrics.part")))
    return [*parts, csv_dir / "metrics.csv"]


def logged_values(metrics_files: list[Path], keys: list[str]) -> dict[str, list[list[float]]]:
    """``[step, value]`` of every logged value of each of ``keys`` in a CSV logger's metrics files, in order."""
    values: dict[str, list[list[float]]] = {key: [] for key in keys}
    for metrics_csv in metrics_files:
        if not Path(metrics_csv).is_file():
            continue
        with open(metrics_csv, newline="") as f:
            for row in csv.DictReader(f):
                for key, points in values.items():
                    if row.get(key):
                        points.append([int(row["step"]), float(row[key])])
    return values


def plot_curves(metrics_files: list[Path], png: str | Path) -> Path | None:
    """Plot training and validation loss against step from a CSV logger's metrics files."""
    curves = logged_values(metrics_files, ["train/loss", "val/loss"])
    if not any(curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, marker="o" if key.startswith("val") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux; None elsewhere), to measure start-up time."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Stopwatch:
    """Wall time since the process started a run."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.started_at = datetime.now().isoformat(timespec="seconds")

    @property
    def elapsed(self) -> float:
        """Seconds since start."""
        return time.perf_counter() - self.start
