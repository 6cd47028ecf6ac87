"""Token classification (named entities, chunks) on any backbone: a tag per word, read from its first sub-token.

Encoders see the whole sentence; RNNs read it both ways; a decoder sees only the words to the
left, which works but tags worse. An optional CRF scores whole tag sequences, and RNNs can add
spelling features (a character CNN, casing) to their word embeddings.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lmforge.data.labels import IGNORE
from lmforge.data.token_classification import collate_tagged, encode_sentences
from lmforge.data.tokenizers import pad_token_id
from lmforge.errors import LmforgeError
from lmforge.models.backbone import Backbone
from lmforge.models.char_features import CharFeatures
from lmforge.models.crf import LinearChainCRF
from lmforge.predictions import tagging_rows
from lmforge.tasks.base import TaskModule
from lmforge.tasks.entity_metrics import EntityScores
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory

log = logging.getLogger(__name__)


def compact(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move the kept positions of each row to its front, in order (a CRF runs over words, not sub-tokens).

    Args:
        values: (B, T, ...) per-position values.
        keep: (B, T) bool, the positions to keep.
    Returns:
        (B, N, ...) the kept values (N: the most kept in a row), (B, N) the mask of real entries,
        (B, N) the position each entry came from.
    """
    order = torch.sort((~keep).long(), dim=1, stable=True).indices
    counts = keep.sum(1)
    n = max(int(counts.max()), 1)
    order = order[:, :n]
    mask = torch.arange(n, device=keep.device) < counts[:, None]
    index = order.view(*order.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index), mask, order


def unknown_token_id(tokenizer) -> int | None:
    """The id of the tokenizer's unknown token (``<unk>``, ``[UNK]``), or None when its model has none."""
    name = getattr(tokenizer.model, "unk_token", None)
    return tokenizer.token_to_id(name) if name else None


def first_subtokens(word_positions: torch.Tensor, length: int) -> torch.Tensor:
    """(B, W) position of each word's first token (-1: none) -> (B, T) bool, True at those positions."""
    found = word_positions >= 0
    marks = torch.zeros(word_positions.shape[0], length, dtype=torch.long, device=word_positions.device)
    return marks.scatter_add(1, word_positions.clamp(min=0), found.long()) > 0


class TokenClassificationTask(TaskModule):
    """A linear tag head on every position of a backbone, trained with cross-entropy or a CRF.

    The loss sees each word's first sub-token only (``labels`` is ``IGNORE`` elsewhere); the metrics
    (entity precision, recall, F1 through seqeval) score every word of every sentence, a word that
    truncation cut off counting as ``O``.

    Args:
        backbone: an encoder, decoder or RNN with ``hidden_states(input_ids, attention_mask)`` and ``hidden_size``.
        num_tags: number of tags (from the data).
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial schedule, or None.
        tag_names: tag names in index order (IOB2: ``O``, ``B-PER``, ...); None names them by number.
        dropout: dropout before the head.
        crf: score tag sequences with a linear-chain CRF (Viterbi decoding) instead of per-word softmax.
        char_filters: channels of a character CNN whose features are added to an RNN's word embeddings (0: none).
        char_embedding_size: width of the byte embeddings of the character CNN.
        casing_size: width of a casing-class embedding added likewise (0: none).
        word_dropout: in training, the chance that a word's (first) token is replaced by the unknown token,
            so that the tagger learns to read unseen words from their spelling and context.
        max_token_chars: bytes of each token the character features see (from the data; used by
            :meth:`predict_texts` to encode texts as the training data was).
        tokenizer: the run's tokenizer; gives the unknown token for ``word_dropout``.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_tags: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        tag_names: list[str] | None = None,
        dropout: float = 0.1,
        crf: bool = False,
        char_filters: int = 0,
        char_embedding_size: int = 30,
        casing_size: int = 0,
        word_dropout: float = 0.0,
        max_token_chars: int = 20,
        tokenizer=None,
    ):
        super().__init__(optimizer, scheduler)
        kind = self.checked_kind(backbone)
        self._check_inputs(backbone, kind, char_filters or casing_size, word_dropout, tokenizer)
        self.word_dropout = word_dropout
        self.max_token_chars = max_token_chars
        self.unk_id = unknown_token_id(tokenizer) if tokenizer is not None else None
        if kind == "decoder":
            log.info("token classification with a decoder: each word is tagged from the words before it only")
        self.attach_backbone(backbone)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.hidden_size, num_tags)
        self.crf = LinearChainCRF(num_tags) if crf else None
        self.spelling = (
            CharFeatures(backbone.embedding_size, char_embedding_size, char_filters, casing_size=casing_size)
            if char_filters or casing_size
            else None
        )
        self.tag_names = list(tag_names) if tag_names else [str(i) for i in range(num_tags)]
        self.outside = self.tag_names.index("O") if "O" in self.tag_names else 0
        self.val_scores = EntityScores(self.tag_names)
        self.test_scores = EntityScores(self.tag_names)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    @staticmethod
    def _check_inputs(backbone: Backbone, kind: str, spelling: bool, word_dropout: float, tokenizer) -> None:
        """Refuse, in one sentence, spelling features without an RNN and word dropout without an unknown token."""
        if spelling and kind != "rnn":
            raise LmforgeError(
                f"Character and casing features (task.module.char_filters, casing_size) feed an RNN's word "
                f"embeddings; {type(backbone).__name__} is '{kind}', so set them to 0 or use model=lstm."
            )
        if word_dropout and (tokenizer is None or unknown_token_id(tokenizer) is None):
            raise LmforgeError(
                "task.module.word_dropout replaces words by the unknown token, and this tokenizer has none; "
                "set it to 0."
            )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, char_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) ids and mask (and (B, T, C) bytes for spelling features) -> (B, T, num_tags) tag scores."""
        if self.spelling is not None:
            hidden = self.backbone.hidden_states(input_ids, attention_mask, input_features=self.spelling(char_ids))
        else:
            hidden = self.backbone.hidden_states(input_ids, attention_mask)
        return self.head(self.dropout(hidden))

    def _scores(self, batch: dict) -> torch.Tensor:
        input_ids = batch["input_ids"]
        if self.training and self.word_dropout:
            # Only words' first tokens (labelled positions): special tokens and padding stay as they are.
            drop = (batch["labels"] != IGNORE) & (torch.rand_like(input_ids, dtype=torch.float) < self.word_dropout)
            input_ids = input_ids.masked_fill(drop, self.unk_id)
        return self(input_ids, batch["attention_mask"], batch.get("char_ids"))

    def loss(self, emissions: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, int]:
        """``mean`` or ``sum`` of the loss per labelled word (cross-entropy, or the CRF's NLL), and the word count."""
        keep = labels != IGNORE
        words = int(keep.sum())
        if self.crf is None:
            loss = F.cross_entropy(emissions.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction=reduction)
            return loss, words
        scores, mask, order = compact(emissions, keep)
        nll = -self.crf.log_likelihood(scores, labels.gather(1, order), mask).sum()
        return (nll if reduction == "sum" else nll / max(words, 1)), words

    def predict_words(self, emissions: torch.Tensor, word_positions: torch.Tensor) -> torch.Tensor:
        """The tag of every word, from its first sub-token: (B, T, K), (B, W) -> (B, W); ``O`` for a word with no token."""
        if self.crf is None:
            tokens = emissions.argmax(-1)
        else:
            scores, mask, order = compact(emissions, first_subtokens(word_positions, emissions.shape[1]))
            tokens = torch.zeros(emissions.shape[:2], dtype=torch.long, device=emissions.device)
            tokens.scatter_(1, order, self.crf.decode(scores, mask))
        words = tokens.gather(1, word_positions.clamp(min=0))
        return words.masked_fill(word_positions < 0, self.outside)

    @torch.no_grad()
    def predict_texts(self, texts: list[str], tokenizer, max_length: int = 512) -> list[dict]:
        """Tag raw texts, split into words at whitespace (call ``eval()`` first).

        Returns:
            for each text: its ``words``, their ``tags``, and the ``entities`` they make, each with its
            ``text``, ``type`` and word span ``start``, ``end`` (end exclusive).
        """
        from seqeval.metrics.sequence_labeling import get_entities

        sentences = [text.split() for text in texts]
        tags: list[list[str]] = [[] for _ in texts]
        filled = [i for i, words in enumerate(sentences) if words]  # an empty text has nothing to tag
        if filled:
            n_positions = self.backbone.n_positions
            examples = encode_sentences(
                tokenizer,
                [sentences[i] for i in filled],
                [[self.outside] * len(sentences[i]) for i in filled],  # placeholders: no loss is computed
                min(max_length, n_positions or max_length),
                self.max_token_chars,
            )
            device = self.head.weight.device
            batch = {k: v.to(device) for k, v in collate_tagged(examples, pad_token_id(tokenizer)).items()}
            emissions = self(batch["input_ids"], batch["attention_mask"], batch["char_ids"])
            predicted = self.predict_words(emissions, batch["word_positions"]).tolist()
            for i, row in zip(filled, predicted, strict=True):
                tags[i] = [self.tag_names[t] for t in row[: len(sentences[i])]]
        results = []
        for text, words, row in zip(texts, sentences, tags, strict=True):
            entities = [
                {"text": " ".join(words[start : last + 1]), "type": kind, "start": start, "end": last + 1}
                for kind, start, last in get_entities(row)  # seqeval's spans end at their last word
            ]
            results.append({"text": text, "words": words, "tags": row, "entities": entities})
        return results

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The loss of one batch, to be averaged over the labelled words of the whole optimizer step."""
        return self.training_loss(*self.loss(self._scores(batch), batch["labels"], reduction="sum"))

    def _evaluate(self, batch: dict, batch_idx: int, scores: EntityScores, mean_loss: MeanMetric) -> None:
        emissions = self._scores(batch)
        loss, words = self.loss(emissions, batch["labels"])
        mean_loss.update(loss, weight=max(words, 1))
        lengths = (batch["word_tags"] != IGNORE).sum(1).tolist()
        preds = [p[:n] for p, n in zip(self.predict_words(emissions, batch["word_positions"]).tolist(), lengths)]
        target = [t[:n] for t, n in zip(batch["word_tags"].tolist(), lengths)]
        scores.update(preds, target)
        if (writer := self.prediction_writer) is not None:
            writer.write(tagging_rows(writer.examples(batch_idx), preds, target, self.tag_names))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the loss and the entity counts (and write predictions for ``lmforge-evaluate split=validation``)."""
        self._evaluate(batch, batch_idx, self.val_scores, self.val_loss)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the loss and the entity counts; write each sentence's tags and entities."""
        self._evaluate(batch, batch_idx, self.test_scores, self.test_loss)

    def on_validation_epoch_end(self) -> None:
        """Log validation loss and entity precision, recall, F1."""
        self.log_epoch_scores("val", self.val_loss, self.val_scores)

    def on_test_epoch_end(self) -> None:
        """Log test loss and entity precision, recall, F1."""
        self.log_epoch_scores("test", self.test_loss, self.test_scores)
