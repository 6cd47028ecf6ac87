"""The error boundary of every command: an exception that is not already one of lmforge's sentences
(a library refusing a value deep inside the optimizer, a DataLoader, a callback, the model's forward)
becomes one sentence that names the config key or group it came from."""

from __future__ import annotations

import difflib
import traceback
from typing import Any

from omegaconf import DictConfig, ListConfig

from lmforge.errors import sentence
from lmforge.overrides import value_override_keys
from lmforge.rundirs.config import MOVED_TARGETS

# Where a frame's file lies -> the config group that sets up that code; the first match counts.
AREAS = (
    ("lmforge/data/tokenizers", "tokenizer"),
    ("torch/optim/lr_scheduler", "scheduler"),
    ("lmforge/tasks/schedules", "scheduler"),
    ("torch/optim/", "optimizer"),
    ("lmforge/tasks/optim", "optimizer"),
    ("lmforge/models/", "model"),
    ("lmforge/data/", "task.data or task.source"),
    ("torch/utils/data/", "task.data"),
    ("lmforge/generation", "the generation settings"),
    ("lmforge/hub/export", "the export settings"),
    ("lmforge/finetune", "finetune"),
    ("peft/", "finetune"),
    ("pytorch_lightning/callbacks/", "callbacks"),
    ("lmforge/callbacks", "callbacks"),
    ("pytorch_lightning/loggers/", "logger"),
    ("wandb/", "logger"),
    ("lmforge/tasks/", "task.module"),
    ("pytorch_lightning/", "trainer"),
    ("lightning_fabric/", "trainer"),
)


def failure_sentence(err: BaseException, cfg: Any = None, overrides: list[str] = ()) -> str:
    """One sentence for ``err``: the config key or group it came from, the exception's own first line,
    and how to see the traceback.

    Args:
        overrides: the command line's ``key=value`` overrides; those under the group at fault are
            named as the culprits, and otherwise listed as suspects.
    """
    cause = err
    while cause.__cause__ is not None and type(cause).__name__ == "InstantiationException":
        cause = cause.__cause__
    if missing := _missing_target_sentence(err, cfg):
        return missing
    where = _key_of_target(cfg, failed_target(err)) or _group_of_frames(err) or "the run"
    lines = [line for line in str(cause).splitlines() if line.strip()]
    first = lines[0].strip().rstrip(".") if lines else ""
    what = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
    groups = tuple(f"{group.strip()}." for group in where.split(" or "))
    culprits = [o for o in overrides if o.lstrip("+").startswith(groups)]
    if culprits:
        return sentence(f"{', '.join(culprits)}: {what} (HYDRA_FULL_ERROR=1 shows the traceback)")
    suspects = f"; set on the command line: {', '.join(overrides)}" if overrides else ""
    return sentence(f"{where}: {what} (HYDRA_FULL_ERROR=1 shows the traceback{suspects})")


# How Hydra words a ``_target_`` it could not import (through ``instantiate``, through ``get_class``),
# and one it imported but whose call raised.
LOCATING = ("Error locating target '", "Error loading '")
CALLING = "Error in call to target '"


def failed_target(err: BaseException) -> str | None:
    """The ``_target_`` that Hydra failed to import or call, from its message (``... target 'x.Y'``)."""
    text = str(err)
    marker = next((m for m in (*LOCATING, CALLING) if m in text), None)
    return text.split(marker, 1)[1].split("'", 1)[0] if marker else None


def _missing_target_sentence(err: BaseException, cfg: Any) -> str | None:
    """For a ``_target_`` that does not import: the key naming it, and where the class went if it moved."""
    if not any(marker in str(err) for marker in LOCATING):
        return None
    target = failed_target(err)
    key = _key_of_target(cfg, target)
    where = f"{key}._target_" if key else "_target_"
    if target in MOVED_TARGETS:
        return f"{where}: {target} has moved to {MOVED_TARGETS[target]}; update the config that names it."
    return f"{where}: there is no {target} to import; check its module and class name."


def _key_of_target(cfg: Any, target: str | None, prefix: str = "") -> str | None:
    """The dotted key of the config node whose ``_target_`` is ``target``."""
    if target is None or not isinstance(cfg, (DictConfig, ListConfig, dict)):
        return None
    items = cfg.items() if isinstance(cfg, (DictConfig, dict)) else enumerate(cfg)
    for key, value in items:
        path = f"{prefix}{key}"
        if key == "_target_" and value == target:
            return prefix.rstrip(".") or None
        if isinstance(value, (DictConfig, ListConfig, dict)):
            found = _key_of_target(value, target, f"{path}.")
            if found:
                return found
    return None


def _group_of_frames(err: BaseException) -> str | None:
    """The config group of the deepest frame (of ``err`` and the errors it came from) in a known place."""
    group = None
    seen = err
    chain = []
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for exc in chain:  # outer first: the innermost error's deepest known frame has the last word
        for frame in traceback.extract_tb(exc.__traceback__):
            path = frame.filename.replace("\\", "/")
            match = next((name for fragment, name in AREAS if fragment in path), None)
            group = match or group
    return group


def hydra_error_sentence(err: BaseException) -> str:
    """One sentence for an error that Hydra or OmegaConf raises about the command line or the config
    (a typo'd key, override syntax, a failed interpolation), instead of their several lines."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = err.__cause__ if err.__cause__ is not None else err
    parent = getattr(cause, "parent_node", None)
    if isinstance(err, OverrideParseException):
        lines = str(err).splitlines()
        return sentence(f"Cannot parse an override ({lines[0]}); {lines[-1][0].lower()}{lines[-1][1:]}")
    if (
        isinstance(cause, (ConfigKeyError, ConfigAttributeError))
        and cause.full_key
        and parent is not None
        and hasattr(parent, "keys")
    ):
        key = str(cause.key)
        prefix = cause.full_key[: -len(key)]
        close = difflib.get_close_matches(key, [str(k) for k in parent], n=1)
        where = f"those of {prefix[:-1]}" if prefix else "the top-level keys"
        hint = f"did you mean {prefix}{close[0]}?" if close else f"{where} are: {', '.join(map(str, parent))}"
        return f"{cause.full_key} is not a config key ({hint}); +{cause.full_key}=<value> adds a new one."
    if isinstance(err, OmegaConfBaseException) and err.full_key and err.full_key not in str(err):
        return sentence(f"{err.full_key}: {str(err).splitlines()[0]}")
    noise = ("See https://hydra.cc", "full_key:", "object_type", "Set the environment variable", "To append to")
    lines = [line.strip() for line in str(err).splitlines()]
    if isinstance(err.__cause__, OmegaConfBaseException):
        lines += str(err.__cause__).splitlines()[:1]
    return sentence("; ".join(line.rstrip(".") for line in lines if line and not line.startswith(noise)))


def job_failure_sentence(err: BaseException, cfg: Any) -> str:
    """:func:`failure_sentence` for an error of the current Hydra job, with its value overrides as suspects."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    keys = set(value_override_keys(overrides))
    return failure_sentence(err, cfg, [o for o in overrides if o.partition("=")[0].lstrip("+~") in keys])
