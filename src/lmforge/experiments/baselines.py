"""A suite's baseline rows: trivial methods (no training) run on the suite task's own validation and
test splits, read by the task's data source and scored by the task's metric code, so that their numbers
sit beside the trained rows' as equals. A suite declares them beside its runs:

    task: samsum                       # conf/task/<name>.yaml: the splits and metrics the baselines use
    baselines:
      lead-3: {method: lead, n: 3}     # a row name -> a method of METHODS and its parameters
      longest-3: {method: longest, n: 3}

A suite of several tasks (``instruct``) needs no ``task:``: its method scores every task itself
(:data:`MIXTURE_METHODS`), as ``rules: {method: task-rules, seed: 1337}``.

Each becomes one record (``"kind": "baseline"``, no seed, no training figures) in the suite's
``results.jsonl``; ``lmforge-benchmark`` computes the missing ones before any training.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.experiments import baseline_methods as bm
from lmforge.experiments.instruct import rule_scores
from lmforge.experiments.report import BASELINE, RESULTS_FILE, read_records

log = logging.getLogger("lmforge")


@dataclass
class TaskData:
    """A suite task's splits as its data source reads them (Arrow tables), and what its metric code needs."""

    splits: dict[str, Any]
    metrics: tuple[str, ...] = ()  # seq2seq scores (task.module.metrics)
    tag_names: list[str] | None = None
    num_classes: int | None = None
    val_limit: int | None = None  # validation pairs a seq2seq task scores (task.module.val_generate_limit)


# -- one function per method: (task data, the rows of a split, parameters) -> a prediction per row --------


def _lead(data: TaskData, rows, n: int = 3) -> list[str]:
    return [bm.lead(dialogue, n) for dialogue in rows["source"]]


def _longest(data: TaskData, rows, n: int = 3) -> list[str]:
    return [bm.longest(dialogue, n) for dialogue in rows["source"]]


def _copy_source(data: TaskData, rows) -> list[str]:
    return list(rows["source"])


def _majority(data: TaskData, rows) -> list[int]:
    return [bm.majority_label(data.splits["train"]["label"])] * len(rows)


def _dictionary(data: TaskData, rows) -> list[list[str]]:
    train = data.splits["train"]
    names = data.tag_names or []
    dictionary = bm.entity_dictionary(train["tokens"], [[names[t] for t in row] for row in train["tags"]])
    return [bm.dictionary_tags(words, dictionary) for words in rows["tokens"]]


def _sliding_window(data: TaskData, rows) -> list[str]:
    return [bm.sliding_window_answer(c, q) for c, q in zip(rows["context"], rows["question"], strict=True)]


def _best_sentence(data: TaskData, rows) -> list[str]:
    return [bm.best_sentence(c, a["text"]) for c, a in zip(rows["context"], rows["answers"], strict=True)]


# -- scoring: the metric code of the tasks, named as the tasks log it ---------------------------------


def score_texts(data: TaskData, predictions: list[str], rows) -> dict[str, float]:
    """The seq2seq task's scores (sacreBLEU, chrF, torchmetrics ROUGE) against the split's targets."""
    from lmforge.tasks.text_metrics import text_scores

    return text_scores(predictions, list(rows["target"]), data.metrics)


def score_labels(data: TaskData, predictions: list[int], rows) -> dict[str, float]:
    """The classification task's accuracy (micro) and F1 (macro over the classes), as fractions."""
    import torch
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    preds, target = torch.tensor(predictions), torch.tensor(rows["label"])
    n = data.num_classes or int(max(preds.max(), target.max())) + 1
    return {
        "acc": float(MulticlassAccuracy(n, average="micro")(preds, target)),
        "f1": float(MulticlassF1Score(n, average="macro")(preds, target)),
    }


def score_entities(data: TaskData, predictions: list[list[str]], rows) -> dict[str, float]:
    """The tagging task's entity precision, recall and F1 (seqeval through :class:`EntityScores`)."""
    from lmforge.tasks.entity_metrics import EntityScores

    names = data.tag_names or []
    index = {tag: i for i, tag in enumerate(names)}
    metric = EntityScores(names)
    metric.update([[index[tag] for tag in row] for row in predictions], list(rows["tags"]))
    return {key: float(value) for key, value in metric.compute().items()}


def score_answers(data: TaskData, predictions: list[str], rows) -> dict[str, float]:
    """The question answering task's exact match and F1 (torchmetrics' SQuAD v1.1 scoring), in percent."""
    from torchmetrics.text import SQuAD

    metric = SQuAD()
    ids = list(rows["id"])
    metric.update(
        [{"prediction_text": text, "id": i} for text, i in zip(predictions, ids, strict=True)],
        [{"answers": {"text": a["text"], "answer_start": [0] * len(a["text"])}, "id": i}
         for a, i in zip(rows["answers"], ids, strict=True)],
    )  # fmt: skip
    scores = metric.compute()
    return {"em": float(scores["exact_match"]), "f1": float(scores["f1"])}


@dataclass(frozen=True)
class Method:
    """A baseline method: what it predicts, how the task scores that, and the columns it reads."""

    predict: Callable[..., list]
    score: Callable[[TaskData, list, Any], dict[str, float]]
    columns: tuple[str, ...]


_PAIRS, _QUESTIONS = ("source", "target"), ("id", "context", "question", "answers")
METHODS: dict[str, Method] = {
    "lead": Method(_lead, score_texts, _PAIRS),  # the first n utterances (SAMSum's Lead-3)
    "longest": Method(_longest, score_texts, _PAIRS),  # the n longest utterances, in order (Longest-3)
    "copy-source": Method(_copy_source, score_texts, _PAIRS),  # the source as its own translation
    "majority": Method(_majority, score_labels, ("label",)),  # the training split's most frequent class
    "dictionary": Method(_dictionary, score_entities, ("tokens", "tags")),  # training entity strings
    "sliding-window": Method(_sliding_window, score_answers, _QUESTIONS),  # Rajpurkar et al. 2016
    "best-sentence": Method(_best_sentence, score_answers, _QUESTIONS),  # the oracle sentence
}


# Methods for the instruction mixture: each scores the held-out conversations of every task itself.
MIXTURE_METHODS: dict[str, Callable[..., dict[str, float]]] = {
    "task-rules": rule_scores,  # each task's simplest rule (experiments/instruct.py: task_rule)
}


@dataclass
class SuiteBaseline:
    """One declared baseline row: its name, its method and the method's parameters."""

    name: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def spec(self, task: str) -> dict[str, Any]:
        """What the row is computed from (kept in its record: a changed spec computes it again)."""
        return {"task": task, "method": self.method, **self.params}


def parse_baselines(node: dict[str, Any] | None, task: str | None, suite: str, runs: list[str]) -> list[SuiteBaseline]:
    """Check a suite's ``baselines:`` mapping (row name -> ``{method: ..., <parameters>}``, or the method's name
    alone) and its ``task:``."""
    if not node:
        return []
    from lmforge.config_dirs import config_choices

    if task and task not in config_choices("task"):
        raise LmforgeError(f"Suite {suite}: task '{task}' is not one of {', '.join(config_choices('task'))}.")
    baselines = []
    for name, spec in node.items():
        params = dict(spec) if isinstance(spec, dict) else {"method": spec}  # `majority-class: majority` too
        method = str(params.pop("method", ""))
        if method not in METHODS and method not in MIXTURE_METHODS:
            methods = ", ".join([*METHODS, *MIXTURE_METHODS])
            raise LmforgeError(f"Suite {suite}, baseline {name}: unknown method '{method}'; the methods are {methods}.")
        if method in METHODS and not task:
            raise LmforgeError(
                f"Suite {suite}, baseline {name} reads a task, but the suite names none: set `task:` to the "
                "conf/task name its baselines read."
            )
        if method in MIXTURE_METHODS:  # the data dir is the environment's, as for the trained rows
            accepted = [p for p in inspect.signature(MIXTURE_METHODS[method]).parameters if p != "data_dir"]
        else:
            accepted = list(inspect.signature(METHODS[method].predict).parameters)[2:]  # those after (data, rows)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
            raise LmforgeError(
                f"Suite {suite}, baseline {name}: method {method} has no parameter {unknown[0]} ({takes})."
            )
        if name in runs:
            raise LmforgeError(f"Suite {suite}: '{name}' names both a run and a baseline; rename one of them.")
        baselines.append(SuiteBaseline(str(name), method, params))
    return baselines


def load_task_data(task: str) -> TaskData:
    """Read a task's train, validation and test splits through its own data source (``task=<task>``)."""
    from lmforge.data.task_splits import read_task_splits

    splits, source, cfg = read_task_splits(task)
    module = cfg.task.get("module") or {}
    labels = getattr(source, "label_names", None)
    return TaskData(
        splits=splits,
        metrics=tuple(module.get("metrics") or ()),
        tag_names=getattr(source, "tag_names", None),
        num_classes=len(labels) if labels else None,
        val_limit=module.get("val_generate_limit"),
    )


def baseline_metrics(baseline: SuiteBaseline, data: TaskData, where: str) -> dict[str, float]:
    """A baseline's scores on the validation split (also as ``best_val/``: there is nothing to choose) and
    the test split, under the names the trained rows' metrics have."""
    method = METHODS[baseline.method]
    metrics: dict[str, float] = {}
    for split, prefix in (("validation", "val"), ("test", "test")):
        rows = data.splits[split]
        missing = [c for c in method.columns if c not in rows.column_names]
        if missing:
            raise LmforgeError(
                f"{where}: method {baseline.method} reads {', '.join(method.columns)}, but the task's rows "
                f"hold {', '.join(rows.column_names)}; give the baseline a method of this kind of task."
            )
        if prefix == "val" and data.val_limit:  # the pairs the trained rows' validation scores
            rows = rows.select(range(min(int(data.val_limit), len(rows))))
        scores = method.score(data, method.predict(data, rows, **baseline.params), rows)
        metrics.update({f"{prefix}/{key}": round(value, 6) for key, value in scores.items()})
    metrics.update({f"best_{key}": value for key, value in metrics.items() if key.startswith("val/")})
    return metrics


def run_baselines(suite, baselines: list[SuiteBaseline], out: Path, rerun: bool = False) -> list[str]:
    """Compute and record each baseline of ``suite`` that has no record of the same spec (all with ``rerun``).

    Returns:
        the names of the baselines that failed (each logged with its one-sentence reason).
    """
    from lmforge.tracking import append_result, git_state, hardware, package_versions

    done = {r["run"]: r for r in read_records(out) if r.get("kind") == BASELINE}
    todo = [b for b in baselines if rerun or done.get(b.name, {}).get("baseline") != b.spec(suite.task)]
    for b in baselines:
        if b not in todo:
            log.info("baseline %s: recorded already (rerun=true computes it again)", b.name)
    failed: list[str] = []
    data = None  # read once, when a baseline needs it
    for baseline in todo:
        start = time.perf_counter()
        try:
            if baseline.method in MIXTURE_METHODS:
                metrics = MIXTURE_METHODS[baseline.method](**baseline.params)
            else:
                if data is None:
                    data = load_task_data(suite.task)
                metrics = baseline_metrics(baseline, data, f"Suite {suite.name}, baseline {baseline.name}")
        except LmforgeError as err:
            log.error("baseline %s failed: %s", baseline.name, err)
            failed.append(baseline.name)
            continue
        record = {
            "suite": suite.name, "run": baseline.name, "seed": None, "kind": BASELINE, "report": True,
            "baseline": baseline.spec(suite.task), "metrics": metrics, "compute_s": round(time.perf_counter() - start, 1),
            "finished_at": datetime.now().isoformat(timespec="seconds"), **git_state(),
            "versions": package_versions(), "hardware": hardware(),
        }  # fmt: skip
        append_result(out / RESULTS_FILE, record)
        log.info("baseline %s: %s %s", baseline.name, suite.metric, metrics.get(suite.metric))
    return failed
