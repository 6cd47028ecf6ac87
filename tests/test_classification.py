"""Encoders, decoders and RNN-free classification on SST-2."""

import csv
import functools
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, requires_data
from lmforge.errors import LmforgeError
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.tasks.classification import ClassificationTask, pool
from lmforge.training import run_training


def test_bert_base_has_the_public_checkpoint_parameter_count_and_names():
    model = Bert(vocab_size=30522)  # bert-base-uncased BertModel, pooler included: 109,482,240
    assert sum(p.numel() for p in model.parameters()) == 109_482_240
    names = {n for n, _ in model.named_parameters()}
    assert {"embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight",
            "encoder.layer.11.attention.self.query.weight", "encoder.layer.0.attention.output.LayerNorm.bias",
            "encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.bias",
            "pooler.dense.weight"} <= names  # fmt: skip


def test_bert_sees_both_directions_and_ignores_padding():
    torch.manual_seed(0)
    model = Bert(vocab_size=50, n_layer=2, n_head=2, hidden_size=16, intermediate_size=32, n_positions=32).eval()
    ids = torch.randint(0, 50, (2, 10))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 50
    assert not torch.allclose(model(ids)[:, 0], model(changed)[:, 0])  # the last token reaches the first
    mask = torch.ones_like(ids)
    mask[:, 7:] = 0
    other = ids.clone()
    other[:, 7:] = 3
    torch.testing.assert_close(model(ids, mask)[:, :7], model(other, mask)[:, :7])


def test_pooling_picks_the_right_positions_under_either_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)  # hidden[b, t] = 4 * b + t
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [3.0, 5.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [1.5, 4.5]
    assert pool(hidden, left, "cls").flatten().tolist() == [0.0, 4.0]


def test_decoder_classifier_of_a_padded_batch_equals_one_sentence_at_a_time():
    torch.manual_seed(0)
    backbone = GPT(vocab_size=30, n_layer=1, n_head=2, n_embd=16, n_positions=16)
    task = ClassificationTask(backbone, num_classes=3, optimizer=functools.partial(torch.optim.AdamW)).eval()
    a, b = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])
    batch = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    alone = torch.cat([task(x[None], torch.ones(1, len(x), dtype=torch.long)) for x in (a, b)])
    torch.testing.assert_close(task(batch, mask), alone, atol=1e-5, rtol=1e-5)


def test_encoder_cannot_do_language_modelling(cfg_factory):
    with pytest.raises(
        LmforgeError, match="LanguageModelingTask needs a decoder backbone; model bert-tiny is an encoder"
    ):
        run_training(cfg_factory(["model=bert-tiny", "logger=none", "debug=fast"]))


@requires_data
def test_wordpiece_from_the_mirror_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from lmforge.data.classification import LabeledTexts
    from lmforge.data.tokenizers import wordpiece_tokenizer

    vocab = str(Path(DATA_DIR) / "tokenizers" / "bert-base-uncased" / "vocab.txt")
    ours = wordpiece_tokenizer(vocab_file=vocab)
    theirs = transformers.BertTokenizerFast(vocab)  # positional: the keyword form ignores the file
    assert ours.get_vocab_size() == theirs.vocab_size == 30522
    sentences = LabeledTexts(name="sst2", local_dir="glue/sst2", local_files={"validation": "validation.tsv"},
                             text_column="sentence", delimiter="\t").load(DATA_DIR, required=())["validation"]["text"]  # fmt: skip
    sentences = list(sentences)
    assert [e.ids for e in ours.encode_batch(sentences)] == theirs(sentences)["input_ids"]


@requires_data
@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert-tiny", "gpt2-tiny"])
def test_sst2_accuracy_rises_above_chance(cfg_factory, model):
    record = run_training(cfg_factory([f"model={model}", "task=sst2", "tokenizer=wordpiece", "logger=none",
                                       "trainer.max_steps=120", "trainer.val_check_interval=120",
                                       "optimizer.lr=1e-3", "test_after_fit=false"]))  # fmt: skip
    assert record["metrics"]["val/acc"] > 0.62, record["metrics"]
    assert record["metrics"]["val/loss"] < 0.69  # below the loss of guessing


def test_accuracy_and_macro_f1_equal_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    backbone = GPT(vocab_size=30, n_layer=1, n_head=2, n_embd=16, n_positions=16)
    task = ClassificationTask(backbone, num_classes=3, optimizer=functools.partial(torch.optim.AdamW))
    logits, labels = torch.randn(200, 3), torch.randint(0, 3, (200,))
    labels[:150] = logits[:150].argmax(-1)  # better than chance, so the two scores differ
    task.val_metrics.update(logits[:120], labels[:120])  # in two batches, as validation does
    task.val_metrics.update(logits[120:], labels[120:])
    scores = task.val_metrics.compute()
    predicted = logits.argmax(-1).numpy()
    assert scores["val/acc"].item() == pytest.approx(sklearn_metrics.accuracy_score(labels, predicted))
    assert scores["val/f1"].item() == pytest.approx(sklearn_metrics.f1_score(labels, predicted, average="macro"))


@requires_data
@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2-tiny", "bert-tiny", "lstm", "gru"])
def test_every_backbone_learns_sst2(cfg_factory, model):
    # One real batch, repeated: the loss must fall from ln(2) (chance) to near zero whatever the backbone.
    small = {"gpt2-tiny": ["model.n_layer=1", "model.n_embd=32"], "bert-tiny": ["model.n_layer=1"],
             "lstm": ["model.hidden_size=32"], "gru": ["model.hidden_size=32"]}[model]  # fmt: skip
    record = run_training(cfg_factory([f"model={model}", "task=sst2", "debug=overfit", "trainer.max_steps=60",
                                       "logger=none", "test_after_fit=false", *small]))  # fmt: skip
    losses = [float(r["train/loss"]) for r in csv.DictReader(Path(record["run_dir"], "csv", "metrics.csv").read_text().splitlines())
              if r.get("train/loss")]  # fmt: skip
    assert min(losses) < 0.1, losses  # (post-LayerNorm BERT spikes now and then at this rate)


def test_a_task_that_cannot_use_the_model_stops_before_reading_data(cfg_factory):
    with pytest.raises(
        LmforgeError, match="MaskedLanguageModelingTask needs an encoder backbone; model lstm is an RNN"
    ):
        run_training(cfg_factory(["model=lstm", "task=mlm"], data_dir="/nonexistent"))  # default loggers: W&B too
