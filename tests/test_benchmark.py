"""Benchmark suites: declared runs expand and compose, records render into tables and plots, a suite resumes."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, requires_data
from lmforge.config_dirs import CONF_DIR
from lmforge.errors import LmforgeError
from lmforge.experiments.benchmark import Suite, SuiteRun, load_suite, run_overrides, selected_runs, training_plan
from lmforge.experiments.report import (
    SUITE_FILE,
    bar_groups,
    read_records,
    read_suite,
    summary_table,
    update_markdown,
    write_report,
)
from lmforge.overrides import check_group_choices, quote_override_lists

SUITES = sorted(p.stem for p in (CONF_DIR / "suite").glob("*.yaml"))


def suite_cfg(**fields):
    base = {"name": "s", "metric": "best_val/loss", "runs": {"a": ["model=gpt2-tiny"]}}
    return OmegaConf.create({**base, **fields})


def test_groups_expand_in_place_and_may_nest():
    suite = load_suite(
        suite_cfg(
            groups={"base": ["task=sst2", "@lr"], "lr": ["optimizer.lr=1e-3"]},
            runs={"a": ["model=bert-mini", "@base", "trainer.max_steps=5"]},
        )
    )
    assert suite.runs[0].overrides == ["model=bert-mini", "task=sst2", "optimizer.lr=1e-3", "trainer.max_steps=5"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"runs": {"a": ["@nope"]}}, "no group 'nope'"),
        ({"groups": {"g": ["@g"]}, "runs": {"a": ["@g"]}}, "includes itself"),
        ({"runs": {"a": ["init_from={run:b}"], "b": ["model=gpt2-tiny"]}}, "not declared before it"),
        ({"runs": {}}, "declares no runs"),
        ({"mode": "up"}, "mode must be min or max"),
        (
            {"runs": {"a": {"overrides": ["model=gpt2-tiny"], "seeds": ["b"]}}},
            "Suite s, run a: seeds must be a list of",
        ),
        ({"seeds": "one"}, "Suite s: seeds must be a list of integers"),
        ({"seeds": [1337, 1.5]}, "Suite s: seeds must be a list of integers"),  # not truncated to 1
        (
            {"runs": {"lm": ["task=text"], "sft": {"overrides": ["init_from={run:lm}"], "seeds": [1337, 2]}}},
            r"run sft is trained at seed\(s\) \[2\], where run 'lm' it starts from is not",
        ),
    ],
)
def test_bad_suites_are_one_sentence(fields, message):
    with pytest.raises(LmforgeError, match=message):
        load_suite(suite_cfg(**fields))


def test_only_takes_patterns_and_brings_the_runs_they_start_from():
    runs = [
        SuiteRun("bert-mlm", ["task=mlm"], report=False),
        SuiteRun("bert-lora", ["init_from={run:bert-mlm}"]),
        SuiteRun("gpt-lm", ["task=tinyshakespeare"], report=False),
        SuiteRun("gpt-lora", ["init_from={run:gpt-lm}"]),
    ]
    suite = Suite("peft", "PEFT", runs, [1], "best_val/acc", "max")
    assert [r.name for r in selected_runs(suite, ["gpt-*"])] == ["gpt-lm", "gpt-lora"]
    assert [r.name for r in selected_runs(suite, ["bert-lora"])] == ["bert-mlm", "bert-lora"]
    assert selected_runs(suite, None) == runs
    with pytest.raises(LmforgeError, match="no run matching t5-"):
        selected_runs(suite, ["t5-*"])
    assert run_overrides(runs[1], 7, {"bert-mlm": "/runs/mlm"}) == ["init_from=/runs/mlm", "seed=7"]


def test_a_run_with_its_own_seeds_is_trained_at_those_and_the_others_at_the_suites():
    suite = load_suite(
        suite_cfg(
            seeds=[1337],
            runs={
                "lm": {"overrides": ["task=text"], "seeds": [1337, 1, 2], "report": False},
                "sft": {"overrides": ["init_from={run:lm}"], "seeds": [1, 1337]},
                "gru": ["model=gru"],
            },
        )
    )
    plan = [(seed, run.name) for seed, run in training_plan(suite, suite.runs)]
    assert plan == [(1337, "lm"), (1337, "sft"), (1337, "gru"), (1, "lm"), (1, "sft"), (2, "lm")]
    one = load_suite(suite_cfg(seeds=5, runs={"a": {"overrides": ["model=gru"], "seeds": 3}}))
    assert (one.seeds, one.runs[0].seeds) == ([5], [3])  # one integer is a list of one
    # seeds= on the command line trains every run at those seeds, its own or not.
    assert [(seed, run.name) for seed, run in training_plan(suite, suite.runs, [5])] == [
        (5, "lm"),
        (5, "sft"),
        (5, "gru"),
    ]


@pytest.mark.parametrize("name", SUITES)
def test_every_shipped_suite_composes_into_train_configs(name):
    """A typo in a suite's overrides (a group choice, a key) fails here, not an hour into the suite."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        suite = load_suite(compose(config_name="benchmark", overrides=[f"suite={name}"]).suite)
        assert suite.name == name
        for run in suite.runs:
            overrides = run_overrides(run, 1, {n: "/tmp/run" for n in run.needs})
            check_group_choices(overrides)
            cfg = compose(config_name="train", overrides=overrides)
            assert cfg.seed == 1
            metric = suite.metric.removeprefix("best_")
            assert metric.split("/")[0] in ("val", "test"), metric


def record(run, seed, value, wall, steps=10, tokens=100.0):
    return {
        "suite": "s", "run": run, "seed": seed, "report": True, "overrides": [f"seed={seed}"], "wall_time_s": wall,
        "stages": 1, "steps": steps, "parameters": 1000, "trainable_parameters": 10, "tokens_per_s": tokens,
        "metrics": {"best_val/acc": value, "test/acc": value - 0.01},
        "curves": {"val/acc": [[5, value - 0.1], [10, value]]}, "run_dir": f"/runs/{run}-{seed}",
        "finished_at": "2026-12-01T10:00:00", "hardware": {"cpu": "test CPU", "cpu_count": 2}, "versions": {},
    }  # fmt: skip


@pytest.fixture
def report_dir(tmp_path):
    meta = {"name": "s", "title": "A suite", "metric": "best_val/acc", "mode": "max", "curve": "val/acc",
            "columns": ["test/acc"], "notes": "Some notes.", "runs": ["gru", "lstm"]}  # fmt: skip
    (tmp_path / SUITE_FILE).write_text(json.dumps(meta))
    records = [record("lstm", 1, 0.80, 60), record("gru", 1, 0.84, 120), record("gru", 2, 0.86, 180),
               record("gru", 2, 0.85, 150)]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_the_table_gives_mean_and_std_over_seeds_in_declared_order(report_dir):
    meta, records = read_suite(report_dir)
    assert [(r["run"], r["seed"]) for r in records] == [("gru", 1), ("gru", 2), ("lstm", 1)]  # latest record wins
    lines = summary_table(meta, records).splitlines()
    assert lines[0].startswith("| run | seeds | best_val/acc (higher is better) | test/acc | steps |")
    gru = [c.strip() for c in lines[2].strip("|").split("|")]
    std = statistics.stdev([0.84, 0.85])
    assert gru[:4] == ["gru", "2", f"0.8450 ± {std:.4f}", f"0.8350 ± {std:.4f}"]
    assert gru[5] == f"{statistics.fmean([2.0, 2.5]):.1f} ± {statistics.stdev([2.0, 2.5]):.1f}"  # minutes
    assert [c.strip() for c in lines[3].strip("|").split("|")][:4] == ["lstm", "1", "0.8000", "0.7900"]


def test_record_fields_are_columns_too(report_dir):
    meta, records = read_suite(report_dir)
    meta["columns"] = ["trainable_share", "step_ms"]
    for r in records:
        r["step_ms"] = 1500.0 if r["run"] == "lstm" else 20.0
    lines = summary_table(meta, records).splitlines()
    assert "| trainable (% of backbone) | ms/step |" in lines[0]
    assert lines[3].startswith("| lstm | 1 | 0.8000 | 1.0000 | 1,500 |")  # 10 of 1,000 parameters train


def test_report_files_and_a_results_section_that_is_rewritten_in_place(report_dir, tmp_path):
    report = write_report(report_dir)
    text = report.read_text()
    assert "# A suite" in text and "Some notes." in text and "test CPU (2 cores)" in text
    for png in ("curves.png", "metric_vs_time.png"):
        assert (report_dir / png).read_bytes()[:4] == b"\x89PNG"
    md = tmp_path / "docs" / "RESULTS.md"
    md.parent.mkdir()
    md.write_text("# Results\n\nHand-written intro.\n")
    update_markdown(md, report_dir)
    first = md.read_text()
    assert first.startswith("# Results\n\nHand-written intro.\n\n<!-- suite:s")
    assert "![s: validation curves](../curves.png)" in first  # relative to the markdown file
    md.write_text(first + "\nA closing paragraph.\n")
    with open(report_dir / "results.jsonl", "a") as f:
        f.write(json.dumps(record("lstm", 2, 0.82, 60)) + "\n")
    update_markdown(md, report_dir)
    second = md.read_text()
    assert second.count("<!-- suite:s") == 1 and second.endswith("A closing paragraph.\n")
    assert "| lstm | 2 | 0.8100 ± 0.0141 |" in second


def test_bars_compare_rows_column_by_column_where_each_row_scores_some_columns(report_dir):
    """The instruct suite's shape: a mixture row scores every task, a single-task row only its own."""
    meta, records = read_suite(report_dir)
    meta.update(bars=True, metric="test/a", columns=["test/b"])
    for r in records:
        r["metrics"] = {"test/a": 10.0 * r["seed"], "test/b": 1.0} if r["run"] == "gru" else {"test/b": 3.0}
    assert bar_groups(meta, records) == {
        "test/a": [("gru", 15.0, pytest.approx(statistics.stdev([10.0, 20.0])), False)],  # lstm has no test/a
        "test/b": [("gru", 1.0, 0.0, False), ("lstm", 3.0, 0.0, False)],
    }
    (report_dir / SUITE_FILE).write_text(json.dumps(meta))
    with open(report_dir / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert "![s: each column](bars.png)" in write_report(report_dir).read_text()
    assert (report_dir / "bars.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_a_folder_without_a_suite(tmp_path):
    with pytest.raises(LmforgeError, match="not a benchmark report folder"):
        write_report(tmp_path)


def run_module(function: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    code = f"import sys; from lmforge.cli import {function}; sys.argv[0] = 'lmforge-{function}'; {function}()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.slow
@requires_data
def test_smoke_suite_end_to_end_resumes_and_reports(tmp_path):
    out = tmp_path / "smoke"
    done = run_module("benchmark", ["suite=smoke", f"out={out}", "seeds=[1]"])
    assert done.returncode == 0, done.stderr[-2000:]
    records = read_records(out)
    assert [(r["run"], r["seed"]) for r in records] == [("char-gpt", 1), ("char-gpt-continued", 1)]
    first, second = records
    assert f"init_from={first['run_dir']}" in second["overrides"]  # the second run started from the first
    assert first["steps"] == 8 and first["wall_time_s"] > 0 and first["parameters"] > 0
    assert [step for step, _ in first["curves"]["val/loss"]] == [3, 7]
    assert first["metrics"]["best_val/loss"] == pytest.approx(min(v for _, v in first["curves"]["val/loss"]), abs=1e-6)
    report = (out / "report.md").read_text()
    assert "| char-gpt | 1 |" in report and "| char-gpt-continued | 1 |" in report

    again = run_module("benchmark", ["suite=smoke", f"out={out}", "seeds=[1]"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(read_records(out)) == 2 and (again.stdout + again.stderr).count("recorded already") == 2
    (out / "report.md").unlink()
    rendered = run_module("report", [str(out)])
    assert rendered.returncode == 0 and (out / "report.md").read_text() == report

    failed = run_module("benchmark", ["suite=smoke", f"out={tmp_path / 'bad'}", "seeds=[1]", "extra=[model.n_head=3]"])
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("error: 1 run(s) failed: char-gpt (seed 1)")
    assert "skipping char-gpt-continued seed 1" in failed.stdout + failed.stderr


def test_extra_overrides_reach_hydra_as_quoted_list_items():
    assert quote_override_lists(["extra=[trainer.max_steps=20,optimizer.betas=[0.9,0.98]]", "seeds=[1,2]"]) == [
        "extra=['trainer.max_steps=20','optimizer.betas=[0.9,0.98]']",
        "seeds=[1,2]",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        args = quote_override_lists(["suite=smoke", "extra=[trainer.max_steps=20,optimizer.betas=[0.9,0.98]]"])
        cfg = compose(config_name="benchmark", overrides=args)
    assert list(cfg.extra) == ["trainer.max_steps=20", "optimizer.betas=[0.9,0.98]"]


def test_a_bad_seed_list_is_one_sentence():
    from lmforge.experiments.benchmark import _as_list

    assert _as_list(3, int, "seeds", "integers") == [3] and _as_list(None, int, "seeds", "integers") == []
    assert _as_list(OmegaConf.create(["a-*", "b"]), str, "only", "run names") == ["a-*", "b"]
    with pytest.raises(LmforgeError, match=r"seeds must be a list of integers, as in seeds=\[1,2\], not abc"):
        _as_list("abc", int, "seeds", "integers")
