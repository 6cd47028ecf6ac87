"""Instruction and chat tuning data (``task=sft``): conversations from JSON lines, rendered by the run's
chat template, with a loss on the assistant's tokens.

Each line of the file is one conversation, in one of three shapes:

- ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``;
- Alpaca: ``{"instruction", "input" (optional), "output"}``;
- Dolly: ``{"instruction", "context" (optional), "response"}``.

The last two become a user message (the instruction, then the input after a blank line) and an
assistant message. A line that cannot be used is one sentence naming the file and the line, or,
with ``task.data.skip_invalid=true``, skipped and counted.

Truncation: a conversation longer than ``block_size`` + 1 tokens keeps its first ``block_size`` + 1
tokens (the end is dropped, and with it the loss on what was cut). One whose first reply starts
beyond that is refused as too long: nothing of it would be learned.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge.data.chat_template import DEFAULT_SPECIAL_TOKENS, DEFAULT_TEMPLATE, ROLES, ChatTemplate
from lmforge.data.examples import ExampleDataModule
from lmforge.data.labels import IGNORE
from lmforge.data.tokenizers import EOS
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


class ChatFile:
    """Conversations from a JSON-lines file (``task.source.path``), with a held-out validation share.

    Args:
        name: the task's name, for messages.
        path: the training file (and validation, unless ``validation_path`` is given).
        validation_path: a file of validation conversations.
        holdout_fraction: the share of ``path``'s lines held out for validation (by a fixed seed).
        seed: the seed of that choice.
    """

    def __init__(self, name: str = "sft", path: str | None = None, validation_path: str | None = None,
                 holdout_fraction: float = 0.05, seed: int = 0):  # fmt: skip
        self.name, self.path, self.validation_path = name, path, validation_path
        self.holdout_fraction, self.seed = holdout_fraction, seed

    def load(self, data_dir: str | None, required: tuple[str, ...] = ("train", "validation")) -> dict[str, list]:
        """Split name -> its lines, each ``(file, line number, text)``."""
        if not self.path:
            raise LmforgeError("task=sft needs a file of conversations: task.source.path=chats.jsonl (JSON lines).")
        lines = _read_lines(self.path)
        if self.validation_path:
            return {"train": lines, "validation": _read_lines(self.validation_path)}
        order = list(range(len(lines)))
        random.Random(self.seed).shuffle(order)
        held = set(order[: max(1, round(len(lines) * self.holdout_fraction))]) if len(lines) > 1 else set()
        return {"train": [x for i, x in enumerate(lines) if i not in held],
                "validation": [x for i, x in enumerate(lines) if i in held] or lines[:1]}  # fmt: skip

    def training_text(self, splits: dict) -> str:
        """The text of every message (to train a tokenizer on, when the run builds one)."""
        texts = []
        for _, _, line in splits["train"]:
            try:
                texts += [m["content"] for m in conversation(json.loads(line))]
            except (ValueError, KeyError, TypeError):
                continue
        return "\n".join(texts)

    def data_arguments(self) -> dict:
        return {}


def _read_lines(path: str) -> list[tuple[str, int, str]]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise LmforgeError(f"task.source.path={path}: no such file.")
    with file.open(encoding="utf-8") as f:
        return [(str(file), n, line) for n, line in enumerate(f, 1) if line.strip()]


class InvalidConversation(ValueError):
    """A line that cannot be trained on; its message is the reason."""


def conversation(record) -> list[dict]:
    """The messages of one JSON record in any of the three shapes (see the module docstring)."""
    if not isinstance(record, dict):
        raise InvalidConversation("not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidConversation('"messages" is not a list of {"role", "content"} objects')
    elif "instruction" in record and ("output" in record or "response" in record):
        extra = record.get("input") or record.get("context") or ""
        prompt = f"{record['instruction']}\n\n{extra}" if extra else str(record["instruction"])
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": str(record.get("output", record.get("response")))}]  # fmt: skip
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": str(record["system"])})
    else:
        raise InvalidConversation('no "messages", nor "instruction" with "output" (Alpaca) or "response" (Dolly)')
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise InvalidConversation(f"message {i + 1} has role {message.get('role')!r}; roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise InvalidConversation(f"message {i + 1} has no text content")
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidConversation("no assistant message, so nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_conversation(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict], block_size: int,
                        train_on: str = "assistant") -> tuple[list[int], list[int]]:  # fmt: skip
    """Token ids of a conversation (at most ``block_size`` + 1) and the label of each: itself where it is
    learned (the assistant's replies, or everything with ``train_on="all"``), IGNORE elsewhere."""
    text, spans = template.with_replies(messages)
    if not spans:
        raise InvalidConversation("the chat template renders no assistant reply (task.data.chat_template)")
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = encoding.ids
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [
            t if any(s <= start < e for s, e in spans) else IGNORE for t, (start, _) in zip(ids, encoding.offsets)
        ]
    first = next((i for i, label in enumerate(labels) if label != IGNORE), None)
    if first is None:
        raise InvalidConversation("the chat template renders no assistant reply (task.data.chat_template)")
    if first > block_size:
        raise InvalidConversation(f"{first} tokens before the first reply, more than the window of {block_size} "
                                  f"(task.data.block_size)")  # fmt: skip
    return ids[: block_size + 1], labels[: block_size + 1]


class ChatDataModule(ExampleDataModule):
    """Batches ``(input_ids, labels)`` of conversations for the causal language modelling task: right-padded,
    labels shifted by one, IGNORE where nothing is learned.

    Args:
        texts: split -> lines, from :class:`ChatFile`.
        tokenizer: the run's tokenizer; the template's special tokens are added to it.
        block_size: the longest input, in tokens (see the module docstring for truncation).
        chat_template: Jinja text (None: :data:`~lmforge.data.chat_template.DEFAULT_TEMPLATE`).
        special_tokens: tokens the template writes that the tokenizer must keep whole.
        train_on: ``assistant`` (the replies) or ``all`` (the whole conversation).
        skip_invalid: skip and count unusable lines instead of stopping at the first.
        packing: training rows of ``block_size`` tokens hold several conversations each, attention kept
            inside each (:mod:`lmforge.data.packing`); ``batch_size`` then counts rows. Validation and
            test stay one conversation per row.
    """

    size_unit = "conversations"
    needs_end_of_sequence = True  # replies end with it: a tokenizer built for the run gets one
    can_pack = True

    def __init__(self, texts: dict, tokenizer: Tokenizer, block_size: int = 512, batch_size: int = 16,
                 chat_template: str | None = None, special_tokens: list[str] | None = None, train_on: str = "assistant",
                 skip_invalid: bool = False, packing: bool = False, eval_batch_size: int | None = None, seed: int = 0,
                 num_workers: int = 0, cache_dir: str | None = None):  # fmt: skip
        super().__init__(batch_size, eval_batch_size, seed, num_workers)
        if train_on not in ("assistant", "all"):
            raise LmforgeError(f"task.data.train_on={train_on}: use assistant (the replies) or all.")
        if tokenizer.token_to_id(EOS) is None:
            raise LmforgeError(f"task=sft needs a tokenizer with the end-of-text token {EOS} (tokenizer=bpe or gpt2).")
        tokenizer.add_special_tokens(list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens))
        self.block_size, self.pad_id = block_size, tokenizer.token_to_id(EOS)
        self.template = ChatTemplate(chat_template or DEFAULT_TEMPLATE, eos_token=EOS)
        self.chat_template = self.template.source
        self.lines = texts  # split -> its raw lines, for scoring replies by generation (lmforge-evaluate)
        self.examples = {
            split: self._encode(lines, tokenizer, train_on, skip_invalid) for split, lines in texts.items()
        }
        self.packing = packing
        if packing and not self.can_pack:
            raise LmforgeError(f"task.data.packing=true: {type(self).__name__} keeps one example per row.")
        if packing:
            from lmforge.data.packing import pack_examples

            train = self.examples["train"]
            self.packed_conversations = len(train)
            self.examples["train"] = pack_examples([e[0] for e in train], [e[1] for e in train], block_size,
                                                   pad_id=self.pad_id)  # fmt: skip
            log.info("packing: %d conversations in %d rows (%.1f%% padding)", len(train),
                     len(self.examples["train"]), 100 * self.examples["train"].padding_share)  # fmt: skip

    @property
    def split_sizes(self) -> dict[str, int | str]:
        """Conversations in each split (packed: the training conversations and the rows they fill)."""
        sizes: dict[str, int | str] = dict(super().split_sizes)
        if self.packing:
            sizes["train"] = f"{self.packed_conversations:,} in {sizes['train']:,} packed rows"
        return sizes

    def _encode(self, lines: list, tokenizer: Tokenizer, train_on: str, skip_invalid: bool) -> list[tuple]:
        examples, skipped = [], Counter()
        for file, number, line in lines:
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InvalidConversation(f"not JSON ({err.msg})") from None
                examples.append(self.encode_record(record, tokenizer, train_on))
            except InvalidConversation as err:
                if not skip_invalid:
                    raise LmforgeError(f"{file}:{number}: {err} (task.data.skip_invalid=true skips such "
                                       f"lines).") from None  # fmt: skip
                skipped[str(err)] += 1
        if skipped:
            log.warning(
                "skipped %d lines: %s", sum(skipped.values()), "; ".join(f"{n} x {r}" for r, n in skipped.items())
            )
        if not examples:
            raise LmforgeError(f"No usable conversation in {lines[0][0] if lines else 'the file'}.")
        return examples

    def encode_record(self, record, tokenizer: Tokenizer, train_on: str) -> tuple:
        """One JSON line's example: (ids, labels) of its conversation."""
        return encode_conversation(self.template, tokenizer, conversation(record), self.block_size, train_on)

    def task_arguments(self) -> dict:
        return {}

    def training_lengths(self) -> list[int] | None:
        """Conversations of similar lengths share batches (less padding); packed rows are all full."""
        return None if self.packing else [len(ids) for ids, _ in self.examples["train"]]

    def collate_for(self, split: str):
        """Packed rows for training when ``packing``; padded conversations otherwise."""
        if self.packing and split == "train":
            from lmforge.data.packing import collate_packed

            return collate_packed
        return self.collate

    def collate(self, batch: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels): right-padded with the end-of-text token; each label is the next token's."""
        longest = max(len(ids) for ids, _ in batch) - 1
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
        for i, (ids, targets) in enumerate(batch):
            input_ids[i, : len(ids) - 1] = torch.tensor(ids[:-1])
            labels[i, : len(ids) - 1] = torch.tensor(targets[1:])
        return input_ids, labels


def run_chat_template(cfg) -> ChatTemplate | None:
    """The chat template a saved run was tuned with (``task=sft``, ``task=dpo``), or None for a run without one."""
    from hydra.utils import get_class

    data = cfg.task.get("data") or {}
    target = data.get("_target_")
    if not target or not issubclass(get_class(target), ChatDataModule):
        return None
    return ChatTemplate(data.get("chat_template") or DEFAULT_TEMPLATE, eos_token=EOS)
