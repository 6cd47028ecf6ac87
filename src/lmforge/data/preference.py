"""Preference pairs (``task=dpo``): a prompt with a chosen and a rejected reply, from JSON lines.

Each line is ``{"prompt", "chosen", "rejected"}``; the prompt is a text (one user message) or a list
of messages. Both replies are rendered after the prompt by the run's chat template, as in
``task=sft``, and labelled where the reply is; a batch holds every pair's chosen conversation and
then its rejected one, so that one forward pass scores both.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from lmforge.data.chat import ChatDataModule, InvalidConversation, conversation, encode_conversation


class PreferenceDataModule(ChatDataModule):
    """Batches ``(input_ids, labels)`` of 2B rows: the B chosen conversations, then the B rejected ones.

    Takes the arguments of :class:`~lmforge.data.chat.ChatDataModule` (``train_on`` is always the replies).
    """

    size_unit = "pairs"
    can_pack = False  # a batch's rows pair up: chosen i with rejected i

    def encode_record(self, record, tokenizer: Tokenizer, train_on: str) -> tuple:
        """One line's (chosen ids, chosen labels, rejected ids, rejected labels)."""
        if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
            raise InvalidConversation('needs "prompt", "chosen" and "rejected"')
        if not all(isinstance(record[k], str) for k in ("chosen", "rejected")):
            raise InvalidConversation('"chosen" and "rejected" are not both texts')
        if record["chosen"].strip() == record["rejected"].strip():
            raise InvalidConversation("chosen and rejected are the same text, so nothing is preferred")
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        pair = []
        for reply in (record["chosen"], record["rejected"]):
            turns = conversation({"messages": [*messages, {"role": "assistant", "content": reply}]})
            pair += encode_conversation(self.template, tokenizer, turns, self.block_size, "assistant")
        return tuple(pair)

    def training_lengths(self) -> list[int]:
        return [max(len(example[0]), len(example[2])) for example in self.examples["train"]]

    def collate(self, batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of the chosen conversations followed by the rejected ones."""
        rows = [(c, cl) for c, cl, _, _ in batch] + [(r, rl) for _, _, r, rl in batch]
        return super().collate(rows)


class SummaryPairs:
    """``task/source=samsum-pairs``: preference pairs built offline from a summarization task's splits.

    For each dialogue, its reference summary is chosen over the summary of another dialogue of the same
    split (drawn by the seed): a pair whose preference a model can only learn by reading the dialogue.

    Args:
        name: the task's name, for messages.
        task: the summarization task whose splits are read (``samsum``; any task with source/target columns).
        instruction: what the prompt says before the dialogue.
        per_split: the most pairs per split (None: one per example).
        seed: the draw of the rejected summaries and of the examples.
    """

    def __init__(self, name: str = "dpo", task: str = "samsum", instruction: str = "Summarize this dialogue:",
                 per_split: int | None = None, seed: int = 0):  # fmt: skip
        self.name, self.task, self.instruction, self.per_split, self.seed = name, task, instruction, per_split, seed

    def load(self, data_dir: str | None, required: tuple[str, ...] = ("train", "validation")) -> dict[str, list]:
        """Split name -> lines ``(origin, number, JSON pair)``."""
        import json
        import random

        from lmforge.data.task_splits import read_task_splits

        tables, _, _ = read_task_splits(self.task, data_dir, required=("train", "validation"))
        splits = {}
        for split, table in tables.items():
            rng = random.Random(f"{self.seed}-{split}")
            sources, targets = list(table["source"]), [t.strip() for t in table["target"]]
            rows = range(len(sources)) if self.per_split is None else \
                sorted(rng.sample(range(len(sources)), min(self.per_split, len(sources))))  # fmt: skip
            lines = []
            for i in rows:
                other = (i + 1 + rng.randrange(len(targets) - 1)) % len(targets)
                if targets[other] == targets[i] or not targets[i]:
                    continue  # no preference to learn
                pair = {"prompt": f"{self.instruction}\n{sources[i].strip()}", "chosen": targets[i],
                        "rejected": targets[other]}  # fmt: skip
                lines.append((f"{self.name}/{self.task}/{split}", i + 1, json.dumps(pair, ensure_ascii=False)))
            splits[split] = lines
        return splits

    def training_text(self, splits: dict) -> str:
        """Prompts and summaries (to train a tokenizer on, when the run builds one)."""
        import json

        return "\n".join(" ".join(json.loads(line).values()) for _, _, line in splits["train"])

    def data_arguments(self) -> dict:
        return {}
