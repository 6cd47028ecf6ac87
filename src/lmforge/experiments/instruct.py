"""Scoring an instruction-tuned run task by task: replies generated for the mixture's held-out
conversations, each task scored by its own metric (``lmforge-evaluate`` on a ``task/source=instruct-mixture`` run).

The replies are greedy, at most ``max_new_tokens`` each, decoded together by the serving engine's
continuous batching (one KV-cache row per conversation). The metrics are those of the single-task
runs, so that the rows of the ``instruct`` suite compare:

- sst2: accuracy (the reply names the right label first);
- samsum: ROUGE-1/2/L F-measure; multi30k: sacreBLEU and chrF (lmforge's text metrics);
- squad: exact match and F1 (torchmetrics' SQuAD v1.1 scoring);
- conll2003: entity precision, recall and F1 over the ``TYPE: words`` lines, as (type, words) pairs.

:func:`rule_scores` gives the same scores to the simplest rule of each task (the suite's baseline row).

A training run on the mixture scores its test split at its end (the scores are in its record, the
replies in ``replies.jsonl``); ``lmforge-evaluate`` scores either held-out split of a saved run
(``eval-<split>-replies.jsonl``).
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from lmforge.data.instruct_mixture import TASKS
from lmforge.data.tokenizers import EOS
from lmforge.tracking import write_text_atomically


def generate_replies(backbone, tokenizer, template, conversations: list[list[dict]], max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:  # fmt: skip
    """The greedy reply to each conversation (its last message left out: that is the reference)."""
    from lmforge.serve.engine import GenerationEngine, Sampling, Sequence
    from lmforge.serve.text import IncrementalText

    engine = GenerationEngine(backbone.eval(), tokenizer.token_to_id(EOS), batch_size)
    replies, done = [""] * len(conversations), threading.Semaphore(0)

    def sink_for(i: int):
        def sink(kind: str, value) -> None:
            if kind == "text":
                replies[i] += value
            else:  # done or error: an error leaves the reply as it is
                done.release()

        return sink

    engine.start()
    limit = backbone.n_positions - max_new_tokens
    for i, messages in enumerate(conversations):
        prompt = template.render(messages[:-1], add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids[-limit:]  # the prompt's end, if it must be cut
        engine.submit(
            Sequence(ids, Sampling(max_new_tokens, temperature=0.0), i, IncrementalText(tokenizer), sink_for(i))
        )
    for _ in conversations:
        done.acquire()
    engine.close()
    return [reply.strip() for reply in replies]


def score_task(task: str, replies: list[str], references: list[str]) -> dict[str, float]:
    """``task``'s scores of the replies against the reference replies."""
    from lmforge.tasks.text_metrics import text_scores

    if task == "sst2":
        right = [r.lower().startswith(ref) for r, ref in zip(replies, references, strict=True)]
        return {"acc": 100 * sum(right) / len(right)}
    if task == "samsum":
        return text_scores(replies, references, ("rouge",))
    if task == "multi30k":
        return text_scores(replies, references, ("bleu", "chrf"))
    if task == "squad":
        from torchmetrics.text import SQuAD

        scores = SQuAD()(
            [{"prediction_text": r, "id": str(i)} for i, r in enumerate(replies)],
            [{"answers": {"text": [ref], "answer_start": [0]}, "id": str(i)} for i, ref in enumerate(references)],
        )
        return {"em": float(scores["exact_match"]), "f1": float(scores["f1"])}
    return _entity_scores(replies, references)


def _entity_scores(replies: list[str], references: list[str]) -> dict[str, float]:
    """Micro precision, recall and F1 (percent) of the (type, words) lines of each reply."""

    def entities(text: str) -> set[tuple[str, str]]:
        pairs = (line.split(": ", 1) for line in text.splitlines() if ": " in line)
        return {(kind.strip(), words.strip()) for kind, words in pairs}

    found = hit = gold = 0
    for reply, reference in zip(replies, references, strict=True):
        predicted, expected = entities(reply), entities(reference)
        found, gold, hit = found + len(predicted), gold + len(expected), hit + len(predicted & expected)
    precision, recall = hit / max(found, 1), hit / max(gold, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1}


def score_replies(
    backbone, tokenizer, cfg, datamodule, split: str, max_new_tokens: int = 64, replies_file: Path | None = None
) -> dict[str, float]:
    """Generate and score the replies to ``split``'s mixture conversations: ``<split>/<task>/<metric>`` -> score.

    Empty when the data module holds no such conversations: a user's chat file or preference pairs have no
    mixture ``task`` to score by. ``replies_file``, if given, gets a JSON line per conversation: ``task``,
    ``prompt`` (the last user message), ``reference`` and ``reply``, so that a score can be read example by example.
    """
    from lmforge.data.chat import run_chat_template

    by_task: dict[str, list[list[dict]]] = defaultdict(list)
    for _, _, line in getattr(datamodule, "lines", {}).get(split, []):
        record = json.loads(line)
        if record.get("task") in TASKS and "messages" in record:  # a mixture's conversation
            by_task[record["task"]].append(record["messages"])
    if not by_task:
        return {}
    template, scores, lines = run_chat_template(cfg), {}, []
    for task, conversations in sorted(by_task.items()):
        replies = generate_replies(backbone, tokenizer, template, conversations, max_new_tokens)
        references = [messages[-1]["content"] for messages in conversations]
        scores.update({f"{split}/{task}/{k}": round(v, 4) for k, v in score_task(task, replies, references).items()})
        lines += [{"task": task, "prompt": messages[-2]["content"], "reference": reference, "reply": reply}
                  for messages, reference, reply in zip(conversations, references, replies)]  # fmt: skip
    if replies_file is not None:
        write_text_atomically(replies_file, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return scores


def rule_scores(seed: int = 1337, eval_per_task: int = 200, data_dir: str | None = None) -> dict[str, float]:
    """``val/`` and ``test/<task>/<metric>`` of each task's simplest rule (:func:`task_rule`), replying to
    the held-out conversations that a mixture run of ``seed`` is scored on, scored as its replies are."""
    from lmforge.data.instruct_mixture import InstructMixture, reference_reply
    from lmforge.data.task_splits import read_task_splits

    mixture, scores = InstructMixture(eval_per_task=eval_per_task, seed=seed), {}
    for task in mixture.tasks:
        tables, source, _ = read_task_splits(task, data_dir)
        rule = task_rule(task, tables["train"], source)
        for split, prefix in (("validation", "val"), ("test", "test")):
            table = tables[split]
            rows = [table[i] for i in mixture.draw(task, split, len(table))[1]]
            replies, references = [rule(row) for row in rows], [reference_reply(task, row, source) for row in rows]
            scores.update(
                {f"{prefix}/{task}/{k}": round(v, 4) for k, v in score_task(task, replies, references).items()}
            )
    return scores


def task_rule(task: str, train, source) -> Callable[[dict], str]:
    """The reply of ``task``'s simplest rule to one of its rows, set up from its training split:

    - sst2: the majority label; samsum: Lead-3 (the first three utterances); multi30k: the English itself;
    - squad: the sliding window of Rajpurkar et al. 2016;
    - conll2003: longest-match lookup of the training entity strings, as ``TYPE: words`` lines.
    """
    from lmforge.data.instruct_mixture import entity_lines
    from lmforge.experiments import baseline_methods as bm

    if task == "sst2":
        label = "positive" if bm.majority_label(train["label"]) == 1 else "negative"
        return lambda row: label
    if task == "samsum":
        return lambda row: bm.lead(row["source"], 3)
    if task == "multi30k":
        return lambda row: row["source"]
    if task == "squad":
        return lambda row: bm.sliding_window_answer(row["context"], row["question"])
    names = source.tag_names
    known = bm.entity_dictionary(train["tokens"], [[names[t] for t in tags] for tags in train["tags"]])
    return lambda row: entity_lines(row["tokens"], bm.dictionary_tags(row["tokens"], known))
