"""The language-modelling task: metrics against torchmetrics, and a clear error for a non-decoder."""

import functools
import math

import pytest
import pytorch_lightning as pl
import torch
from torchmetrics.text import Perplexity

from lmforge.data.language_modeling import LanguageModelingDataModule
from lmforge.data.tokenizers import char_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.gpt import GPT
from lmforge.tasks.language_modeling import LanguageModelingTask


def test_validation_metrics_match_torchmetrics_perplexity():
    texts = {"train": "the quick brown fox jumps over the lazy dog. " * 20, "validation": "a lazy dog naps. " * 30}
    tok = char_tokenizer(texts["train"])
    dm = LanguageModelingDataModule(texts, tok, block_size=16, batch_size=4)
    torch.manual_seed(0)
    backbone = GPT(tok.get_vocab_size(), n_layer=1, n_head=2, n_embd=16, n_positions=16)
    task = LanguageModelingTask(
        backbone, functools.partial(torch.optim.AdamW), tokenizer=tok, chars_per_token=dm.chars_per_token, num_samples=0
    )
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    got = trainer.validate(task, datamodule=dm, verbose=False)[0]

    reference = Perplexity()
    backbone.eval()
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            reference.update(backbone(x), y)
    assert got["val/ppl"] == pytest.approx(reference.compute().item(), rel=1e-5)
    assert got["val/loss"] == pytest.approx(math.log(got["val/ppl"]), rel=1e-5)
    assert got["val/bpc"] == pytest.approx(got["val/loss"] / math.log(2), rel=1e-5)  # one char per token


def test_language_modeling_refuses_a_backbone_that_is_not_a_decoder():
    class Encoder(torch.nn.Module):
        kind = "encoder"

    with pytest.raises(LmforgeError, match="needs a decoder backbone"):
        LanguageModelingTask(Encoder(), functools.partial(torch.optim.AdamW))


def test_chunked_cross_entropy_gives_the_loss_and_gradients_of_the_full_logits():
    """Chunks that do not divide the positions evenly; the logits are never kept for the backward pass."""
    from lmforge.models.gpt import GPT
    from lmforge.tasks.language_modeling import chunked_cross_entropy

    torch.manual_seed(0)
    model = GPT(300, n_layer=1, n_head=2, n_embd=16, n_positions=32)
    ids, labels = torch.randint(0, 300, (2, 3, 20))

    def loss_and_grads(chunk_size):
        model.zero_grad()
        hidden = model.hidden_states(ids)
        if chunk_size:
            loss = chunked_cross_entropy(hidden, model.lm_head, labels, chunk_size)
        else:
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), labels.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full_loss, full = loss_and_grads(None)
    chunk_loss, chunked = loss_and_grads(7)
    torch.testing.assert_close(chunk_loss, full_loss)
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], msg=name)

    hidden, saved = model.hidden_states(ids), []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        chunked_cross_entropy(hidden, model.lm_head, labels, 7)
    assert sum(saved) < ids.numel() * 300 * 4 / 10  # a tenth of the logits' bytes
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(model.hidden_states(ids), model.lm_head, labels, 7), full_loss)
