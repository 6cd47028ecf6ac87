"""Command-line entry points. ``train.py`` and ``lmforge-train`` both land in :func:`train`."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.config_dirs import CONF_DIR, config_dirs, is_group, option_names, use_user_config_dirs
from lmforge.errors import LmforgeError, sentence
from lmforge.failures import failure_sentence

log = logging.getLogger("lmforge")


def config_choices(group: str, conf_dir: Path | None = None) -> list[str]:
    """The names a user can give a config group (file names in ``<config dir>/<group>/`` without ``.yaml``,
    lmforge's and the user's; for ``hydra/...`` groups also those of Hydra and its installed plugins,
    such as ``hydra/launcher=joblib``)."""
    names = option_names(group, [conf_dir] if conf_dir else None)
    if group.startswith("hydra/"):
        names.update(_registered_choices(group))
    return sorted(names)


def _registered_choices(group: str) -> list[str]:
    """Config names that Hydra and its plugins register in code (ConfigStore) for ``group``."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the installed hydra_plugins.*, which register their configs
    node = ConfigStore.instance().repo
    for part in group.split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return [name.removesuffix(".yaml") for name in node if name.endswith(".yaml")]


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
                if key.startswith("hydra/") and name in _registered_choices(key):
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

    for key in _value_override_keys(overrides, conf_dir):
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


def _value_override_keys(overrides: list[str], conf_dir: Path | None = None) -> list[str]:
    """The keys of ``key=value`` overrides, leaving out group choices (``model=...``) and Hydra's own keys."""
    dirs = [conf_dir] if conf_dir else config_dirs()
    keys = []
    for arg in overrides:
        key, sep, _ = arg.partition("=")
        key = key.lstrip("+~").strip()
        if sep and key and not key.startswith("hydra") and "/" not in key and not is_group(key, dirs):
            keys.append(key)
    return keys


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


def _fail(err: BaseException) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    from lmforge.distributed import is_rank_zero

    if is_rank_zero() or not getattr(err, "every_rank", False):
        print(f"error: {err}", file=sys.stderr)
    sys.exit(1)


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """Set (or, for None, remove) an environment variable for the duration of a block."""
    before = os.environ.get(name)
    _set_environment(name, value)
    try:
        yield
    finally:
        _set_environment(name, before)


def _set_environment(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _hydra_entry(task_function: Callable[[Any], Any], config_name: str) -> None:
    """Run a Hydra main function, turning user errors into one sentence and exit status 1."""
    import hydra

    from lmforge.distributed import COMMAND_VAR
    from lmforge.sweeps import single_job_argv

    command = os.environ.get(COMMAND_VAR) or shlex.join(sys.argv)  # set: a DDP rank or job of this command
    sys.argv = single_job_argv(sys.argv)  # a DDP rank > 0 of a sweep job runs that job alone
    try:
        check_group_choices(sys.argv[1:])
    except LmforgeError as err:
        _fail(err)
    sys.argv[1:] = quote_free_text(sys.argv[1:])

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    full_error = os.environ.get("HYDRA_FULL_ERROR")
    use_user_config_dirs()

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def main(cfg):
        # The job (and the DDP ranks it starts) sees the user's setting; see below.
        with _environment("HYDRA_FULL_ERROR", full_error):
            try:
                _check_job_overrides(cfg, config_name)
                return task_function(cfg)
            except LmforgeError as err:
                _fail(err)
            except (HydraException, OmegaConfBaseException) as err:  # an interpolation, a target that fails
                target_failed = "Error in call to target" in str(err)
                _fail(LmforgeError(_failure(err, cfg) if target_failed else hydra_error_sentence(err)))
            except Exception as err:  # anything else a value of the config set off, deep in a library
                if full_error == "1":
                    raise
                _fail(LmforgeError(_failure(err, cfg)))

    # Hydra prints its own errors (a typo'd key, a bad override) over several lines unless this is
    # set; set, it raises them here, where they become one sentence like ours.
    with _environment("HYDRA_FULL_ERROR", "1"), _environment(COMMAND_VAR, command):
        try:
            main()
            return
        except (HydraException, OmegaConfBaseException) as err:
            if full_error == "1":
                raise
            error = LmforgeError(hydra_error_sentence(err))
    _fail(error)


def _failure(err: BaseException, cfg: Any) -> str:
    """:func:`failure_sentence` for an error of the current Hydra job, with its value overrides as suspects."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    keys = set(_value_override_keys(overrides))
    return failure_sentence(err, cfg, [o for o in overrides if o.partition("=")[0].lstrip("+~") in keys])


def _check_job_overrides(cfg: Any, config_name: str) -> None:
    """Check the value types of the current Hydra job's ``key=value`` overrides against their defaults."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    value_keys = set(_value_override_keys(overrides))
    if not value_keys - set(TEXT_OR_NUMBER_KEYS):
        return
    groups = [o for o in overrides if o.partition("=")[0].lstrip("+~").strip() not in value_keys]
    groups = [o for o in groups if not o.lstrip("+~").startswith("hydra")]
    check_override_types(cfg, compose(config_name=config_name, overrides=groups), overrides)


def train() -> None:
    """Train a model on a task: ``lmforge-train model=gpt2-tiny task=tinyshakespeare [key=value ...]``.

    Every choice is a Hydra override of ``conf/train.yaml``; ``--cfg job`` prints the
    composed config and ``-m`` sweeps over comma-separated values (``hparams_search=<name>``:
    an Optuna search). Returns the monitored metric's best value, the objective of a sweeper.
    """

    def run(cfg):
        from lmforge import sweeps, tracking

        sweeps.start_job(cfg)
        named = tracking.hydra_output_dir()
        if named is not None and not cfg.paths.get("run_dir"):  # hydra.run.dir (or hydra.sweep.dir) is the run dir
            cfg.paths.run_dir = str(named)
        if "wandb" in (cfg.get("logger") or {}):
            _prestart_wandb()
        # Heavy imports only after the config is known to be valid.
        from lmforge.training import command_line_overrides, run_stages, run_training

        if cfg.get("stages"):
            records = run_stages(cfg, command_line_overrides())
        else:
            records = [run_training(cfg)]
        return sweeps.finish_job(cfg, records)

    _hydra_entry(run, "train")


def prepare() -> None:
    """Tokenize a run's corpus ahead of time: ``lmforge-prepare task=code tokenizer=bpe``.

    Takes the same overrides as ``lmforge-train``; trains the tokenizer when the run would, builds
    the token store of every split under ``paths.cache_dir`` with a progress bar, and prints their
    sizes. A later ``train.py`` with the same overrides starts from them at once.
    """

    def run(cfg):
        from lmforge.prepare import prepare_data

        prepare_data(cfg)

    _hydra_entry(run, "train")


def _prestart_wandb() -> None:
    """Start W&B's background service while Lightning imports (it mostly waits on a subprocess)."""
    import threading

    def setup() -> None:
        try:
            import wandb

            wandb.setup()
        except Exception:  # the run itself reports W&B problems; this is only a head start
            pass

    threading.Thread(target=setup, daemon=True).start()


def generate() -> None:
    """Sample text from a run's model: ``lmforge-generate run=<run dir> prompt="ROMEO:" max_new_tokens=200``;
    translate or summarise with a seq2seq run: ``lmforge-generate run=<run dir> text="A man is riding a bike."``.

    Options (``key=value``): checkpoint=best|last|<path>, num_samples, temperature, top_k,
    top_p, greedy=true, num_beams, length_penalty, repetition_penalty, no_repeat_ngram_size,
    sample=true (seq2seq), seed, use_cache, device; see conf/generate.yaml.
    """

    def run(cfg):
        from lmforge.inference import generate_from_run

        generate_from_run(cfg)

    _hydra_entry(run, "generate")


def evaluate() -> None:
    """Score a run's checkpoint and write ``<run dir>/eval-<split>.json``: ``lmforge-evaluate run=<run dir>``.

    Each example's prediction (and its score, where one exists) goes to ``eval-<split>-predictions.jsonl``.

    Options (``key=value``): split=test|validation, task=<another task>, checkpoint=best|last|<path>,
    limit_batches; see conf/evaluate.yaml.
    """

    def run(cfg):
        from lmforge.inference import evaluate_run

        evaluate_run(cfg)

    _hydra_entry(run, "evaluate")


def predict() -> None:
    """Label texts with a classification or tagging run: ``lmforge-predict run=<run dir> text="a witty film"``.

    Options (``key=value``): file=<txt: a text per line | jsonl: a ``text`` field per line>,
    output=<jsonl to write>, checkpoint=best|last|<path>, batch_size, device; see conf/predict.yaml.
    """

    def run(cfg):
        from lmforge.inference import predict_from_run

        predict_from_run(cfg)

    _hydra_entry(run, "predict")


def export() -> None:
    """Write a run as a Hugging Face model folder: ``lmforge-export run=<run dir> out=<folder>``.

    The folder (config.json, model.safetensors, tokenizer, model card) loads with
    ``transformers``' ``AutoModelFor...from_pretrained``. Options: checkpoint=best|last|<path>;
    see conf/export.yaml.
    """

    def run(cfg):
        from lmforge.export import export_run

        export_run(cfg.run, cfg.out, cfg.checkpoint)

    _hydra_entry(run, "export")


def reproduce() -> None:
    """Train a run again from its saved config and compare: ``lmforge-reproduce run=<run dir>``.

    The new run (same config, same seed) gets its own run dir, with ``reproduce.json``: each final
    metric and the final weights, original against reproduced, and notes on what differs in git,
    uncommitted changes, package versions or hardware. Exit status 1 when they do not match.
    Options: tolerance=<largest absolute difference> (default 0 on the CPU), device=cpu|gpu,
    paths.output_root, data_dir; nothing else can change. See conf/reproduce.yaml.
    """
    from lmforge.reproduce import check_options

    try:
        check_options(sys.argv[1:])
    except LmforgeError as err:
        _fail(err)

    def run(cfg):
        from lmforge.reproduce import reproduce_run

        reproduce_run(cfg)

    _hydra_entry(run, "reproduce")


def benchmark() -> None:
    """Train a benchmark suite and write its report: ``lmforge-benchmark suite=<name>``.

    Each (run, seed) of ``conf/suite/<name>.yaml`` trains in turn; its record goes to
    ``<out>/results.jsonl`` and the table and plots to ``<out>/report.md``. Run again, it skips
    what is recorded. Options: seeds=[..], only=[run,..], out=<dir>, threads=<n>, extra=[key=value,..],
    rerun=true; see conf/benchmark.yaml.
    """

    def run(cfg):
        from lmforge.benchmark import run_suite

        run_suite(cfg)

    sys.argv[1:] = quote_override_lists(sys.argv[1:])
    _hydra_entry(run, "benchmark")


def report(argv: list[str] | None = None) -> None:
    """Re-render benchmark reports from their records: ``lmforge-report <report dir> [...] [--results-md FILE]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="lmforge-report", description=report.__doc__)
    parser.add_argument("folders", nargs="+", help="report folders of lmforge-benchmark (with results.jsonl)")
    parser.add_argument("--results-md", help="a markdown file whose section of each suite is rewritten")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from lmforge.report import render

        for path in render(args.folders, args.results_md):
            print(path)
    except LmforgeError as err:
        _fail(err)


def sweep(argv: list[str] | None = None) -> None:
    """Write a search space for another sweep tool: ``lmforge-sweep wandb <hparams_search name>``.

    ``wandb``: a W&B sweep YAML (``--method bayes|random|grid``, ``--out <file>`` or ``-`` for
    stdout; default ``outputs/sweeps/<name>-wandb.yaml``) whose agent runs ``train.py key=value ...``.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="lmforge-sweep", description=sweep.__doc__)
    tools = parser.add_subparsers(dest="tool", required=True)
    wandb_args = tools.add_parser("wandb", help="a W&B sweep YAML from an hparams_search config")
    wandb_args.add_argument("name", help="an hparams_search config: conf/hparams_search/<name>.yaml")
    wandb_args.add_argument("--method", default="bayes", choices=["bayes", "random", "grid"])
    wandb_args.add_argument(
        "--out", help="the file to write, '-' for stdout (default outputs/sweeps/<name>-wandb.yaml)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from lmforge.wandb_sweep import write_wandb_sweep

        write_wandb_sweep(args.name, args.method, args.out)
    except LmforgeError as err:
        _fail(err)


if __name__ == "__main__":
    train()
