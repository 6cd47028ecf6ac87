"""``task/source=instruct-mixture``: instruction-tuning conversations built offline from the local mirror's tasks.

Five tasks, each read through its own data source (so their held-out splits stay held out: a
conversation of the mixture's validation or test split comes from that task's validation or test
split), each example phrased by one of a few instructions:

- sentiment (SST-2): the review -> ``positive`` / ``negative``;
- dialogue summarization (SAMSum): the dialogue -> its summary;
- translation (Multi30k en->de): the English sentence -> the German one;
- extractive QA (SQuAD, split by article): the paragraph and the question -> the first answer;
- entities as text (CoNLL-2003): the sentence -> one ``TYPE: words`` line per entity, or ``none``.

Every conversation keeps its ``task``, so the suite can score each task with its own metric.
"""

from __future__ import annotations

import json
import random

from lmforge.errors import LmforgeError

TASKS = ("sst2", "samsum", "multi30k", "squad", "conll2003")
PHRASINGS = {
    "sst2": ["Is the sentiment of this review positive or negative?\n\n{text}",
             "Review: {text}\nPositive or negative?",
             "Classify the sentiment (positive or negative) of: {text}"],
    "samsum": ["Summarize this dialogue:\n\n{source}",
               "{source}\n\nWhat is this conversation about? Answer in one or two sentences.",
               "Write a short summary of the chat below.\n\n{source}"],
    "multi30k": ["Translate into German:\n\n{source}",
                 "English: {source}\nGerman:",
                 "How do you say this in German? {source}"],
    "squad": ["Answer the question from the text.\n\nText: {context}\n\nQuestion: {question}",
              "{context}\n\nQ: {question}\nA (a span of the text):",
              "Read the paragraph and answer briefly.\n{context}\nQuestion: {question}"],
    "conll2003": ["List the named entities in this sentence, one per line as TYPE: words.\n\n{sentence}",
                  "Sentence: {sentence}\nEntities (PER, LOC, ORG, MISC):",
                  "Which people, places, organisations and other names does this mention?\n{sentence}"],
}  # fmt: skip


class InstructMixture:
    """The mixture as lines of JSON conversations, in the shape :class:`lmforge.data.chat.ChatFile` gives.

    Args:
        name: the task's name, for messages.
        tasks: which of :data:`TASKS` to mix.
        train_per_task: training conversations drawn from each task's training split (all when smaller).
        eval_per_task: validation and test conversations from each task's held-out splits.
        seed: the draw and the phrasings.
    """

    def __init__(self, name: str = "instruct-mixture", tasks=TASKS, train_per_task: int = 2000,
                 eval_per_task: int = 200, seed: int = 0):  # fmt: skip
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise LmforgeError(
                f"task.source.tasks: {', '.join(unknown)} not in the mixture; it knows {', '.join(TASKS)}."
            )
        self.name, self.tasks, self.seed = name, list(tasks), seed
        self.sizes = {"train": train_per_task, "validation": eval_per_task, "test": eval_per_task}

    def load(self, data_dir: str | None, required: tuple[str, ...] = ("train", "validation")) -> dict[str, list]:
        """Split name -> lines ``(origin, number, JSON conversation)``, the tasks interleaved by the seed."""
        from lmforge.data.task_splits import read_task_splits

        splits: dict[str, list] = {"train": [], "validation": [], "test": []}
        for task in self.tasks:
            tables, source, _ = read_task_splits(task, data_dir)
            for split, lines in splits.items():
                rng, rows = self.draw(task, split, len(tables[split]))
                for i in rows:
                    record = _conversation(task, tables[split][i], source, rng)
                    lines.append((f"{self.name}/{task}/{split}", i + 1, json.dumps(record, ensure_ascii=False)))
        for split, lines in splits.items():
            random.Random(f"{self.seed}-{split}").shuffle(lines)
        return splits

    def draw(self, task: str, split: str, size: int) -> tuple[random.Random, list[int]]:
        """The rows of ``task``'s ``split`` (of ``size``) that the mixture phrases, and the generator that
        goes on to choose their phrasings."""
        rng = random.Random(f"{self.seed}-{task}-{split}")
        return rng, sorted(rng.sample(range(size), min(self.sizes[split], size)))

    def training_text(self, splits: dict) -> str:
        """The text of every training conversation (to train a tokenizer on, when the run builds one)."""
        return "\n".join(m["content"] for _, _, line in splits["train"] for m in json.loads(line)["messages"])

    def data_arguments(self) -> dict:
        return {}


def _conversation(task: str, row: dict, source, rng: random.Random) -> dict:
    """One example of ``task`` as ``{"task", "messages": [user, assistant]}``."""
    fields, answer = _fields_and_answer(task, row, source)
    prompt = rng.choice(PHRASINGS[task]).format(**fields)
    return {"task": task, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def entity_lines(words: list[str], tags: list[str]) -> str:
    """The ``TYPE: words`` line of each entity of a tagged sentence, or ``none``."""
    from seqeval.metrics.sequence_labeling import get_entities

    return "\n".join(f"{kind}: {' '.join(words[start : end + 1])}" for kind, start, end in get_entities(tags)) or "none"


def reference_reply(task: str, row: dict, source) -> str:
    """The reply a conversation built from ``task``'s ``row`` ends with."""
    return _fields_and_answer(task, row, source)[1]


def _fields_and_answer(task: str, row: dict, source) -> tuple[dict, str]:
    if task == "sst2":
        return {"text": row["text"]}, "positive" if int(row["label"]) == 1 else "negative"
    if task in ("samsum", "multi30k"):
        return {"source": row["source"].replace("\r\n", "\n")}, row["target"].strip()
    if task == "squad":
        return {"context": row["context"], "question": row["question"]}, row["answers"]["text"][0]
    words = row["tokens"]
    return {"sentence": " ".join(words)}, entity_lines(words, [source.tag_names[t] for t in row["tags"]])
