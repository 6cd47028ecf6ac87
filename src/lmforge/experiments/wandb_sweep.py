"""A W&B sweep file from an ``hparams_search`` config: the search space Optuna would explore, for ``wandb agent``.

lmforge-sweep wandb sst2-optuna            # writes outputs/sweeps/sst2-optuna-wandb.yaml
wandb sweep outputs/sweeps/sst2-optuna-wandb.yaml
wandb agent <entity>/<project>/<sweep id>  # from the repository root, on as many machines as you like
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from lmforge.errors import LmforgeError
from lmforge.experiments.sweeps import monitored, search_base, search_params

log = logging.getLogger("lmforge")

# `args_no_hyphens` makes the agent pass `key=value`, which is Hydra's override syntax as it stands.
COMMAND = ["${env}", "python", "${program}", "${args_no_hyphens}"]


def wandb_parameter(key: str, spec: Any) -> dict[str, Any]:
    """One W&B sweep parameter from a Hydra sweep value, with the bounds Optuna's sweeper gives it.

    ``choice(a,b)`` -> ``values``; ``interval(lo,hi)`` -> ``min``/``max`` with ``uniform``
    (``log_uniform_values`` under ``tag(log, ...)``); ``range(lo,hi,step)`` -> ``int_uniform`` or
    ``values`` (Optuna includes ``hi``), ``q_uniform`` for floats; anything else -> a fixed ``value``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep, RangeSweep

    try:
        override = OverridesParser.create().parse_override(f"{key}={spec}")
    except Exception as err:  # Hydra's parser error says where the syntax broke
        raise LmforgeError(f"Search parameter {key}: cannot read '{spec}' ({str(err).splitlines()[0]}).") from err
    if not override.is_sweep_override():
        return {"value": override.value()}
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        return {"values": list(override.sweep_iterator())}
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(x, int) for x in (start, stop, step)):
            if step == 1:
                return {"distribution": "int_uniform", "min": start, "max": stop}
            return {"values": list(range(start, stop + 1, step))}
        return {"distribution": "q_uniform", "min": start, "max": stop, "q": step}
    if isinstance(value, IntervalSweep):  # Hydra reads interval bounds as floats, so Optuna samples floats
        distribution = "log_uniform_values" if "log" in value.tags else "uniform"
        return {"distribution": distribution, "min": value.start, "max": value.end}
    raise LmforgeError(f"Search parameter {key}: W&B sweeps have no equivalent of '{spec}'.")


def wandb_sweep_config(name: str, method: str = "bayes", conf_dir: Path | None = None) -> dict[str, Any]:
    """The W&B sweep config of ``hparams_search=<name>``: its base as fixed values, its search space,
    and the task's monitored metric (the best value a run saw, ``best_<monitor>`` in the run summary)."""
    from hydra import compose, initialize_config_dir

    from lmforge.config_dirs import CONF_DIR

    conf_dir = conf_dir or CONF_DIR
    base = search_base(name, conf_dir)
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name="train", overrides=base)
    monitor, mode = monitored(cfg)
    parameters = {k: wandb_parameter(k, v) for k, v in (o.split("=", 1) for o in base)}
    parameters.update({k: wandb_parameter(k, v) for k, v in search_params(name, conf_dir).items()})
    if method == "grid":
        continuous = [k for k, p in parameters.items() if "distribution" in p]
        if continuous:
            raise LmforgeError(f"W&B's grid method needs listed values, but {', '.join(continuous)} "
                               "are continuous; use --method bayes or random.")  # fmt: skip
    return {
        "name": name,
        "project": OmegaConf.select(cfg, "logger.wandb.project") or "lmforge",
        "program": "train.py",
        "method": method,
        "metric": {"name": f"best_{monitor}", "goal": "maximize" if mode == "max" else "minimize"},
        "parameters": parameters,
        "command": list(COMMAND),
    }


def write_wandb_sweep(name: str, method: str = "bayes", out: str | None = None) -> Path | None:
    """Write the W&B sweep file of ``hparams_search=<name>`` (``-``: to stdout) and say how to start it.

    Returns:
        the file written, None for stdout.
    """
    config = wandb_sweep_config(name, method)
    text = (
        f"# W&B sweep of hparams_search={name} (written by lmforge-sweep). Start it from the repository root:\n"
        f"#   wandb sweep <this file>   then   wandb agent <entity>/{config['project']}/<sweep id>\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    if out == "-":
        print(text, end="")
        return None
    path = Path(out or f"outputs/sweeps/{name}-wandb.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}\nnext: wandb sweep {path}   then, from the repository root: wandb agent <sweep id>")
    return path
