"""lmforge-predict: labels with probabilities from a classification run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, entry_cfg, make_cfg, requires_data
from lmforge.errors import LmforgeError
from lmforge.inference import evaluate_run, predict_from_run

pytestmark = [requires_data, pytest.mark.slow]


def test_a_short_sst2_run_is_well_above_chance_and_saves_its_confusion_matrix(sst2_run):
    assert sst2_run["metrics"]["best_val/acc"] > 0.75, sst2_run["metrics"]
    assert (Path(sst2_run["run_dir"]) / "confusion_matrix.png").stat().st_size > 1000


def test_predict_labels_an_obvious_positive_and_negative(sst2_run, capsys, tmp_path):
    texts = ["a gorgeous , witty and moving film", "a dull , boring and lifeless mess"]
    out = tmp_path / "predictions.jsonl"
    results = predict_from_run(entry_cfg("predict", [f"run={sst2_run['run_dir']}", f"text={json.dumps(texts)}",
                                                     f"output={out}"]))  # fmt: skip
    assert [r["label"] for r in results] == ["positive", "negative"]
    for r in results:
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-3)
        assert r["probability"] == max(r["probabilities"].values()) > 0.5
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == results == [json.loads(line) for line in out.read_text().splitlines()]


def test_predict_reads_a_file_of_texts_or_json_lines(sst2_run, tmp_path):
    plain, lines = tmp_path / "texts.txt", tmp_path / "texts.jsonl"
    plain.write_text("a gorgeous , witty and moving film\n\na dull , boring and lifeless mess\n")
    lines.write_text('{"review": "a gorgeous , witty and moving film"}\n')
    from_plain = predict_from_run(entry_cfg("predict", [f"run={sst2_run['run_dir']}", f"file={plain}"]))
    assert [r["label"] for r in from_plain] == ["positive", "negative"]  # blank lines skipped
    from_jsonl = predict_from_run(entry_cfg("predict", [f"run={sst2_run['run_dir']}", f"file={lines}",
                                                        "text_field=review"]))  # fmt: skip
    assert from_jsonl[0]["label"] == "positive"
    with pytest.raises(LmforgeError, match="not JSON lines with a 'text' field"):
        predict_from_run(entry_cfg("predict", [f"run={sst2_run['run_dir']}", f"file={lines}"]))


def test_predict_refuses_a_language_model_and_needs_a_run(tmp_path):
    from lmforge.training import run_training

    lm = run_training(make_cfg(TINY, tmp_path))
    with pytest.raises(LmforgeError, match="does not label texts"):
        predict_from_run(entry_cfg("predict", [f"run={lm['run_dir']}", "text=hello"]))
    code = "import sys; from lmforge.cli import predict; sys.argv = ['lmforge-predict']; predict()"
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: Say which run and what to label: lmforge-predict run=<run dir>")


def test_evaluate_reproduces_the_test_accuracy_of_training(sst2_run):
    (Path(sst2_run["run_dir"]) / "confusion_matrix.png").unlink()
    record = evaluate_run(entry_cfg("evaluate", [f"run={sst2_run['run_dir']}", "limit_batches=5"]))
    assert record["split"] == "test"
    assert record["metrics"]["test/acc"] == pytest.approx(sst2_run["metrics"]["test/acc"], abs=1e-6)
    assert (Path(sst2_run["run_dir"]) / "confusion_matrix.png").is_file()  # written into the run dir again
