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
