"""Named-entity recognition on CoNLL-2003: tagged sources, label alignment, the CRF, entity F1, training."""

import csv
import functools
import itertools
import json
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, entry_cfg, make_cfg, requires_data
from lmforge.data.token_classification import IGNORE, TaggedSentences, TokenClassificationDataModule, read_conll
from lmforge.data.tokenizers import word_tokenizer, wordpiece_tokenizer
from lmforge.errors import LmforgeError
from lmforge.inference import predict_from_run
from lmforge.models.char_features import INITIAL_UPPER, LOWER, NUMERIC, UPPER, casing_classes
from lmforge.models.crf import LinearChainCRF
from lmforge.models.rnn import RNN
from lmforge.tasks.entity_metrics import EntityScores
from lmforge.tasks.token_classification import TokenClassificationTask
from lmforge.training import run_training

CONLL = dict(
    name="conll2003",
    local_dir="conll2003",
    local_files={"train": "train.txt", "validation": "valid.txt", "test": "test.txt"},
    hub_id="eriktks/conll2003",
)
TAGS = ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]


@pytest.fixture(scope="module")
def conll():
    """The CoNLL-2003 splits from the data mirror, and the source that read them."""
    source = TaggedSentences(**CONLL)
    return source, source.load(DATA_DIR, required=("train", "validation", "test"))


def test_conll_reader_splits_sentences_and_takes_the_tag_column(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n\n")
    assert read_conll(path) == ([["EU", "rejects"], ["Peter"]], [["B-ORG", "O"], ["B-PER"]])
    assert read_conll(path, tag_column=2)[1] == [["B-NP", "B-VP"], ["B-NP"]]
    path.write_text("EU\n")
    with pytest.raises(LmforgeError, match=r"tiny.txt:1 has one column"):
        read_conll(path)


def test_conll_files_become_memory_mapped_tables_and_a_bad_file_is_one_sentence(tmp_path):
    folder = tmp_path / "conll2003"
    folder.mkdir()
    (folder / "train.txt").write_text("EU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\n")
    (folder / "valid.txt").write_text("-DOCSTART- -X- O\n\n")
    with pytest.raises(LmforgeError, match=r"valid.txt holds no tagged sentences"):
        TaggedSentences(**CONLL).load(str(tmp_path))
    (folder / "valid.txt").write_text("Peter NNP B-PER\n\nBlackburn\n")  # the bad line is found while writing
    with pytest.raises(LmforgeError, match=r"valid.txt:3 has one column"):
        TaggedSentences(**CONLL).load(str(tmp_path))
    (folder / "valid.txt").write_text("Peter NNP B-PER\nBlackburn NNP I-PER\n")
    with pytest.raises(LmforgeError, match=r"split validation has tags missing from the training split .*: I-PER"):
        TaggedSentences(**CONLL).load(str(tmp_path))
    (folder / "valid.txt").write_text("Peter NNP B-PER\nrejects VBZ O\n")  # edited: read again, not the cached copy
    splits = TaggedSentences(**CONLL).load(str(tmp_path))
    assert splits["validation"].to_dict() == {"tokens": [["Peter", "rejects"]], "tags": [[2, 0]]}
    tokenizer = word_tokenizer("EU rejects Peter", min_frequency=1)
    dm = TokenClassificationDataModule(splits, tokenizer, ["O", "B-ORG", "B-PER"])
    for split in ("train", "validation"):  # sentences and encodings are files in the datasets cache
        assert splits[split].cache_files and dm.examples[split].table.cache_files
    assert dm.collate(dm.examples["train"])["word_tags"].tolist() == [[1, 0], [2, -100]]


def test_missing_dataset_folder_is_one_sentence(tmp_path):
    with pytest.raises(LmforgeError, match=r"Dataset 'conll2003' not found: looked in .*conll2003 and the hub id"):
        TaggedSentences(**CONLL).load(str(tmp_path))


def test_hub_copy_is_read_with_its_class_label_names(tmp_path, monkeypatch):
    import datasets

    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]  # the hub's order
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names)),
        }
    )
    rows = {"tokens": [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]], "ner_tags": [[3, 0, 7, 0], [1, 2]]}
    hub = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(rows, features=features) for split in ("train", "test")}
    )
    monkeypatch.setattr("lmforge.data.sources.hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub)
    source = TaggedSentences(**CONLL)
    splits = source.load(str(tmp_path), required=("train", "test"))  # no local folder: the hub
    assert source.tag_names == ["O", "B-MISC", "B-ORG", "B-PER", "I-PER"]  # O first, then sorted
    assert splits["test"].to_dict() == {"tokens": rows["tokens"], "tags": [[2, 0, 1, 0], [3, 4]]}


@requires_data
def test_conll2003_splits_tags_and_training_text(conll):
    source, splits = conll
    assert source.tag_names == TAGS and source.data_arguments() == {"tag_names": TAGS}
    assert {split: len(data["tokens"]) for split, data in splits.items()} == {
        "train": 14_041, "validation": 3_250, "test": 3_453}  # fmt: skip
    entities = [sum(tag == TAGS.index(f"B-{kind}") for row in splits["test"]["tags"] for tag in row)
                for kind in ("LOC", "MISC", "ORG", "PER")]  # fmt: skip
    assert entities == [1_668, 702, 1_661, 1_617]  # the counts the data README gives
    text = source.training_text(splits).text()
    assert text.startswith("EU rejects German call to boycott British lamb .\nPeter Blackburn\n")
    assert len(text.splitlines()) == 14_041


@requires_data
def test_a_word_split_into_sub_tokens_has_its_tag_on_the_first_only(conll):
    _, splits = conll
    tokenizer = wordpiece_tokenizer(vocab_file=str(Path(DATA_DIR) / "tokenizers" / "bert-base-uncased" / "vocab.txt"))
    sentence = splits["train"].select([4])  # "... Werner Zwingmann said ..."
    dm = TokenClassificationDataModule({"train": sentence}, tokenizer, TAGS)
    batch = dm.collate(dm.examples["train"])
    tokens = [tokenizer.id_to_token(i) for i in batch["input_ids"][0].tolist()]
    labels = batch["labels"][0].tolist()
    assert tokens[13:18] == ["werner", "z", "##wing", "##mann", "said"]
    assert labels[13:18] == [TAGS.index("B-PER"), TAGS.index("I-PER"), IGNORE, IGNORE, TAGS.index("O")]
    assert tokens[0] == "[CLS]" and labels[0] == IGNORE and labels[-1] == IGNORE  # [CLS], [SEP]
    assert tokens[1:4] == ["germany", "'", "s"] and labels[1:4] == [TAGS.index("B-LOC"), 0, IGNORE]  # "'s" splits
    # Every word's first token carries the word's tag, and nothing else carries one.
    words = sentence["tokens"][0]
    positions = batch["word_positions"][0].tolist()
    assert [labels[p] for p in positions] == sentence["tags"][0] == batch["word_tags"][0].tolist()
    assert sum(label != IGNORE for label in labels) == len(words)
    # Character features read each token's piece of the original, cased word.
    pieces = [bytes(c - 1 for c in row if c).decode() for row in batch["char_ids"][0, 14:17].tolist()]
    assert pieces == ["Z", "wing", "mann"]


def test_truncated_and_empty_words_get_no_position():
    tokenizer = word_tokenizer("Peter Blackburn lives in Brussels", min_frequency=1)
    texts = {
        "train": {"tokens": [["Peter", "\x07", "Blackburn", "lives", "in", "Brussels"]], "tags": [[1, 0, 2, 0, 0, 3]]}
    }
    dm = TokenClassificationDataModule(texts, tokenizer, ["O", "B-PER", "I-PER", "B-LOC"], max_length=4)
    batch = dm.collate(dm.examples["train"])
    # The control character normalises to nothing; "Brussels" falls past max_length.
    assert batch["word_positions"].tolist() == [[0, -1, 1, 2, 3, -1]]
    assert batch["labels"].tolist() == [[1, 2, 0, 0]]
    assert batch["word_tags"].tolist() == [[1, 0, 2, 0, 0, 3]]


def test_casing_classes():
    words = ["the", "EU", "Peter", "1996", "x"]
    chars = torch.zeros(1, len(words), 6, dtype=torch.long)
    for i, word in enumerate(words):
        chars[0, i, : len(word)] = torch.tensor([b + 1 for b in word.encode()])
    assert casing_classes(chars).tolist() == [[LOWER, UPPER, INITIAL_UPPER, NUMERIC, LOWER]]


def _brute_force(crf: LinearChainCRF, emissions: torch.Tensor, n: int) -> tuple[list[tuple], torch.Tensor]:
    """Every tag sequence of length n and its score, summed term by term."""
    sequences = list(itertools.product(range(crf.num_tags), repeat=n))
    scores = []
    for tags in sequences:
        score = crf.start[tags[0]] + crf.end[tags[-1]] + sum(emissions[t, tags[t]] for t in range(n))
        score = score + sum(crf.transitions[tags[t - 1], tags[t]] for t in range(1, n))
        scores.append(score)
    return sequences, torch.stack(scores)


def test_crf_viterbi_and_likelihood_equal_brute_force():
    torch.manual_seed(0)
    crf = LinearChainCRF(num_tags=3)
    for p in crf.parameters():
        torch.nn.init.normal_(p)
    emissions = torch.randn(3, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    tags = torch.randint(0, 3, (3, 4))
    decoded = crf.decode(emissions, mask)
    log_z = crf.log_partition(emissions, mask)
    llh = crf.log_likelihood(emissions, tags, mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        sequences, scores = _brute_force(crf, emissions[b], n)
        assert decoded[b, :n].tolist() == list(sequences[int(scores.argmax())])
        assert decoded[b, n:].tolist() == [0] * (4 - n)
        torch.testing.assert_close(log_z[b], torch.logsumexp(scores, 0))
        gold = scores[sequences.index(tuple(tags[b, :n].tolist()))]
        torch.testing.assert_close(llh[b], gold - torch.logsumexp(scores, 0))
    assert (llh < 0).all()


def test_entity_scores_equal_seqeval():
    from seqeval.metrics import f1_score, precision_score, recall_score

    torch.manual_seed(0)
    target = [torch.randint(0, len(TAGS), (n,)).tolist() for n in (5, 9, 1, 12, 7)]
    preds = [[t if torch.rand(()) < 0.7 else int(torch.randint(0, len(TAGS), ())) for t in row] for row in target]
    metric = EntityScores(TAGS)
    metric.update(preds[:2], target[:2])  # two batches, gathered
    metric.update(preds[2:], target[2:])
    scores = metric.compute()
    names = [[[TAGS[t] for t in row] for row in rows] for rows in (target, preds)]
    assert 0 < scores["f1"] < 1
    assert scores["f1"].item() == pytest.approx(f1_score(*names))
    assert scores["precision"].item() == pytest.approx(precision_score(*names))
    assert scores["recall"].item() == pytest.approx(recall_score(*names))


def test_task_scores_words_from_first_sub_tokens_as_seqeval_does():
    from seqeval.metrics import f1_score

    torch.manual_seed(0)
    tokenizer = word_tokenizer("Peter Blackburn of EU-Commission lives in Brussels", min_frequency=1)
    texts = {"validation": {
        "tokens": [["Peter", "Blackburn", "lives", "in", "Brussels"], ["EU-Commission", "of", "Peter"]],
        "tags": [[4, 8, 0, 0, 1], [3, 0, 4]]}}  # fmt: skip
    dm = TokenClassificationDataModule(texts, tokenizer, TAGS)
    backbone = RNN(tokenizer.get_vocab_size(), hidden_size=8, embedding_size=8)
    for crf in (False, True):
        optimizer = functools.partial(torch.optim.AdamW)
        task = TokenClassificationTask(backbone, len(TAGS), optimizer, tag_names=TAGS, crf=crf).eval()
        batch = dm.collate(dm.examples["validation"])
        emissions = task(batch["input_ids"], batch["attention_mask"])
        words = task.predict_words(emissions, batch["word_positions"]).tolist()
        if not crf:  # "EU-Commission" is three tokens: the word is tagged from the first
            assert words[1][0] == int(emissions[1, 0].argmax())
        task._evaluate(batch, 0, task.val_scores, task.val_loss)
        names = [[TAGS[t] for t in row[: len(tags)]] for row, tags in zip(words, texts["validation"]["tags"])]
        gold = [[TAGS[t] for t in row] for row in texts["validation"]["tags"]]
        assert task.val_scores.compute()["f1"].item() == pytest.approx(f1_score(gold, names))


def test_spelling_features_need_an_rnn():
    from lmforge.models.bert import Bert

    backbone = Bert(vocab_size=50, n_layer=1, n_head=2, hidden_size=16, intermediate_size=32, n_positions=32)
    with pytest.raises(LmforgeError, match="feed an RNN's word embeddings; Bert is 'encoder'"):
        TokenClassificationTask(backbone, len(TAGS), functools.partial(torch.optim.AdamW), char_filters=10)


def _train_losses(run_dir: str) -> list[float]:
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


@requires_data
@pytest.mark.slow
@pytest.mark.parametrize(
    "model, extra",
    [
        ("lstm", ["model.hidden_size=64", "model.embedding_size=64", "task.module.crf=true",
                  "task.module.char_filters=16", "task.module.casing_size=4"]),
        ("bert-tiny", ["model.n_layer=1"]),
    ],
)  # fmt: skip
def test_conll2003_loss_falls(cfg_factory, model, extra):
    record = run_training(cfg_factory([f"model={model}", "task=conll2003", "logger=none", "scheduler=constant",
                                       "optimizer.lr=3e-3", "trainer.max_steps=30", "trainer.val_check_interval=30",
                                       "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                                       "trainer.log_every_n_steps=1", "task.data.eval_batch_size=32", *extra]))  # fmt: skip
    losses = _train_losses(record["run_dir"])
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3, losses
    metrics = record["metrics"]
    assert {"val/f1", "val/precision", "val/recall", "test/f1", "test/loss"} <= set(metrics)
    assert 0 <= metrics["val/f1"] <= 1 and metrics["val/loss"] < losses[0]


def test_word_dropout_reads_labelled_words_as_unknown_in_training_only():
    tokenizer = word_tokenizer("Peter Blackburn lives in Brussels", min_frequency=1)
    texts = {"train": {"tokens": [["Peter", "lives", "in", "Brussels"]], "tags": [[4, 0, 0, 1]]}}
    dm = TokenClassificationDataModule(texts, tokenizer, TAGS)
    batch = dm.collate(dm.examples["train"])
    backbone = RNN(tokenizer.get_vocab_size(), hidden_size=8, embedding_size=8)
    task = TokenClassificationTask(
        backbone, len(TAGS), functools.partial(torch.optim.AdamW), tokenizer=tokenizer, word_dropout=1.0
    )
    seen = []
    backbone.embeddings.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    task.train()._scores(batch)
    task.eval()._scores(batch)
    unk = tokenizer.token_to_id("<unk>")
    assert seen[0].tolist() == [[unk] * 4] and seen[1].tolist() == batch["input_ids"].tolist() != seen[0].tolist()


def test_predict_texts_tags_words_as_the_data_module_encodes_them():
    torch.manual_seed(0)
    tokenizer = word_tokenizer("Peter Blackburn of EU-Commission lives in Brussels", min_frequency=1)
    sentences = [["Peter", "Blackburn", "lives", "in", "Brussels"], ["EU-Commission", "of", "Peter"]]
    texts = {"test": {"tokens": sentences, "tags": [[0] * len(words) for words in sentences]}}
    dm = TokenClassificationDataModule(texts, tokenizer, TAGS, max_token_chars=4)
    backbone = RNN(tokenizer.get_vocab_size(), hidden_size=8, embedding_size=8)
    task = TokenClassificationTask(
        backbone, optimizer=functools.partial(torch.optim.AdamW), crf=True, char_filters=4, casing_size=2,
        **dm.task_arguments(),
    ).eval()  # fmt: skip
    assert task.max_token_chars == 4
    batch = dm.collate(dm.examples["test"])
    expected = task.predict_words(task._scores(batch), batch["word_positions"]).tolist()
    results = task.predict_texts([" ".join(words) for words in sentences], tokenizer)
    assert [r["tags"] for r in results] == [
        [TAGS[t] for t in row[: len(words)]] for row, words in zip(expected, sentences)
    ]


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    """A short real CoNLL-2003 run of the preset (BiLSTM-CRF, smaller, 250 steps), shared by the predict tests."""
    if not DATA_DIR:
        pytest.skip("needs the local data mirror (LMFORGE_DATA)")
    overrides = ["experiment=conll2003-lstm-crf", "logger=none", "model.hidden_size=64", "trainer.max_steps=250",
                 "trainer.val_check_interval=250", "trainer.limit_val_batches=4", "trainer.limit_test_batches=1"]  # fmt: skip
    return run_training(make_cfg(overrides, tmp_path_factory.mktemp("conll2003")))


def _predict(run: dict, texts: list[str]) -> list[dict]:
    return predict_from_run(entry_cfg("predict", [f"run={run['run_dir']}", f"text={json.dumps(texts)}"]))


@requires_data
@pytest.mark.slow
def test_predict_finds_the_entities_of_an_obvious_sentence(ner_run, capsys):
    from seqeval.metrics.sequence_labeling import get_entities

    text = "Peter Blackburn visited London ."
    (result,) = _predict(ner_run, [text])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [result]
    assert result["text"] == text and result["words"] == text.split()
    assert len(result["tags"]) == 5 and set(result["tags"]) <= set(TAGS)
    # The spans are the tags' entities, with end exclusive, and their text is the words they cover.
    spans = [(e["type"], e["start"], e["end"] - 1) for e in result["entities"]]
    assert spans == get_entities(result["tags"])
    for e in result["entities"]:
        assert e["text"] == " ".join(result["words"][e["start"] : e["end"]])
    assert {"PER", "LOC"} & {e["type"] for e in result["entities"]}, result


@requires_data
@pytest.mark.slow
def test_predict_is_the_same_alone_or_batched(ner_run):
    short = "Peter Blackburn visited London ."
    longer = "EU rejects German call to boycott British lamb , says Werner Zwingmann of Verwaltungsgerichtshof ."
    alone = _predict(ner_run, [short])
    batched = _predict(ner_run, [longer, "", short])
    assert batched[2] == alone[0]
    assert batched[1] == {"text": "", "words": [], "tags": [], "entities": []}
    assert len(batched[0]["tags"]) == len(longer.split())


@requires_data
@pytest.mark.slow
def test_serve_tags_as_predict_does(ner_run):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from conftest import serving

    texts = ["Peter Blackburn visited London .", "EU rejects German call to boycott British lamb .", "Hello"]
    expected = _predict(ner_run, texts)
    with serving(f"run={ner_run['run_dir']}") as (url, _):
        model = Path(ner_run["run_dir"]).name
        tagged = httpx.post(f"{url}/v1/tag", json={"model": model, "input": texts}, timeout=60).json()["data"]
        assert [{k: v for k, v in t.items() if k != "index"} for t in tagged] == expected
        with ThreadPoolExecutor(3) as pool:  # one request each, batched together by the server
            one_each = list(pool.map(lambda t: httpx.post(f"{url}/v1/tag", json={"model": model, "input": t},
                                                          timeout=60).json()["data"][0]["tags"], texts))  # fmt: skip
        assert one_each == [e["tags"] for e in expected]
