"""Where configs come from: lmforge's own ``conf/`` (the repository's top level, shipped inside the
wheel as ``lmforge/conf``) and the user's config dirs, searched first.

A user adds config groups and options without editing lmforge: ``LMFORGE_CONF=~/my-conf`` (several
dirs joined by ``:``) or Hydra's ``--config-dir ~/my-conf``, holding e.g. ``model/my-gpt.yaml`` and
``experiment/my-run.yaml``; a file there with the name of one of lmforge's replaces it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

USER_CONF_VAR = "LMFORGE_CONF"

_PACKAGED = Path(__file__).resolve().parent / "conf"  # an installed wheel
_CHECKOUT = Path(__file__).resolve().parents[2] / "conf"  # a source checkout (an editable install)
CONF_DIR = _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT


def env_config_dirs() -> list[Path]:
    """The dirs named by ``LMFORGE_CONF``, in order."""
    return [Path(d).expanduser().resolve() for d in os.environ.get(USER_CONF_VAR, "").split(os.pathsep) if d]


def argv_config_dir(argv: list[str] | None = None) -> Path | None:
    """The dir of Hydra's ``--config-dir``/``-cd`` option on the command line, if any."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        for flag in ("--config-dir", "-cd"):
            if arg == flag and i + 1 < len(args):
                return Path(args[i + 1]).expanduser().resolve()
            if arg.startswith(f"{flag}="):
                return Path(arg.split("=", 1)[1]).expanduser().resolve()
    return None


def config_dirs(argv: list[str] | None = None) -> list[Path]:
    """Every config dir in search order: ``--config-dir``, ``LMFORGE_CONF``'s, then lmforge's own."""
    named = argv_config_dir(argv)
    return [*([named] if named else []), *env_config_dirs(), CONF_DIR]


def is_group(name: str, dirs: list[Path] | None = None) -> bool:
    """Whether ``name`` (``model``, ``task/source``) is a config group in any config dir."""
    return any((d / name).is_dir() for d in dirs or config_dirs())


def option_names(group: str, dirs: list[Path] | None = None) -> set[str]:
    """The options of a config group found in the config dirs (file names without ``.yaml``)."""
    return {p.stem for d in dirs or config_dirs() for p in (d / group).glob("*.yaml")}


def use_user_config_dirs() -> None:
    """Put the user's config dirs (``LMFORGE_CONF``) before lmforge's own ``conf/`` in Hydra's search
    path, so that their groups and options are found and theirs win where names clash."""
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class LmforgeUserConfigs(SearchPathPlugin):
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            if any(element.path in (str(CONF_DIR), f"file://{CONF_DIR}") for element in search_path.get_path()):
                for path in reversed(env_config_dirs()):
                    search_path.prepend(provider="lmforge-user", path=f"file://{path}")

    if not any(c.__name__ == "LmforgeUserConfigs" for c in Plugins.instance().discover(SearchPathPlugin)):
        Plugins.instance().register(LmforgeUserConfigs)


def config_choices(group: str, conf_dir: Path | None = None) -> list[str]:
    """The names a user can give a config group (file names in ``<config dir>/<group>/`` without ``.yaml``,
    lmforge's and the user's; for ``hydra/...`` groups also those of Hydra and its installed plugins,
    such as ``hydra/launcher=joblib``)."""
    names = option_names(group, [conf_dir] if conf_dir else None)
    if group.startswith("hydra/"):
        names.update(registered_choices(group))
    return sorted(names)


def registered_choices(group: str) -> list[str]:
    """Config names that Hydra and its plugins register in code (ConfigStore) for ``group``."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the installed hydra_plugins.*, which register their configs
    node = ConfigStore.instance().repo
    for part in group.split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return [name.removesuffix(".yaml") for name in node if name.endswith(".yaml")]
