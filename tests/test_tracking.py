"""Tracking helpers: W&B mode choice, results table, curves."""

import json
import time

from lmforge.tracking import append_result, csv_history, keep_csv_history, plot_curves, wandb_mode


def test_wandb_goes_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    assert wandb_mode("online") == "online"  # the config's choice wins


def test_wandb_with_a_key_but_no_server_goes_offline_within_seconds(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    assert wandb_mode() == "offline"
    assert time.perf_counter() - start < 5


def test_results_table_appends_one_line_per_run(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, {"run_id": "a", "metrics": {"val/loss": 1.5}})
    append_result(path, {"run_id": "b", "metrics": {"val/loss": 1.4}})
    assert [json.loads(line)["run_id"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_curves_plot_reads_the_csv_logger_file(tmp_path):
    csv_file = tmp_path / "metrics.csv"
    csv_file.write_text("epoch,step,train/loss,val/loss\n0,9,3.0,\n0,9,,2.9\n0,19,2.5,\n0,19,,2.4\n")
    png = plot_curves([csv_file], tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_curves([tmp_path / "missing.csv"], tmp_path / "x.png") is None


def test_csv_history_keeps_the_metrics_of_every_resume(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,train/loss\n1,3.0\n")
    keep_csv_history(tmp_path)
    (tmp_path / "metrics.csv").write_text("step,train/loss\n2,2.5\n")
    keep_csv_history(tmp_path)
    assert [p.name for p in csv_history(tmp_path)] == ["metrics.part1.csv", "metrics.part2.csv", "metrics.csv"]
