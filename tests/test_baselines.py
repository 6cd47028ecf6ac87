"""Baseline rows of the benchmark suites: each method on a tiny hand-made input gives the hand-computed
value through the tasks' own metric code; suites declare them; reports show them first."""

from __future__ import annotations

import json
import math

import pytest
from datasets import Dataset
from omegaconf import OmegaConf

from conftest import requires_data
from lmforge.errors import LmforgeError
from lmforge.experiments import baseline_methods as bm
from lmforge.experiments.baselines import TaskData, baseline_metrics, load_task_data, parse_baselines
from lmforge.experiments.benchmark import load_suite, selected_baselines, selected_runs
from lmforge.experiments.report import SUITE_FILE, read_suite, seeds_table, summary_table, write_report

# -- the methods ---------------------------------------------------------------------------------

DIALOGUE = "Amy: hi\r\nBob: are we still on for the game tonight\r\nAmy: yes\r\nBob: great see you at eight\r\nAmy: ok"


def test_lead_and_longest_pick_utterances_in_dialogue_order():
    assert bm.lead(DIALOGUE, 3) == "Amy: hi Bob: are we still on for the game tonight Amy: yes"
    # The two longest (9 and 6 words), in dialogue order; ties would go to the earlier turn.
    assert bm.longest(DIALOGUE, 2) == "Bob: are we still on for the game tonight Bob: great see you at eight"
    assert bm.longest("A: x\nB: y", 3) == "A: x B: y"


def rows(**columns):
    return Dataset.from_dict(columns)


def test_lead_is_scored_by_the_summarization_rouge_and_validation_keeps_the_tasks_limit():
    # ROUGE of "the cat sat on the mat" against "the cat sat on a mat": 5 of 6 words (R-1, R-L), 3 of 5 bigrams.
    pairs = rows(source=["the cat sat on the mat\nbye now", "nothing alike here"], target=["the cat sat on a mat"] * 2)
    data = TaskData({"validation": pairs, "test": pairs.select([0])}, metrics=("rouge",), val_limit=1)
    metrics = baseline_metrics(parse_baselines({"lead-1": {"method": "lead", "n": 1}}, "samsum", "s", [])[0], data, "")
    for prefix in ("val", "best_val", "test"):  # validation scores only the first pair, as the task does
        assert metrics[f"{prefix}/rouge1"] == pytest.approx(100 * 5 / 6, abs=1e-4)
        assert metrics[f"{prefix}/rouge2"] == pytest.approx(60.0, abs=1e-4)
        assert metrics[f"{prefix}/rougeL"] == pytest.approx(100 * 5 / 6, abs=1e-4)


def test_copy_source_is_scored_by_sacrebleu():
    same = "a man in a red shirt rides a bike down the hill"
    pairs = rows(source=[same, "two dogs play"], target=[same, "zwei Hunde spielen"])
    data = TaskData({"validation": pairs.select([0]), "test": pairs.select([1])}, metrics=("bleu", "chrf"))
    metrics = baseline_metrics(parse_baselines({"c": {"method": "copy-source"}}, "multi30k", "s", [])[0], data, "")
    assert metrics["val/bleu"] == pytest.approx(100.0) and metrics["val/chrf"] == pytest.approx(100.0)
    assert metrics["test/bleu"] == 0.0  # no word in common


def test_majority_class_of_the_training_split():
    assert bm.majority_label([0, 1, 1, 2, 2]) == 1  # a tie goes to the smaller label
    data = TaskData(
        {"train": rows(label=[1, 1, 0]), "validation": rows(label=[1, 0]), "test": rows(label=[0, 0, 0, 1])},
        num_classes=2,
    )
    metrics = baseline_metrics(parse_baselines({"m": {"method": "majority"}}, "sst2", "s", [])[0], data, "")
    assert metrics["val/acc"] == pytest.approx(0.5) and metrics["test/acc"] == pytest.approx(0.25)
    # Macro F1: the predicted class has P 1/4, R 1 (F1 0.4); the other 0.
    assert metrics["test/f1"] == pytest.approx(0.2)


TAGS = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]


def tag_ids(*names):
    return [TAGS.index(n) for n in names]


def test_dictionary_lookup_takes_the_longest_known_entity_and_its_most_frequent_type():
    train = rows(
        tokens=[["John", "Smith", "visited", "Paris"], ["Paris", "Hilton", "smiled"], ["in", "Paris"]],
        tags=[tag_ids("B-PER", "I-PER", "O", "B-LOC"), tag_ids("B-PER", "I-PER", "O"), tag_ids("O", "B-LOC")],
    )
    words = ["Paris", "Hilton", "met", "John", "Smith", "in", "Paris"]
    predicted = ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-LOC"]
    dictionary = bm.entity_dictionary(train["tokens"], [[TAGS[t] for t in row] for row in train["tags"]])
    assert dictionary == {("John", "Smith"): "PER", ("Paris",): "LOC", ("Paris", "Hilton"): "PER"}
    assert bm.dictionary_tags(words, dictionary) == predicted
    # Gold: "John" alone is the person, so 2 of the 3 predicted entities are right and 2 of the 3 gold found.
    test = rows(tokens=[words], tags=[tag_ids("B-PER", "I-PER", "O", "B-PER", "O", "O", "B-LOC")])
    data = TaskData({"train": train, "validation": test, "test": test}, tag_names=TAGS)
    metrics = baseline_metrics(parse_baselines({"d": {"method": "dictionary"}}, "conll2003", "s", [])[0], data, "")
    assert metrics["test/precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["test/f1"] == pytest.approx(2 / 3, abs=1e-6)


def questions(context, question, answers):
    return rows(id=["q"], context=[context], question=[question], answers=[{"text": answers, "answer_start": [0]}])


def test_sliding_window_picks_the_candidate_nearest_the_question_words():
    context = "The Normans lived in Normandy. Rollo led the Norse with Hastein."
    # The second sentence shares 3 words and 2 bigrams with the question; its candidates are "Rollo" and
    # "Hastein". The best window of 5 words holds 4 of their words for both (the same words but one, each
    # seen once), but "Rollo" is 1 word from "led" and "Hastein" 2 from "Norse" (over 6).
    assert bm.sliding_window_answer(context, "Who led the Norse?") == "Rollo"
    words = ["rollo", "led", "the", "norse", "with", "hastein", "."]
    assert bm._window_score(words, {"who", "led", "the", "norse", "rollo"}, dict.fromkeys(words, math.log(2))) == (
        pytest.approx(4 * math.log(2))
    )
    assert bm._distance(words, 5, 5, {"who", "led", "the", "norse"}) == pytest.approx(2 / 6)
    data = TaskData({"validation": questions(context, "Who led the Norse?", ["Rollo"]), "test": questions(context, "Who led the Norse?", ["Hastein"])})  # fmt: skip
    metrics = baseline_metrics(parse_baselines({"w": {"method": "sliding-window"}}, "squad", "s", [])[0], data, "")
    assert (metrics["val/em"], metrics["val/f1"], metrics["test/f1"]) == (100.0, 100.0, 0.0)


def test_best_sentence_oracle_is_scored_by_squad_f1():
    context = "Rollo led the Norse. The Normans lived in Normandy in the 10th century."
    assert bm.sentence_spans(context) == [(0, 20), (21, len(context))]
    assert bm.best_sentence(context, ["10th century"]) == "The Normans lived in Normandy in the 10th century."
    # SQuAD normalisation leaves 7 words ("the" goes), 2 of them the answer: P 2/7, R 1, F1 4/9.
    data = TaskData({"validation": questions(context, "When?", ["10th century"]), "test": questions(context, "When?", ["Rollo"])})  # fmt: skip
    metrics = baseline_metrics(parse_baselines({"o": {"method": "best-sentence"}}, "squad", "s", [])[0], data, "")
    assert metrics["val/f1"] == pytest.approx(100 * 4 / 9, abs=1e-4) and metrics["val/em"] == 0.0
    assert metrics["test/f1"] == pytest.approx(50.0, abs=1e-4)  # "rollo led norse": P 1/3, R 1


def test_a_method_of_another_kind_of_task_is_one_sentence():
    data = TaskData({"validation": rows(label=[1]), "test": rows(label=[1])})
    baseline = parse_baselines({"lead-3": {"method": "lead"}}, "sst2", "s", [])[0]
    with pytest.raises(LmforgeError, match=r"^Suite s, baseline lead-3: method lead reads source, target, but"):
        baseline_metrics(baseline, data, "Suite s, baseline lead-3")


@requires_data
def test_sst2_majority_on_the_mirror():
    data = load_task_data("sst2")
    metrics = baseline_metrics(parse_baselines({"m": {"method": "majority"}}, "sst2", "s", [])[0], data, "")
    # 37,569 of the 67,349 training phrases are positive; 444 of 872 validation and 904 of 1,821 test sentences.
    assert metrics["val/acc"] == pytest.approx(444 / 872, abs=1e-6)
    assert metrics["test/acc"] == pytest.approx(904 / 1821, abs=1e-6)


@requires_data
def test_each_tasks_rule_replies_to_the_mixtures_own_held_out_conversations():
    """The instruct suite's baseline row: the conversations a mixture run of that seed is scored on, each task's
    rule, and the replies' scoring (SST-2: the majority label is right on exactly the conversations it names)."""
    from lmforge.data.instruct_mixture import InstructMixture
    from lmforge.experiments.instruct import rule_scores

    scores = rule_scores(seed=7, eval_per_task=40)
    tasks = ("sst2", "samsum", "multi30k", "squad", "conll2003")
    metric = {"sst2": "acc", "samsum": "rougeL", "multi30k": "bleu", "squad": "f1", "conll2003": "f1"}
    for split in ("val", "test"):
        assert all(0 < scores[f"{split}/{t}/{metric[t]}"] < 100 for t in tasks), scores
    lines = InstructMixture(eval_per_task=40, seed=7).load(None, ("test",))["test"]
    sst2 = [json.loads(line)["messages"][-1]["content"] for origin, _, line in lines if "/sst2/" in origin]
    assert len(sst2) == 40 and scores["test/sst2/acc"] == pytest.approx(100 * sst2.count("positive") / 40)
    assert scores["test/conll2003/f1"] > 30 and scores["test/samsum/rouge1"] > 20  # lookup and Lead-3 are strong


def test_a_suite_of_several_tasks_declares_a_mixture_baseline_without_a_task():
    suite = load_suite(suite_cfg(baselines={"rules": {"method": "task-rules", "seed": 1337}}))
    assert [(b.name, b.method, b.params) for b in suite.baselines] == [("rules", "task-rules", {"seed": 1337})]


# -- suites ----------------------------------------------------------------------------------------


def suite_cfg(**fields):
    base = {"name": "s", "metric": "test/rougeL", "mode": "max", "runs": {"t": ["experiment=samsum-transformer"]}}
    return OmegaConf.create({**base, **fields})


def test_a_suite_declares_baselines_and_only_selects_them():
    declared = {"lead-3": {"method": "lead", "n": 3}, "copy": {"method": "copy-source"}}
    suite = load_suite(suite_cfg(task="samsum", baselines=declared))
    assert [(b.name, b.method, b.params) for b in suite.baselines] == [("lead-3", "lead", {"n": 3}), ("copy", "copy-source", {})]  # fmt: skip
    assert suite.baselines[0].spec("samsum") == {"task": "samsum", "method": "lead", "n": 3}
    assert suite.meta()["baselines"] == ["lead-3", "copy"]
    assert selected_runs(suite, ["lead-*"]) == []
    assert [b.name for b in selected_baselines(suite, ["lead-*"])] == ["lead-3"]
    assert selected_baselines(suite, ["t"]) == [] and [r.name for r in selected_runs(suite, ["t"])] == ["t"]
    with pytest.raises(LmforgeError, match="no run matching x; its runs are t; its baselines are lead-3, copy"):
        selected_runs(suite, ["x"])


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"task": "samsum", "baselines": {"b": {"method": "lead-4"}}},
            "Suite s, baseline b: unknown method 'lead-4'; the methods are lead, longest, copy-source, majority, "
            "dictionary, sliding-window, best-sentence, task-rules.",
        ),
        (
            {"task": "samsum", "baselines": {"b": {"method": "lead", "m": 3}}},
            "method lead has no parameter m (it takes n).",
        ),  # fmt: skip
        ({"baselines": {"b": {"method": "lead"}}}, "baseline b reads a task, but the suite names none"),
        ({"baselines": {"r": {"method": "task-rules", "n": 3}}}, "method task-rules has no parameter n (it takes seed"),
        ({"task": "samsun", "baselines": {"b": {"method": "lead"}}}, "task 'samsun' is not one of"),
        ({"task": "samsum", "baselines": {"t": {"method": "lead"}}}, "'t' names both a run and a baseline"),
    ],
)
def test_bad_baselines_are_one_sentence(fields, message):
    with pytest.raises(LmforgeError) as caught:
        load_suite(suite_cfg(**fields))
    text = str(caught.value)
    assert message in text and text.startswith("Suite s") and "\n" not in text and text.endswith(".")


# -- reports ---------------------------------------------------------------------------------------


def trained_record(run, seed, value):
    return {
        "suite": "s", "run": run, "seed": seed, "report": True, "overrides": [], "wall_time_s": 600, "stages": 1,
        "steps": 100, "parameters": 1000, "trainable_parameters": 1000, "tokens_per_s": 50.0,
        "metrics": {"test/rougeL": value, "best_val/rougeL": value - 1}, "curves": {"val/rougeL": [[50, 5.0], [100, value]]},
        "run_dir": "/runs/x", "finished_at": "2026-12-01T10:00:00", "hardware": {"cpu": "test CPU", "cpu_count": 2},
        "versions": {},
    }  # fmt: skip


def baseline_record(run, value):
    return {"suite": "s", "run": run, "seed": None, "kind": "baseline", "report": True, "baseline": {},
            "metrics": {"test/rougeL": value, "best_val/rougeL": value, "val/rougeL": value},
            "finished_at": "2026-12-06T10:00:00", "hardware": {"cpu": "other CPU", "cpu_count": 64}}  # fmt: skip


def test_the_report_puts_baseline_rows_first(tmp_path):
    meta = {"name": "s", "title": "A suite", "metric": "test/rougeL", "mode": "max", "curve": "val/rougeL",
            "columns": ["best_val/rougeL"], "notes": "", "runs": ["transformer"], "baselines": ["lead-3", "longest-3"]}  # fmt: skip
    (tmp_path / SUITE_FILE).write_text(json.dumps(meta))
    # Baselines recorded after the trained run, in the other order: the table follows the declaration.
    records = [trained_record("transformer", 1337, 13.3), baseline_record("longest-3", 23.5), baseline_record("lead-3", 23.6)]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta, ordered = read_suite(tmp_path)
    assert [r["run"] for r in ordered] == ["lead-3", "longest-3", "transformer"]
    lines = summary_table(meta, ordered).splitlines()
    assert lines[2] == "| lead-3 (baseline) | — | 23.60 | 23.60 | — | — | — | — | — |"
    assert lines[3].startswith("| longest-3 (baseline) | — | 23.50 |")
    assert lines[4].startswith("| transformer | 1 | 13.30 |")
    assert "baseline" not in seeds_table(meta, ordered)
    text = write_report(tmp_path).read_text()
    assert "test CPU (2 cores)" in text and "other CPU" not in text  # where the training ran
    assert text.index("lead-3 (baseline)") < text.index("| transformer |")
    for png in ("curves.png", "metric_vs_time.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
