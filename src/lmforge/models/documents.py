"""Packed sequences in the backbones: several documents per row, kept apart by their ``document_ids``.

A packed row holds documents one after the other; ``document_ids`` (B, T) names each token's document
(padding has an id of its own, by convention -1). Attention stays inside a document and positions
restart at 0 where one begins, so each document is read exactly as it would be alone in a row.
A document is a run of equal ids: two runs with the same id are still two documents.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import LmforgeError


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at the first token of each document (a change of id, or the row's start)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids that restart at 0 at each document's first token."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    start = torch.where(document_starts(document_ids), index, 0).cummax(dim=1).values  # start of each token's run
    return index - start


def document_attention_mask(
    document_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, causal: bool = True
) -> torch.Tensor:
    """A boolean (B, 1, T, T) mask for SDPA (True = may attend): block-diagonal over documents, causal or not.

    Args:
        document_ids: (B, T) ints, each token's document.
        attention_mask: optional (B, T), 1 for real tokens and 0 for padding; its padding is masked out too.
        causal: a token sees only earlier tokens of its own document (decoders), else all of them (encoders).
    Returns:
        (B, 1, T, T). Every token may attend to itself, so no row is all masked (which would give NaN).
    """
    segment = document_starts(document_ids).cumsum(dim=1)  # runs, not ids: a repeated id starts a new document
    mask = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    if causal:
        mask = mask.tril()
    if attention_mask is not None:
        own = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
        mask = (mask & attention_mask.bool()[:, None, :]) | own
    return mask[:, None]


def document_keywords(backbone: nn.Module, document_ids: torch.Tensor | None) -> dict:
    """The keyword arguments with which ``backbone`` reads a batch's rows: ``document_ids`` for packed rows,
    nothing for unpacked ones (None), so that a task calls every backbone the same way."""
    if document_ids is None:
        return {}
    if not getattr(backbone, "takes_document_ids", False):
        raise LmforgeError(f"{type(backbone).__name__} cannot read packed rows; set task.data.packing=false.")
    return {"document_ids": document_ids}
