"""A property of every command: whatever value a config leaf is given, the command either runs or
stops with at most three lines on stderr, exit status 1 and no traceback, writing over nothing.

The leaves come from the composed configs themselves (not a list kept by hand), each tried with
values of its own type that are likely to break something: zero, negative, an empty string, text
where a number goes. The cases run in one child process (imports paid once), each as the command
would run it, with stderr captured per case.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, TINY, entry_cfg, make_cfg
from lmforge.training import run_training

pytestmark = pytest.mark.slow

SKIP = ("hydra", "paths", "resume", "init_from", "stages", "run_id", "run", "experiment", "data_dir")
# How many leaves of train.yaml to try in one CI run (fixed seed); generate's are all tried.
TRAIN_SAMPLE = 40


def bad_values(value) -> list[str]:
    """Values of ``value``'s type (and one of another type) likely to break what reads it."""
    if isinstance(value, bool):
        return ["maybe"]
    if isinstance(value, int):
        return ["0", "-1", "abc"]
    if isinstance(value, float):
        return ["0.0", "-1.0"]
    if isinstance(value, str):
        return ["''", "no/such/path"]  # relative: the child runs in a temporary folder
    if value is None:  # a key whose type the config does not show: a word and a negative number
        return ["nonsense", "-1"]
    return []


def leaf_cases(cfg, sample: int | None, seed: int = 0) -> list[tuple[str, str]]:
    """(key, value) pairs: every plain leaf of ``cfg`` (not an interpolation, not a target) with its bad values."""
    container = OmegaConf.to_container(cfg, resolve=False)
    leaves = []

    def walk(node, prefix):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{path}.")
            elif not str(key).startswith("_") and key != "name" and not path.startswith(SKIP):
                interpolated = isinstance(value, str) and "${" in value
                leaves.extend((path, bad) for bad in ([] if interpolated else bad_values(value)))

    walk(container, "")
    if sample is not None and len(leaves) > sample:
        leaves = random.Random(seed).sample(leaves, sample)
    return sorted(leaves)


def drive(cases_file: str) -> None:
    """Child process: run each case's command in this process; write what each printed and returned."""
    from hydra.core.global_hydra import GlobalHydra

    from lmforge import cli

    results = []
    for case in json.loads(Path(cases_file).read_text()):
        GlobalHydra.instance().clear()
        sys.argv = [f"lmforge-{case['command']}", *case["argv"]]
        err = io.StringIO()
        code, escaped = 0, None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                getattr(cli, case["command"])()
            except SystemExit as exit_:
                code = exit_.code or 0
            except BaseException as exc:  # noqa: BLE001 - what escapes is exactly what this test looks for
                escaped = f"{type(exc).__name__}: {exc}"
        results.append({**case, "code": code, "stderr": err.getvalue(), "escaped": escaped})
    Path(cases_file).with_suffix(".out.json").write_text(json.dumps(results))


def run_cases(cases: list[dict], tmp_path: Path) -> list[dict]:
    """Run ``cases`` in one child process and return their results."""
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    code = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from test_bad_values import drive; drive(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(cases_file)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(cases_file.with_suffix(".out.json").read_text())


def failures(results: list[dict]) -> list[str]:
    """The cases that broke the property, one line each."""
    bad = []
    for r in results:
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        what = f"{r['command']} {' '.join(r['argv'][-1:])}"
        if r["escaped"]:
            bad.append(f"{what}: escaped {r['escaped'][:200]}")
        elif "Traceback" in r["stderr"]:
            bad.append(f"{what}: printed a traceback")
        elif r["code"] not in (0, 1):
            bad.append(f"{what}: exit status {r['code']}")
        elif r["code"] == 1 and (len(lines) > 3 or not any(line.startswith("error: ") for line in lines)):
            bad.append(f"{what}: {len(lines)} lines: {' | '.join(lines)[:300]}")
    return bad


def test_every_train_leaf_given_a_bad_value_runs_or_stops_in_one_sentence(tmp_path):
    base = ["debug=fast", "logger=none", "task.module.sample_tokens=8", f"paths.output_root={tmp_path / 'out'}"]
    cfg = make_cfg(base, tmp_path / "out")
    cases = [{"command": "train", "argv": [*base, f"{key}={value}"]} for key, value in leaf_cases(cfg, TRAIN_SAMPLE)]
    results = run_cases(cases, tmp_path)
    assert len(results) == len(cases)
    assert not failures(results), "\n".join(failures(results))


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A finished language-model run and a finished classifier run, to read from."""
    root = tmp_path_factory.mktemp("runs")
    lm = run_training(make_cfg([*TINY, "trainer.max_steps=2"], root))
    cls = run_training(make_cfg(["model=gru", "task=sst2", "debug=fast", "logger=none", "model.hidden_size=16",
                                 "task.data.batch_size=8"], root))  # fmt: skip
    return Path(lm["run_dir"]), Path(cls["run_dir"])


# The command, the run it reads, and the arguments each case starts from (the case's value comes last).
INFERENCE = [
    ("generate", "lm", ["prompt=ROMEO:", "max_new_tokens=4"]),
    ("evaluate", "lm", ["limit_batches=2"]),
    ("predict", "cls", ["text=a gorgeous film"]),
    ("export", "cls", ["out=exported"]),
]


def test_every_leaf_of_the_inference_commands_given_a_bad_value_runs_or_stops_in_one_sentence(tmp_path, finished_runs):
    runs = dict(zip(("lm", "cls"), finished_runs))
    saved = {p: p.read_bytes() for run in runs.values() for p in run.rglob("*") if p.is_file()}
    cases = []
    for command, run, start in INFERENCE:
        cfg = entry_cfg(command, [f"run={runs[run]}", *start] + (["out=x"] if command == "export" else []))
        for key, value in leaf_cases(cfg, None):
            cases.append({"command": command, "argv": [f"run={runs[run]}", *start, f"{key}={value}"]})
    assert {c["command"] for c in cases} == {"generate", "evaluate", "predict", "export"}
    results = run_cases(cases, tmp_path)
    assert not failures(results), "\n".join(failures(results))
    for path, content in saved.items():  # new files (eval-*.json) may appear; none is written over
        assert path.read_bytes() == content, path
