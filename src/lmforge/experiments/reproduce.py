"""What ``lmforge-reproduce`` does: train a finished run again from its saved config and compare the two."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lmforge.errors import LmforgeError
from lmforge.rundirs.config import saved_config

log = logging.getLogger("lmforge")

# The only options: where the new run goes and what it runs on; anything else would make it another run.
OPTIONS = ("run", "tolerance", "device", "data_dir", "paths.output_root")
# Without tolerance=: CPU runs are bitwise repeatable (trainer.deterministic=auto); GPU kernels are not
# unless trainer.deterministic=true, so their last digits may move.
CPU_TOLERANCE = 0.0
ACCELERATOR_TOLERANCE = 1e-3
REPORT_FILE = "reproduce.json"


def check_options(args: list[str]) -> None:
    """Refuse command-line overrides other than :data:`OPTIONS` (``trainer.max_steps=10`` would change the run)."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key not in OPTIONS and not key.startswith(("hydra.", "hydra/")):
            raise LmforgeError(
                f"lmforge-reproduce runs the saved config as it is, so {key} cannot be set; "
                f"its options are {', '.join(f'{o}=' for o in OPTIONS)}."
            )


def original_run(spec: str) -> tuple[Path, DictConfig, dict[str, Any]]:
    """The run dir ``spec`` with its saved config and its ``metrics.json`` record; one sentence when it is not one."""
    run_dir = Path(spec).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        raise LmforgeError(f"{run_dir} is not a run directory (no config.yaml in it).")
    if not (run_dir / "metrics.json").is_file():
        raise LmforgeError(f"{run_dir} has no metrics.json (the run did not finish), so there is nothing to compare.")
    try:
        record = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        saved = saved_config(run_dir)
    except (OSError, ValueError) as err:  # a hand-edited or truncated file
        raise LmforgeError(f"{run_dir} has an unreadable config.yaml or metrics.json ({err}).") from err
    return run_dir, saved, record


def _output_root(run_dir: Path, saved: DictConfig) -> str:
    """The output root a run dir lives in: the folder above its ``runs/``, else its saved ``paths.output_root``."""
    for parent in run_dir.parents:
        if parent.name == "runs":
            return str(parent.parent)
    return str(saved.paths.output_root)


def _reinterpolate(node: Any, old: str, new: str) -> Any:
    """Turn values that spelled out ``old`` (the saved config is resolved) back into the interpolation ``new``."""
    if isinstance(node, dict):
        return {k: _reinterpolate(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_reinterpolate(v, old, new) for v in node]
    if isinstance(node, str) and old in node:
        return node.replace(old, new)
    return node


def reproduction_config(
    run_dir: Path,
    saved: DictConfig,
    output_root: str | None = None,
    device: str | None = None,
    data_dir: str | None = None,
) -> DictConfig:
    """The saved config of a run, ready to train again into a new run dir (same seed, same everything else).

    Args:
        run_dir: the run dir the config was read from.
        saved: the run's ``config.yaml``.
        output_root: where the new run dir goes; None: beside the original.
        device: ``cpu`` or ``gpu`` to choose ``trainer.accelerator``; None keeps the run's.
        data_dir: where the data mirror is on this machine; None keeps the run's.
    """
    values = OmegaConf.to_container(saved, resolve=True)
    # Checkpoint dirs, logger dirs and the W&B id were saved spelled out: point them at the new run.
    if saved.paths.get("run_dir"):
        values = _reinterpolate(values, str(saved.paths.run_dir), "${paths.run_dir}")
    if saved.get("run_id"):
        values = _reinterpolate(values, str(saved.run_id), "${run_id}")
    cfg = OmegaConf.create(values)
    with open_dict(cfg):
        cfg.run_id = None
        cfg.paths.run_dir = None
        cfg.resume = None  # a resumed original is reproduced by one uninterrupted run
        cfg.paths.output_root = output_root or _output_root(run_dir, saved)
        if output_root:
            cfg.paths.results_file = str(Path(output_root) / "results.jsonl")
        if data_dir:
            cfg.paths.data_dir = data_dir
        if device:
            if device not in ("cpu", "gpu", "cuda"):
                raise LmforgeError(f"device={device} is not one lmforge-reproduce knows; use device=cpu or device=gpu.")
            cfg.trainer.accelerator = "cpu" if device == "cpu" else "gpu"
    return cfg


def _read_diff(run_dir: Path) -> str | None:
    path = run_dir / "git.diff"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def provenance_notes(
    original: dict[str, Any], reproduced: dict[str, Any], original_dir: Path, new_dir: Path
) -> list[str]:
    """Sentences on what differs between how the two runs were made: git, uncommitted changes, versions, hardware.

    A fact the original's record lacks (a run from before it was recorded) is not compared.
    """
    notes = []
    if original.get("git_sha") != reproduced.get("git_sha"):
        old, new = (str(r.get("git_sha"))[:12] for r in (original, reproduced))
        notes.append(f"git sha differs: {old} originally, {new} now.")
    old_diff, new_diff = _read_diff(original_dir), _read_diff(new_dir)
    if old_diff is None and original.get("git_dirty"):
        notes.append("the original ran with uncommitted changes that no git.diff records, so they cannot be compared.")
    elif old_diff != new_diff:
        if old_diff and new_diff:
            notes.append("the uncommitted changes differ (compare the two runs' git.diff files).")
        elif old_diff:
            notes.append("the original ran with uncommitted changes (its git.diff); this run did not.")
        else:
            notes.append("this run has uncommitted changes (its git.diff); the original did not.")
    for group in ("versions", "hardware"):
        old, new = original.get(group) or {}, reproduced.get(group) or {}
        for key in old:
            if old[key] != new.get(key):
                notes.append(f"{group} differ: {key} {old[key]} originally, {new.get(key)} now.")
    if "device" in original and original["device"] != reproduced.get("device"):
        notes.append(f"device differs: {original['device']} originally, {reproduced.get('device')} now.")
    return notes


def compare_metrics(original: dict[str, float], reproduced: dict[str, float], tolerance: float) -> dict[str, Any]:
    """Each final metric of either run: original, reproduced, absolute difference, and whether it is within ``tolerance``."""
    rows = {}
    for name in sorted(set(original) | set(reproduced)):
        old, new = original.get(name), reproduced.get(name)
        diff = abs(new - old) if old is not None and new is not None else None
        same = diff is not None and (diff <= tolerance or (math.isnan(old) and math.isnan(new)))
        rows[name] = {"original": old, "reproduced": new, "abs_diff": diff, "match": bool(same)}
    return rows


def compare_weights(original_dir: Path, new_dir: Path, tolerance: float) -> dict[str, Any]:
    """The largest absolute difference between the two runs' final weights (``checkpoints/last.ckpt``)."""
    from lmforge.rundirs.checkpoints import load_checkpoint

    old_path, new_path = original_dir / "checkpoints" / "last.ckpt", new_dir / "checkpoints" / "last.ckpt"
    if not old_path.is_file():
        return {"compared": False, "reason": f"the original has no {old_path.relative_to(original_dir)}"}
    old, new = load_checkpoint(old_path)["state_dict"], load_checkpoint(new_path)["state_dict"]
    if old.keys() != new.keys() or any(old[k].shape != new[k].shape for k in old):
        return {
            "compared": True,
            "max_abs_diff": None,
            "match": False,
            "reason": "the tensors differ in names or shapes",
        }
    worst = max(((old[k].double() - new[k].double()).abs().max().item() for k in old if old[k].numel()), default=0.0)
    return {"compared": True, "max_abs_diff": worst, "match": worst <= tolerance}


def format_table(metrics: dict[str, Any], weights: dict[str, Any], tolerance: float) -> str:
    """A plain-text table: one row per metric (and one for the final weights) with the verdict."""

    def num(value: float | None) -> str:
        return "-" if value is None else repr(value)

    rows = [("metric", "original", "reproduced", "abs diff", f"within {tolerance:g}")]
    for name, row in metrics.items():
        rows.append((name, num(row["original"]), num(row["reproduced"]), num(row["abs_diff"]), _yes(row["match"])))
    if weights["compared"]:
        rows.append(("weights (last.ckpt)", "", "", num(weights["max_abs_diff"]), _yes(weights["match"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _yes(match: bool) -> str:
    return "yes" if match else "NO"


def reproduce_run(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.run`` again from its ``config.yaml`` into a new run dir and compare the two.

    Writes ``reproduce.json`` in the new run dir and logs the comparison table and notes.

    Returns:
        the comparison (as written to ``reproduce.json``); empty on DDP ranks other than 0.
    Raises:
        LmforgeError: ``cfg.run`` is not a finished run dir, or the reproduction does not match it.
    """
    from lmforge import tracking
    from lmforge.console import setup_console
    from lmforge.distributed import is_rank_zero

    setup_console()
    if OmegaConf.is_missing(cfg, "run"):
        raise LmforgeError("Say which run to reproduce: lmforge-reproduce run=<run dir>")
    original_dir, saved, original = original_run(cfg.run)
    from lmforge.training import run_training  # torch and Lightning only once the input is known to be good

    new_cfg = reproduction_config(
        original_dir, saved, cfg.paths.get("output_root"), cfg.get("device"), cfg.get("data_dir")
    )
    log.info("reproducing %s (seed %s)", original_dir, new_cfg.seed)
    record = run_training(new_cfg)
    if not is_rank_zero():  # a DDP worker of the new run: rank 0 compares
        return {}
    new_dir = Path(record["run_dir"])
    report = compare_runs(original_dir, saved, original, record, cfg.get("tolerance"))
    tracking.write_json(new_dir / REPORT_FILE, report)
    metrics, weights, notes, tolerance = report["metrics"], report["weights"], report["notes"], report["tolerance"]
    log.info("reproduction of %s:\n%s", original_dir, format_table(metrics, weights, tolerance))
    for note in notes:
        log.info("note: %s", note)
    log.info("written: %s", new_dir / REPORT_FILE)
    if not report["match"]:
        differing = [name for name, row in metrics.items() if not row["match"]]
        what = (
            f"{len(differing)} of {len(metrics)} metrics ({', '.join(differing)})" if differing else "the final weights"
        )
        raise LmforgeError(
            f"The reproduction does not match {original_dir}: {what} differ by more than {tolerance:g} "
            f"(see {new_dir / REPORT_FILE})."
        )
    log.info(
        "reproduced: every metric%s within %g.", " and the final weights" if weights["compared"] else "", tolerance
    )
    return report


def compare_runs(
    original_dir: Path, saved: DictConfig, original: dict[str, Any], record: dict[str, Any], tolerance: float | None
) -> dict[str, Any]:
    """The comparison of a reproduction's record with the original's: metrics, final weights, notes on what
    differs around them; ``tolerance`` None is the device's default."""
    new_dir = Path(record["run_dir"])
    if tolerance is None:
        tolerance = CPU_TOLERANCE if record.get("device") == "cpu" else ACCELERATOR_TOLERANCE
    tolerance = float(tolerance)
    metrics = compare_metrics(original.get("metrics") or {}, record["metrics"], tolerance)
    weights = compare_weights(original_dir, new_dir, tolerance)
    notes = provenance_notes(original, record, original_dir, new_dir)
    if saved.get("resume"):
        notes.append("the original was resumed and this run was not; their last digits may differ for that alone.")
    if not weights["compared"]:
        notes.append(f"final weights not compared: {weights['reason']}.")
    return {
        "original": str(original_dir),
        "reproduction": str(new_dir),
        "tolerance": tolerance,
        "match": all(row["match"] for row in metrics.values()) and weights.get("match", True),
        "metrics": metrics,
        "weights": weights,
        "notes": notes,
    }
