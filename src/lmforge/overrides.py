"""The command line's overrides, checked and quoted before Hydra parses them: unknown config names
(``model=gtp2``), text given to a number (``trainer.max_steps=abc``), free text with Hydra's syntax in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.config_dirs import config_dirs, is_group, option_names, registered_choices
from lmforge.errors import LmforgeError


def check_group_choices(overrides: list[str], conf_dir: Path | None = None) -> None:
    """Fail with one sentence when an override names a config that does not exist (``model=gtp2``)."""
    dirs = [conf_dir] if conf_dir else config_dirs(overrides)
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~").removeprefix("override ").strip()
        if not key or not is_group(key, dirs) or "(" in value:  # sweeps like range(...) are Hydra's to check
            continue
        for name in value.split(","):  # a sweep (model=a,b) or a list of configs (callbacks=[default,ema])
            name = name.strip("[] ")
            if name and name != "null" and name not in option_names(key, dirs):
                if key.startswith("hydra/") and name in registered_choices(key):
                    continue
                raise LmforgeError(
                    f"Unknown {key} '{name}'; choose one of: {', '.join(sorted(option_names(key, dirs)))}."
                )


# Keys whose values are free text (a prompt, a question, a paragraph): quoted before Hydra parses them.
FREE_TEXT_KEYS = ("text", "prompt", "question", "context")


def _hydra_quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra string, read back unchanged."""
    # Hydra unescapes a backslash only before a quote or at the end of the string.
    trailing = len(value) - len(value.rstrip("\\"))
    return "'" + value.replace("'", "\\'") + "\\" * trailing + "'"


def quote_free_text(args: list[str], keys: tuple[str, ...] = FREE_TEXT_KEYS) -> list[str]:
    """Quote the values of free-text overrides, so that commas, brackets and parentheses in
    ``context="Denver (AFC) won, 24-10."`` reach the program as text instead of Hydra syntax.

    A value the user quoted already (``text='"a b"'``) or a list (``text=[a,b]``) is left as it is.
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
        if sep and key in keys and not quoted and not value.startswith("["):
            value = _hydra_quoted(value)
        out.append(f"{key}{sep}{value}")
    return out


def quote_override_lists(args: list[str], keys: tuple[str, ...] = ("extra",)) -> list[str]:
    """Quote the items of list options that hold overrides (``extra=[trainer.max_steps=20,model.n_head=2]``),
    whose ``=`` Hydra's grammar does not allow unquoted inside a list."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in keys and value.startswith("[") and value.endswith("]"):
            items, depth, current = [], 0, ""
            for char in value[1:-1]:
                depth += {"[": 1, "]": -1}.get(char, 0)
                if char == "," and depth == 0:
                    items.append(current)
                    current = ""
                else:
                    current += char
            items = [i for i in (*items, current) if i]
            quoted = [i if i[:1] in "'\"" else _hydra_quoted(i) for i in items]
            arg = f"{key}=[{','.join(quoted)}]"
        out.append(arg)
    return out


def check_override_types(cfg: Any, defaults: Any, overrides: list[str], conf_dir: Path | None = None) -> None:
    """Fail with one sentence when an override gives text to a key whose default is a number or a
    flag (``trainer.max_steps=abc``), before the value reaches a constructor deep inside a library.

    Args:
        cfg: the composed config, overrides applied.
        defaults: the same config composed without the ``key=value`` overrides (group choices kept).
        overrides: the command line's overrides.
    """
    from omegaconf import OmegaConf

    for key in value_override_keys(overrides, conf_dir):
        if key in TEXT_OR_NUMBER_KEYS:
            continue
        try:
            default = OmegaConf.select(defaults, key, throw_on_missing=False)
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:  # an interpolation that cannot resolve yet is not this check's business
            continue
        if isinstance(default, (bool, int, float)) and isinstance(value, str):
            kind = "true or false" if isinstance(default, bool) else "a number"
            raise LmforgeError(f"{key}={value} is not valid: {key} takes {kind} (its default is {default}).")


# Keys whose default is a number but which also take words (``trainer.devices=auto``).
TEXT_OR_NUMBER_KEYS = ("trainer.devices",)


def value_override_keys(overrides: list[str], conf_dir: Path | None = None) -> list[str]:
    """The keys of ``key=value`` overrides, leaving out group choices (``model=...``) and Hydra's own keys."""
    dirs = [conf_dir] if conf_dir else config_dirs()
    keys = []
    for arg in overrides:
        key, sep, _ = arg.partition("=")
        key = key.lstrip("+~").strip()
        if sep and key and not key.startswith("hydra") and "/" not in key and not is_group(key, dirs):
            keys.append(key)
    return keys


def check_job_overrides(cfg: Any, config_name: str) -> None:
    """Check the value types of the current Hydra job's ``key=value`` overrides against their defaults."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    value_keys = set(value_override_keys(overrides))
    if not value_keys - set(TEXT_OR_NUMBER_KEYS):
        return
    groups = [o for o in overrides if o.partition("=")[0].lstrip("+~").strip() not in value_keys]
    groups = [o for o in groups if not o.lstrip("+~").startswith("hydra")]
    check_override_types(cfg, compose(config_name=config_name, overrides=groups), overrides)
