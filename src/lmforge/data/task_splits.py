"""Another task's splits, read through that task's own data source (``task=<name>``'s config).

What reads other tasks' data (the suite baselines, the instruction mixture) goes through here, so that
it sees the very splits the task trains and is scored on: the same files, the same held-out articles.
"""

from __future__ import annotations

from typing import Any


def task_config(task: str):
    """The train config of ``task=<task>``, composed in the running Hydra app or from lmforge's conf/."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmforge.config_dirs import CONF_DIR

    if GlobalHydra.instance().is_initialized():  # inside an lmforge command: its search path (user dirs too)
        return compose(config_name="train", overrides=[f"task={task}"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[f"task={task}"])


def read_task_splits(
    task: str, data_dir: str | None = None, required=("train", "validation", "test")
) -> tuple[dict, Any, Any]:
    """``(splits, source, config)`` of ``task=<task>``: split name -> its table, as the task's source reads them."""
    from hydra.utils import instantiate

    cfg = task_config(task)
    source = instantiate(cfg.task.source)
    return source.load(data_dir or cfg.paths.data_dir, required=required), source, cfg
