"""A user's own labelled files: task=text-classification with task.data.path=..."""

import json
import random

import pytest

from lmforge.data.classification import LabeledTexts
from lmforge.errors import LmforgeError
from lmforge.training import run_training

WORDS = {"pos": ["great", "lovely", "superb", "fun"], "neg": ["awful", "dull", "boring", "bad"],
         "meh": ["okay", "fine", "average", "passable"]}  # fmt: skip


def reviews(n: int, seed: int = 0) -> list[dict]:
    """Short synthetic reviews whose label is told by their adjectives."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        rows.append(
            {"review": f"the film was {rng.choice(WORDS[label])} and {rng.choice(WORDS[label])}", "stars": label}
        )
    return rows


def write_csv(path, rows, sep=","):
    path.write_text("review" + sep + "stars\n" + "".join(f"{r['review']}{sep}{r['stars']}\n" for r in rows))


def test_one_file_is_split_and_string_labels_are_discovered(tmp_path):
    write_csv(tmp_path / "reviews.csv", reviews(200))
    source = LabeledTexts(name="mine", path=str(tmp_path / "reviews.csv"), text_column="review",
                          label_column="stars", holdout_fraction=0.25, seed=1)  # fmt: skip
    texts = source.load(None)
    assert source.label_names == ["meh", "neg", "pos"]
    assert len(texts["train"]["text"]) == 150 and len(texts["validation"]["text"]) == 50
    for text, label in zip(texts["train"]["text"], texts["train"]["label"], strict=True):
        assert text.split()[3] in WORDS[source.label_names[label]]  # each text kept its own label
    assert source.load(None)["validation"].to_dict() == texts["validation"].to_dict()  # the split is seeded


def test_a_folder_of_json_lines_splits_and_bad_columns(tmp_path):
    for name, n in (("train", 60), ("dev", 20), ("test", 20)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews(n, seed=len(name))))
    source = LabeledTexts(name="mine", path=str(tmp_path), text_column="review", label_column="stars")
    texts = source.load(None, required=("train", "validation", "test"))
    assert {k: len(v["text"]) for k, v in texts.items()} == {"train": 60, "validation": 20, "test": 20}
    with pytest.raises(LmforgeError, match="has no column 'text' .*set task.data.text_column"):
        LabeledTexts(name="mine", path=str(tmp_path), label_column="stars").load(None)
    with pytest.raises(LmforgeError, match="does not exist"):
        LabeledTexts(name="mine", path=str(tmp_path / "nope.csv")).load(None)


@pytest.mark.slow
def test_text_classification_task_trains_on_a_users_tsv(cfg_factory, tmp_path):
    write_csv(tmp_path / "reviews.tsv", reviews(600), sep="\t")
    record = run_training(cfg_factory(["task=text-classification", f"task.data.path={tmp_path / 'reviews.tsv'}",
                                       "task.data.text_column=review", "task.data.label_column=stars",
                                       "model=gru", "model.hidden_size=32", "logger=none", "trainer.max_steps=60",
                                       "trainer.val_check_interval=30", "optimizer.lr=3e-3"]))  # fmt: skip
    assert record["metrics"]["val/acc"] > 0.9, record["metrics"]  # the adjectives give the label away
    config = (tmp_path / "outputs").rglob("config.yaml")
    assert "reviews.tsv" in next(config).read_text()
