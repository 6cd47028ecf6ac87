"""Sequence packing: packed rows give each example exactly the loss and gradients it has alone, no token
attends across a document boundary, the packer keeps every example, and packed configs train."""

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA_DIR, requires_data
from lmforge.data.labels import IGNORE
from lmforge.data.language_modeling import LanguageModelingDataModule
from lmforge.data.packing import (
    PAD_DOCUMENT,
    best_fit_decreasing,
    collate_packed,
    collate_padded,
    document_ids_from_separators,
    pack_examples,
)
from lmforge.data.text_splits import FilePiece, FileText
from lmforge.data.tokenizers import char_tokenizer, with_end_of_sequence, wordpiece_tokenizer
from lmforge.models.bert import Bert
from lmforge.models.documents import document_attention_mask, document_positions
from lmforge.models.gpt import GPT

VOCAB = 97


def examples(n: int = 12, seed: int = 0, longest: int = 20) -> tuple[list[list[int]], list[list[int]]]:
    """Random examples with a prompt part (labels IGNORE) and a learned part, as SFT writes them."""
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length, prompt = rng.randint(2, longest), rng.randint(0, 5)
        tokens = [rng.randrange(VOCAB) for _ in range(length)]
        ids.append(tokens)
        labels.append([IGNORE if i < prompt else t for i, t in enumerate(tokens)])
    return ids, labels


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=32)


def tiny_bert() -> Bert:
    torch.manual_seed(0)
    return Bert(VOCAB, n_layer=2, n_head=2, hidden_size=32, intermediate_size=64, n_positions=32, dropout=0.0)


def summed_loss_and_grads(model, batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy summed over every label of every batch ``(input_ids, labels, document_ids)``, and its gradients."""
    model.zero_grad()
    total = 0.0
    for input_ids, labels, documents in batches:
        logits = model(input_ids, document_ids=documents) if documents is not None else model(input_ids)
        if logits.shape[-1] != VOCAB:  # an encoder: score its hidden states with the tied embeddings
            logits = logits @ model.word_embeddings.weight.T
        total = total + F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model, packed_batches, alone_batches) -> None:
    packed_loss, packed = summed_loss_and_grads(model, packed_batches)
    alone_loss, alone = summed_loss_and_grads(model, alone_batches)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-5)
    assert packed.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(packed[name], alone[name], rtol=1e-5, atol=1e-5, msg=name)


def test_packed_causal_loss_and_gradients_equal_each_example_alone():
    ids, labels = examples()
    rows = pack_examples(ids, labels, row_length=24)
    assert len(rows) < len(ids)  # several examples share rows
    packed = [collate_packed([rows[i] for i in range(len(rows))])]
    alone = [(torch.tensor([x[:-1]]), torch.tensor([y[1:]]), None) for x, y in zip(ids, labels)]
    assert_same_loss_and_grads(tiny_gpt(), packed, alone)


def test_padded_batches_give_the_same_loss_as_packed_ones():
    ids, labels = examples(seed=1)
    rows = pack_examples(ids, labels, row_length=24)
    padded = collate_padded(list(zip(ids, labels)))
    assert padded.document_ids is None and padded.input_ids.shape == (len(ids), max(map(len, ids)) - 1)
    assert_same_loss_and_grads(tiny_gpt(), [collate_packed(list(rows))], [padded])


def test_packed_encoder_loss_and_gradients_equal_each_example_alone():
    """BERT (masked LM): block-diagonal attention without the causal part, labels where they are."""
    ids, labels = examples(seed=2)
    rows = pack_examples(ids, labels, row_length=32, shift_labels=False)
    packed = [collate_packed(list(rows))]
    alone = [(torch.tensor([x]), torch.tensor([y]), None) for x, y in zip(ids, labels)]
    assert_same_loss_and_grads(tiny_bert(), packed, alone)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_bert])
def test_no_token_attends_across_a_document_boundary(make):
    model = make().eval()
    documents = torch.tensor([[0] * 5 + [1] * 6 + [2] * 4 + [PAD_DOCUMENT] * 3])
    ids = torch.randint(VOCAB, documents.shape, generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[documents == 1] = (changed[documents == 1] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids, document_ids=documents), model(changed, document_ids=documents)
        third_alone = model(ids[:, 11:15])
    others = (documents != 1)[0]
    torch.testing.assert_close(after[0, others], before[0, others], rtol=0, atol=0)
    assert (after[0, documents[0] == 1] - before[0, documents[0] == 1]).abs().amax() > 1e-3
    # The third document reads as it does alone at the start of a row: its positions restart.
    torch.testing.assert_close(before[0, 11:15], third_alone[0], rtol=1e-5, atol=1e-5)


def test_positions_restart_and_the_mask_is_block_diagonal():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [3, 3, 3, 3, 3, 3, 3, 3]])
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    mask = document_attention_mask(documents, causal=True)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    assert not mask[3, 4]  # causal: not a later token of its own document
    bidirectional = document_attention_mask(documents, causal=False)[0, 0]
    assert bidirectional[3].tolist() == [False, False, False, True, True, False, False, False]
    # A repeated id after another document is a new document.
    again = document_attention_mask(torch.tensor([[0, 0, 1, 0]]), causal=False)[0, 0]
    assert again[3].tolist() == [False, False, False, True]


def test_generation_path_refuses_document_ids_with_a_cache():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=model.new_cache(), document_ids=torch.zeros(1, 3))


def test_packer_keeps_every_example_once_in_order_with_its_labels():
    ids, labels = examples(n=40, seed=3, longest=30)
    rows = pack_examples(ids, labels, row_length=32, pad_id=5)
    placed = [i for row in rows.examples for i in row]
    assert sorted(placed) == list(range(40))
    assert all(row == sorted(row) for row in rows.examples)  # a row keeps its examples' order
    for r, members in enumerate(rows.examples):
        at = 0
        for d, i in enumerate(members):
            n = len(ids[i]) - 1
            assert rows.input_ids[r, at : at + n].tolist() == ids[i][:-1]
            assert rows.labels[r, at : at + n].tolist() == labels[i][1:]  # next-token targets, prompt kept IGNORE
            assert (rows.document_ids[r, at : at + n] == d).all()
            at += n
        assert (rows.document_ids[r, at:] == PAD_DOCUMENT).all() and (rows.labels[r, at:] == IGNORE).all()
        assert (rows.input_ids[r, at:] == 5).all()
    real = sum(len(x) - 1 for x in ids)
    assert rows.padding_share == pytest.approx(1 - real / rows.input_ids.size)
    assert len(rows) <= math.ceil(real / 32) + 1  # best-fit decreasing is near the fewest rows here


def test_best_fit_fills_the_fullest_row_that_fits():
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    # First-fit in the given order would need 3 rows for these.
    assert len(best_fit_decreasing([3, 7, 3, 7], 10)) == 2


def test_packer_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="example 1 needs 9 positions, more than a packed row's 8; truncate"):
        pack_examples([[1, 2], list(range(10))], None, row_length=8)
    with pytest.raises(ValueError, match="example 0 has 3 token ids but 2 labels"):
        pack_examples([[1, 2, 3]], [[1, 2]], row_length=8)
    with pytest.raises(ValueError, match="too few"):
        pack_examples([[1]], None, row_length=8)


def test_separator_opens_the_next_document():
    assert document_ids_from_separators(torch.tensor([[4, 9, 1, 9, 9, 2]]), 9).tolist() == [[0, 1, 1, 2, 3, 3]]


def documents_file(path: Path, docs: list[str]) -> FileText:
    """A split of one document per JSON line, as ``task=text`` reads a .jsonl corpus."""
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return FileText([FilePiece(str(path), column="text")])


def test_language_modeling_windows_carry_their_documents(tmp_path):
    docs = ["the cat sat on the mat. " * 3, "a dog ran. " * 2, "birds sing at dawn. " * 4] * 4
    texts = {
        "train": documents_file(tmp_path / "train.jsonl", docs),
        "validation": documents_file(tmp_path / "val.jsonl", docs[:6]),
    }
    tok = with_end_of_sequence(char_tokenizer(texts["train"].text()))
    dm = LanguageModelingDataModule(texts, tok, block_size=48, batch_size=2, packing=True)
    x, y, documents = (torch.cat(parts) for parts in zip(*dm.val_dataloader()))
    separator = tok.token_to_id("<|endoftext|>")
    assert (x == separator).sum() >= 4 and documents.shape == x.shape
    assert torch.equal(documents, (x == separator).long().cumsum(1))
    assert (y != IGNORE).all()  # windows of a stream lose no label
    plain = LanguageModelingDataModule(texts, char_tokenizer(texts["train"].text()), block_size=48, batch_size=2)
    assert len(next(iter(plain.val_dataloader()))) == 2  # unpacked windows are as before


def test_masked_lm_packing_joins_documents_with_sep(tmp_path):
    docs = ["first document here, with words", "second one there and more words"] * 30
    texts = {
        "train": documents_file(tmp_path / "train.jsonl", docs),
        "validation": documents_file(tmp_path / "v.jsonl", docs),
    }
    tok = wordpiece_tokenizer(texts["train"].text(), hub_id=None, vocab_size=200)
    dm = LanguageModelingDataModule(texts, tok, block_size=16, batch_size=4, packing=True)
    x, _, documents = next(iter(dm.train_dataloader()))
    assert dm.separator == "[SEP]" and (x == tok.token_to_id("[SEP]")).any()
    assert documents.max() > 0


def _train_losses(run_dir: str) -> list[float]:
    with open(next(Path(run_dir).glob("csv/**/metrics.csv")), encoding="utf-8") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@requires_data
@pytest.mark.slow
def test_a_packed_config_trains_on_samsum_dialogues(cfg_factory):
    """task=text on SAMSum's dialogues, a document each, packed: loss finite and falling over 30 steps."""
    from lmforge.training import run_training

    dialogues = str(Path(DATA_DIR) / "samsum" / "val.jsonl")
    record = run_training(cfg_factory([
        "model=gpt2-tiny", "model.n_layer=2", "model.n_embd=64", "task=text", f"task.source.files=[{dialogues}]",
        "task.source.text_column=dialogue", "tokenizer=bpe", "tokenizer.vocab_size=1024", "task.data.packing=true", "task.data.block_size=128",
        "task.data.batch_size=8", "task.module.num_samples=0", "logger=csv", "trainer.max_steps=30",
        "trainer.val_check_interval=30", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
        "optimizer.lr=3e-3", "scheduler=constant",
    ]))  # fmt: skip
    losses = _train_losses(record["run_dir"])
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.8, losses  # from ln(1024) = 6.9 nats
    assert math.isfinite(record["metrics"]["val/loss"])


@requires_data
@pytest.mark.slow
def test_a_packed_masked_lm_config_trains(cfg_factory):
    """task=mlm on SAMSum's dialogues joined by [SEP], each attended to on its own: a few finite steps."""
    from lmforge.training import run_training

    dialogues = str(Path(DATA_DIR) / "samsum" / "val.jsonl")
    record = run_training(cfg_factory([
        "model=bert-tiny", "task=mlm", "task/source=text", f"task.source.files=[{dialogues}]",
        "task.source.text_column=dialogue", "tokenizer.vocab_file=null", "tokenizer.hub_id=null", "tokenizer.vocab_size=1024",
        "task.data.packing=true", "task.data.batch_size=8", "logger=csv", "trainer.max_steps=6",
        "trainer.val_check_interval=6", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
    ]))  # fmt: skip
    losses = _train_losses(record["run_dir"])
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(record["metrics"]["val/loss"])
