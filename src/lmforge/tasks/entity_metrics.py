"""Entity-level precision, recall and F1 (the CoNLL measure) through `seqeval`, gathered across processes."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class EntityScores(Metric):
    """Micro-averaged entity precision, recall and F1 over word-level tag sequences.

    An entity counts as found only when its type and both its boundaries are right (seqeval's
    default mode, which scores as the CoNLL ``conlleval`` script does).

    Args:
        tag_names: the tags in index order (IOB2 names such as ``B-PER``).
    """

    full_state_update = False

    def __init__(self, tag_names: list[str]):
        super().__init__()
        self.tag_names = list(tag_names)
        # Flat tag indices of every sentence, and the sentence lengths to cut them apart again.
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("lengths", default=[], dist_reduce_fx="cat")

    def update(self, preds: list[list[int]], target: list[list[int]]) -> None:
        """Add sentences: predicted and gold tag indices per word."""
        device = self.device
        self.preds.append(torch.tensor([t for row in preds for t in row], dtype=torch.long, device=device))
        self.target.append(torch.tensor([t for row in target for t in row], dtype=torch.long, device=device))
        self.lengths.append(torch.tensor([len(row) for row in target], dtype=torch.long, device=device))

    def compute(self) -> dict[str, torch.Tensor]:
        """``precision``, ``recall`` and ``f1`` of the entities seen so far."""
        from seqeval.metrics import f1_score, precision_score, recall_score

        if isinstance(self.lengths, list) and not self.lengths:
            return {key: torch.tensor(0.0) for key in ("precision", "recall", "f1")}
        lengths = dim_zero_cat(self.lengths).tolist()
        preds = self._names(dim_zero_cat(self.preds).tolist(), lengths)
        target = self._names(dim_zero_cat(self.target).tolist(), lengths)
        scores = {
            "precision": precision_score(target, preds, zero_division=0),
            "recall": recall_score(target, preds, zero_division=0),
            "f1": f1_score(target, preds, zero_division=0),
        }
        return {key: torch.tensor(float(value)) for key, value in scores.items()}

    def _names(self, flat: list[int], lengths: list[int]) -> list[list[str]]:
        rows, start = [], 0
        for n in lengths:
            rows.append([self.tag_names[t] for t in flat[start : start + n]])
            start += n
        return rows
