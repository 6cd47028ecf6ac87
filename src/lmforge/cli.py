"""Command-line entry points. ``train.py`` and ``lmforge-train`` both land in :func:`train`."""

from __future__ import annotations

import importlib
import logging
import sys

from lmforge.errors import LmforgeError
from lmforge.hydra_main import fail, hydra_main
from lmforge.overrides import quote_override_lists

log = logging.getLogger("lmforge")


def _run_command(config_name: str, target: str) -> None:
    """Run ``module:function`` on the composed ``conf/<config_name>.yaml``, importing it (torch, Lightning)
    only once the command line is known to be good."""

    def run(cfg):
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)(cfg)

    hydra_main(run, config_name)


def train() -> None:
    """Train a model on a task: ``lmforge-train model=gpt2-tiny task=tinyshakespeare [key=value ...]``.

    Every choice is a Hydra override of ``conf/train.yaml``; ``--cfg job`` prints the
    composed config and ``-m`` sweeps over comma-separated values (``hparams_search=<name>``:
    an Optuna search). Returns the monitored metric's best value, the objective of a sweeper.
    """

    def run(cfg):
        from lmforge import tracking
        from lmforge.experiments import sweeps
        from lmforge.rundirs.new import hydra_output_dir

        sweeps.start_job(cfg)
        named = hydra_output_dir()
        if named is not None and not cfg.paths.get("run_dir"):  # hydra.run.dir (or hydra.sweep.dir) is the run dir
            cfg.paths.run_dir = str(named)
        if "wandb" in (cfg.get("logger") or {}):
            tracking.prestart_wandb_service()
        # Heavy imports only after the config is known to be valid.
        from lmforge.rundirs.choose import command_line_overrides
        from lmforge.training import run_stages, run_training

        if cfg.get("stages"):
            records = run_stages(cfg, command_line_overrides())
        else:
            records = [run_training(cfg)]
        return sweeps.finish_job(cfg, records)

    hydra_main(run, "train")


def prepare() -> None:
    """Tokenize a run's corpus ahead of time: ``lmforge-prepare task=code tokenizer=bpe``.

    Takes the same overrides as ``lmforge-train``; trains the tokenizer when the run would, builds
    the token store of every split under ``paths.cache_dir`` with a progress bar, and prints their
    sizes. A later ``train.py`` with the same overrides starts from them at once.
    """

    _run_command("train", "lmforge.data.prepare:prepare_data")


def generate() -> None:
    """Sample text from a run's model: ``lmforge-generate run=<run dir> prompt="ROMEO:" max_new_tokens=200``;
    translate or summarise with a seq2seq run: ``lmforge-generate run=<run dir> text="A man is riding a bike."``.

    Options (``key=value``): checkpoint=best|last|<path>, num_samples, temperature, top_k,
    top_p, greedy=true, num_beams, length_penalty, repetition_penalty, no_repeat_ngram_size,
    sample=true (seq2seq), seed, use_cache, device; see conf/generate.yaml.
    """

    _run_command("generate", "lmforge.inference:generate_from_run")


def evaluate() -> None:
    """Score a run's checkpoint and write ``<run dir>/eval-<split>.json``: ``lmforge-evaluate run=<run dir>``.

    Each example's prediction (and its score, where one exists) goes to ``eval-<split>-predictions.jsonl``.

    Options (``key=value``): split=test|validation, task=<another task>, checkpoint=best|last|<path>,
    limit_batches; see conf/evaluate.yaml.
    """

    _run_command("evaluate", "lmforge.inference:evaluate_run")


def predict() -> None:
    """Label texts with a classification or tagging run: ``lmforge-predict run=<run dir> text="a witty film"``.

    Options (``key=value``): file=<txt: a text per line | jsonl: a ``text`` field per line>,
    output=<jsonl to write>, checkpoint=best|last|<path>, batch_size, device; see conf/predict.yaml.
    """

    _run_command("predict", "lmforge.inference:predict_from_run")


def serve() -> None:
    """Serve a run over an OpenAI-compatible HTTP API: ``lmforge-serve run=<run dir> port=8000``.

    Language models and seq2seq runs answer ``/v1/completions`` and ``/v1/chat/completions``;
    classifiers, taggers and question answering runs ``/v1/classify``, ``/v1/tag`` and
    ``/v1/answer``; ``model.pretrained=<folder>`` serves a Hugging Face GPT-2, T5 (generation) or
    BERT (``/v1/embeddings``) folder. Options: host, port, device, precision, max_batch_size,
    max_tokens, request_timeout_s, api_key (or LMFORGE_API_KEY); see conf/serve.yaml.
    """
    _run_command("serve", "lmforge.serve.server:serve")


def export() -> None:
    """Write a run as a Hugging Face model folder: ``lmforge-export run=<run dir> out=<folder>``.

    The folder (config.json, model.safetensors, tokenizer, model card) loads with
    ``transformers``' ``AutoModelFor...from_pretrained``. Options: checkpoint=best|last|<path>;
    see conf/export.yaml.
    """

    def run(cfg):
        from lmforge.hub.export import export_run

        export_run(cfg.run, cfg.out, cfg.checkpoint)

    hydra_main(run, "export")


def reproduce() -> None:
    """Train a run again from its saved config and compare: ``lmforge-reproduce run=<run dir>``.

    The new run (same config, same seed) gets its own run dir, with ``reproduce.json``: each final
    metric and the final weights, original against reproduced, and notes on what differs in git,
    uncommitted changes, package versions or hardware. Exit status 1 when they do not match.
    Options: tolerance=<largest absolute difference> (default 0 on the CPU), device=cpu|gpu,
    paths.output_root, data_dir; nothing else can change. See conf/reproduce.yaml.
    """
    from lmforge.experiments.reproduce import check_options

    try:
        check_options(sys.argv[1:])
    except LmforgeError as err:
        fail(err)

    _run_command("reproduce", "lmforge.experiments.reproduce:reproduce_run")


def benchmark() -> None:
    """Train a benchmark suite and write its report: ``lmforge-benchmark suite=<name>``.

    Each (run, seed) of ``conf/suite/<name>.yaml`` trains in turn; its record goes to
    ``<out>/results.jsonl`` and the table and plots to ``<out>/report.md``. Run again, it skips
    what is recorded. Options: seeds=[..], only=[run,..], out=<dir>, threads=<n>, extra=[key=value,..],
    rerun=true; see conf/benchmark.yaml.
    """

    sys.argv[1:] = quote_override_lists(sys.argv[1:])
    _run_command("benchmark", "lmforge.experiments.benchmark:run_suite")


def report(argv: list[str] | None = None) -> None:
    """Re-render benchmark reports from their records: ``lmforge-report <report dir> [...] [--results-md FILE]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="lmforge-report", description=report.__doc__)
    parser.add_argument("folders", nargs="+", help="report folders of lmforge-benchmark (with results.jsonl)")
    parser.add_argument("--results-md", help="a markdown file whose section of each suite is rewritten")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from lmforge.experiments.report import render

        for path in render(args.folders, args.results_md):
            print(path)
    except LmforgeError as err:
        fail(err)


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
        from lmforge.experiments.wandb_sweep import write_wandb_sweep

        write_wandb_sweep(args.name, args.method, args.out)
    except LmforgeError as err:
        fail(err)


if __name__ == "__main__":
    train()
