"""Predictions on disk: every task's test writes predictions.jsonl, lmforge-evaluate eval-<split>-predictions.jsonl;
each corpus figure that a run reports is recomputed from its file with the reference library."""

import json
import re
import string
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import sacrebleu
import torch
from seqeval.metrics import f1_score, precision_score, recall_score
from sklearn.metrics import f1_score as macro_f1
from test_seq2seq import write_aligned
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.functional.text.rouge import rouge_score

from conftest import DATA_DIR, entry_cfg, requires_data
from lmforge.data.token_classification import read_conll
from lmforge.inference import evaluate_run
from lmforge.predictions import PredictionWriter
from lmforge.training import run_training

# One or two batches of each split, after two steps: enough to score, quick to train.
FAST = ["logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=2"]  # fmt: skip


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def token_mean(rows: list[dict], key: str = "loss") -> float:
    """The split's figure from per-window lines: token-weighted mean of ``key``."""
    return sum(r[key] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)


class TableLogger:
    """Stands for W&B's logger: keeps what ``log_table`` gets."""

    def __init__(self):
        self.tables = []

    def log_table(self, key, columns, data):
        self.tables.append((key, columns, data))


def test_ranks_write_their_own_parts_and_rank_zero_merges_them_in_order(tmp_path):
    # Five examples over two ranks: rank 0 reads positions 0, 2, 4 and rank 1 reads 1, 3 and 0 again (padding).
    dataset = [10 * i for i in range(5)]
    logger = TableLogger()
    (tmp_path / "predictions.jsonl").write_text("an older run's file\n")
    writers = []
    for rank in (0, 1):
        loader = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, 2, rank, shuffle=False))
        trainer = SimpleNamespace(default_root_dir=str(tmp_path), global_rank=rank, world_size=2, test_dataloaders=loader,
                                  datamodule=None, strategy=SimpleNamespace(barrier=lambda name: None), loggers=[logger])  # fmt: skip
        writers.append((PredictionWriter(trainer, "test", "predictions.jsonl"), loader))
    assert not (tmp_path / "predictions.jsonl").exists()  # an older file cannot pass for this one
    for writer, loader in writers:
        for batch_idx, batch in enumerate(loader):
            examples = writer.examples(batch_idx)
            writer.write([{"index": e["index"], "value": v, "words": ["w", str(v)]}
                          for e, v in zip(examples, batch.tolist())])  # fmt: skip
    # Until the end, nothing is named predictions.jsonl: a crash here leaves only parts.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl.rank0.partial",
                                                           "predictions.jsonl.rank1.partial"]  # fmt: skip
    assert writers[1][0].close() is None
    path = writers[0][0].close()
    rows = read_lines(path)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]  # the loader's order, the padding repeat dropped
    assert [r["value"] for r in rows] == dataset  # each line's index is its example's
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]
    [(key, columns, data)] = logger.tables
    assert key == "test/predictions" and columns == ["index", "value", "words"]
    assert data[1] == [1, 10, '["w", "10"]']


@requires_data
@pytest.mark.slow
def test_classification_lines_give_the_test_accuracy_and_a_wandb_table(cfg_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = run_training(cfg_factory(["experiment=sst2-lstm", *FAST, "logger=wandb", "model.hidden_size=32",
                                       "model.embedding_size=32", "task.data.batch_size=16"]))  # fmt: skip
    run_dir, metrics = Path(record["run_dir"]), record["metrics"]
    rows = read_lines(run_dir / "predictions.jsonl")
    assert len(rows) == 32
    references, predictions = [r["reference"] for r in rows], [r["prediction"] for r in rows]
    assert sum(p == y for p, y in zip(predictions, references)) / len(rows) == pytest.approx(
        metrics["test/acc"], abs=1e-6
    )
    assert macro_f1(references, predictions, average="macro") == pytest.approx(metrics["test/f1"], abs=1e-6)
    assert all(r["correct"] == (r["prediction"] == r["reference"]) and 0.5 <= r["probability"] <= 1 for r in rows)
    test = pd.read_csv(Path(DATA_DIR) / "glue/sst2/test_labeled.tsv", sep="\t")
    for r in rows:  # each line is its own row of the test file
        assert r["text"] == test.sentence[r["index"]]
        assert r["reference"] == ["negative", "positive"][test.label[r["index"]]]
    table = next(run_dir.glob("wandb/offline-run-*/files/media/table/test/predictions_*.table.json"))
    written = json.loads(table.read_text())
    assert written["columns"] == list(rows[0]) and written["data"][0] == list(rows[0].values())


@requires_data
@pytest.mark.slow
def test_two_ddp_ranks_write_one_file_of_every_example_once(tmp_path):
    from conftest import run_cli

    # 1,821 test sentences over two ranks: the sampler pads rank 1 with a repeat of sentence 0.
    result = run_cli(["experiment=sst2-lstm", *FAST, "trainer.limit_test_batches=1.0", "model.hidden_size=32",
                      "model.embedding_size=32", "task.data.batch_size=16", "+task.data.eval_batch_size=1000",
                      "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"paths.output_root={tmp_path}"],
                     timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(json.loads((tmp_path / "results.jsonl").read_text())["run_dir"])
    rows = read_lines(run_dir / "predictions.jsonl")
    assert [r["index"] for r in rows] == list(range(1821))
    assert not list(run_dir.glob("*.partial"))
    # One process over the same checkpoint labels every sentence alike (and counts none twice).
    alone = evaluate_run(entry_cfg("evaluate", [f"run={run_dir}", "device=cpu"]))
    assert [r["prediction"] for r in read_lines(alone["predictions"])] == [r["prediction"] for r in rows]
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(alone["metrics"]["test/acc"], abs=1e-6)


# Decoders translate as prefix LMs: both kinds, scored with all three metrics.
GENERATORS = {
    "transformer": ["model.n_layer=1", "model.n_decoder_layer=1", "model.d_model=64", "model.d_ff=128", "model.n_head=2"],
    "gpt2-tiny": ["tokenizer=bpe", "model.n_layer=1", "model.n_embd=64", "model.n_head=2"],
}  # fmt: skip


@pytest.fixture(scope="module", params=list(GENERATORS))
def toy_translation(request, tmp_path_factory):
    """A tiny generator trained 60 steps on the toy language pair of test_seq2seq: far from perfect, not zero."""
    from conftest import make_cfg

    root = tmp_path_factory.mktemp("toy")
    write_aligned(root / "pairs", splits=(("train", 300), ("val", 16), ("test", 24)))
    overrides = ["task=seq2seq", f"task.data.path={root / 'pairs'}", "task.data.source_column=en",
                 "task.data.target_column=de", "tokenizer.vocab_size=300", f"model={request.param}",
                 *GENERATORS[request.param], "logger=none", "task.data.batch_size=16", "trainer.max_steps=60",
                 "trainer.val_check_interval=60", "optimizer.lr=3e-3", "scheduler.warmup_steps=10",
                 "task.module.metrics=[bleu,chrf,rouge]", "task.module.num_beams=2", "task.module.max_new_tokens=16"]  # fmt: skip
    return run_training(make_cfg(overrides, root / "outputs")), root


@pytest.mark.slow
def test_seq2seq_lines_give_corpus_bleu_chrf_and_rouge(toy_translation):
    record, root = toy_translation
    metrics = record["metrics"]
    rows = read_lines(Path(record["run_dir"]) / "predictions.jsonl")
    assert [r["index"] for r in rows] == list(range(24))
    sources = (root / "pairs" / "test.en").read_text().splitlines()
    assert [r["source"] for r in rows] == sources
    hypotheses, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    assert metrics["test/chrf"] > 0 and metrics["test/rouge1"] > 0, metrics  # a check that means something
    assert sacrebleu.corpus_bleu(hypotheses, [references]).score == pytest.approx(metrics["test/bleu"], abs=1e-4)
    assert sacrebleu.corpus_chrf(hypotheses, [references]).score == pytest.approx(metrics["test/chrf"], abs=1e-4)
    rouge = rouge_score(hypotheses, references, rouge_keys=("rouge1", "rouge2", "rougeL"))
    for key in ("rouge1", "rouge2", "rougeL"):
        assert 100 * float(rouge[f"{key}_fmeasure"]) == pytest.approx(metrics[f"test/{key}"], abs=1e-3)
        # torchmetrics' corpus ROUGE is the mean of the sentences' ROUGE: the lines' own scores
        assert sum(r[key] for r in rows) / len(rows) == pytest.approx(metrics[f"test/{key}"], abs=1e-3)
    first = rows[0]
    assert first["bleu"] == pytest.approx(sacrebleu.sentence_bleu(first["prediction"], [first["reference"]]).score)


@pytest.mark.slow
def test_evaluate_writes_the_same_lines_beside_its_record(toy_translation):
    record, _ = toy_translation
    evaluated = evaluate_run(entry_cfg("evaluate", [f"run={record['run_dir']}", "device=cpu"]))
    path = Path(record["run_dir"]) / "eval-test-predictions.jsonl"
    assert evaluated["predictions"] == str(path)
    assert path.read_text() == (Path(record["run_dir"]) / "predictions.jsonl").read_text()
    assert evaluated["metrics"]["test/bleu"] == pytest.approx(record["metrics"]["test/bleu"], abs=1e-6)


@requires_data
@pytest.mark.slow
def test_tagging_lines_give_the_entity_scores(cfg_factory):
    record = run_training(cfg_factory(["model=lstm", "task=conll2003", *FAST, "model.hidden_size=32",
                                       "model.embedding_size=32", "task.data.eval_batch_size=32"]))  # fmt: skip
    metrics = record["metrics"]
    rows = read_lines(Path(record["run_dir"]) / "predictions.jsonl")
    assert [r["index"] for r in rows] == list(range(64))
    sentences, _ = read_conll(Path(DATA_DIR) / "conll2003" / "test.txt")
    assert all(r["words"] == sentences[r["index"]] and len(r["prediction"]) == len(r["words"]) for r in rows)
    gold, predicted = [r["reference"] for r in rows], [r["prediction"] for r in rows]
    assert metrics["test/f1"] > 0, metrics
    assert f1_score(gold, predicted) == pytest.approx(metrics["test/f1"], abs=1e-6)
    assert precision_score(gold, predicted) == pytest.approx(metrics["test/precision"], abs=1e-6)
    assert recall_score(gold, predicted) == pytest.approx(metrics["test/recall"], abs=1e-6)
    assert all(e["text"] == " ".join(r["words"][e["start"] : e["end"]]) for r in rows for e in r["entities"])
    gold_entities = sum(len(r["reference_entities"]) for r in rows)
    assert gold_entities == sum(t.startswith("B-") for tags in gold for t in tags)  # IOB2: one B- per entity


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_f1(prediction: str, gold: str) -> float:
    ours, theirs = squad_normalize(prediction).split(), squad_normalize(gold).split()
    common = sum((Counter(ours) & Counter(theirs)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


@requires_data
@pytest.mark.slow
def test_question_answering_lines_give_exact_match_and_f1(cfg_factory):
    record = run_training(cfg_factory(["model=bert-tiny", "task=squad", *FAST, "task.data.max_length=128",
                                       "task.data.stride=32", "task.data.batch_size=8", "task.data.eval_batch_size=8"]))  # fmt: skip
    metrics = record["metrics"]
    rows = read_lines(Path(record["run_dir"]) / "predictions.jsonl")
    assert len(rows) == 16
    em = [100 * max(squad_normalize(r["prediction"]) == squad_normalize(g) for g in r["reference"]) for r in rows]
    f1 = [100 * max(squad_f1(r["prediction"], g) for g in r["reference"]) for r in rows]
    assert metrics["test/f1"] > 0, metrics
    assert sum(em) / len(rows) == pytest.approx(metrics["test/em"], abs=1e-4)
    assert sum(f1) / len(rows) == pytest.approx(metrics["test/f1"], abs=1e-4)
    assert [r["exact_match"] for r in rows] == pytest.approx(em) and [r["f1"] for r in rows] == pytest.approx(f1)
    squad = json.loads((Path(DATA_DIR) / "squad" / "dev-v1.1.json").read_text())["data"]
    questions = {q["id"]: (q["question"], p["context"]) for a in squad for p in a["paragraphs"] for q in p["qas"]}
    assert all(questions[r["id"]] == (r["question"], r["context"]) for r in rows)  # index and id name one question
    assert all(r["prediction"] in r["context"] for r in rows)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Tiny Shakespeare cut into train, validation and test files (test: 3,000 characters)."""
    text = (Path(__file__).resolve().parents[1] / "src/lmforge/data/builtin/tinyshakespeare.txt").read_text()
    for name, (start, end) in {"train": (0, 30_000), "valid": (30_000, 33_000), "test": (33_000, 36_000)}.items():
        (tmp_path / f"{name}.txt").write_text(text[start:end])
    return tmp_path


def corpus_overrides(folder: Path, source: str = "task.source") -> list[str]:
    return [f"{source}.files={folder / 'train.txt'}", f"{source}.validation_files={folder / 'valid.txt'}",
            f"{source}.test_files={folder / 'test.txt'}"]  # fmt: skip


@pytest.mark.slow
def test_language_model_lines_are_windows_whose_losses_give_the_split_loss(cfg_factory, corpus):
    record = run_training(cfg_factory(["model=gpt2-tiny", "tokenizer=char", "task=text", *corpus_overrides(corpus),
                                       *FAST, "task.data.block_size=64", "task.data.batch_size=8", "model.n_layer=1",
                                       "model.n_embd=32", "model.n_head=2", "task.module.sample_tokens=8"]))  # fmt: skip
    run_dir = Path(record["run_dir"])
    rows = read_lines(run_dir / "predictions.jsonl")
    assert len(rows) == 16 and len({r["index"] for r in rows}) == 16
    assert token_mean(rows) == pytest.approx(record["metrics"]["test/loss"], abs=1e-5)
    test = (corpus / "test.txt").read_text()
    assert all(r["tokens"] == 64 and r["text"] == test[64 * r["index"] : 64 * r["index"] + 65] for r in rows)
    # lmforge-evaluate on the validation split writes its own file, the same way.
    evaluated = evaluate_run(entry_cfg("evaluate", [f"run={run_dir}", "split=validation", "limit_batches=2"]))
    rows = read_lines(run_dir / "eval-validation-predictions.jsonl")
    assert len(rows) == 16 and token_mean(rows) == pytest.approx(evaluated["metrics"]["val/loss"], abs=1e-5)


@requires_data
@pytest.mark.slow
def test_masked_lm_lines_give_the_test_loss_and_accuracy(cfg_factory, corpus):
    record = run_training(cfg_factory(["model=bert-tiny", "task=mlm", "task/source=text",
                                       *corpus_overrides(corpus, "task.source"), *FAST, "task.data.block_size=30",
                                       "task.data.batch_size=8"]))  # fmt: skip
    metrics = record["metrics"]
    rows = read_lines(Path(record["run_dir"]) / "predictions.jsonl")
    assert len(rows) == 16 and all(0 < r["tokens"] <= 30 for r in rows)
    assert token_mean(rows) == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert sum(r["correct"] for r in rows) / sum(r["tokens"] for r in rows) == pytest.approx(
        metrics["test/acc"], abs=1e-6
    )
    assert torch.tensor(metrics["test/loss"]).exp().item() == pytest.approx(metrics["test/ppl"], rel=1e-4)
