"""Generation and evaluation from a run directory."""

import json
from pathlib import Path

import pytest

from conftest import TINY, entry_cfg
from lmforge.errors import LmforgeError
from lmforge.inference import evaluate_run, generate_from_run
from lmforge.training import run_training


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import make_cfg

    return run_training(make_cfg(TINY, tmp_path_factory.mktemp("outputs")))


def test_generate_is_seeded_and_the_kv_cache_changes_nothing(trained_run, capsys):
    args = [f"run={trained_run['run_dir']}", "prompt=ROMEO:", "max_new_tokens=40", "num_samples=2", "seed=3"]
    first = generate_from_run(entry_cfg("generate", args))
    again = generate_from_run(entry_cfg("generate", args))
    assert first == again and len(first) == 2 and all(t.startswith("ROMEO:") for t in first)
    assert first[0] != first[1]  # two samples, two texts
    assert first[0] in capsys.readouterr().out
    greedy = [*args, "greedy=true", "max_new_tokens=80"]
    cached = generate_from_run(entry_cfg("generate", greedy))
    assert cached == generate_from_run(entry_cfg("generate", [*greedy, "use_cache=false"]))


def test_evaluate_reproduces_the_training_validation_loss(trained_run):
    cfg = entry_cfg("evaluate", [f"run={trained_run['run_dir']}", "checkpoint=last", "limit_batches=2"])
    record = evaluate_run(cfg)
    assert record["split"] == "validation"  # Tiny Shakespeare has no test split
    assert record["metrics"]["val/loss"] == pytest.approx(trained_run["metrics"]["val/loss"], abs=1e-5)
    written = json.loads((Path(trained_run["run_dir"]) / "eval-validation.json").read_text())
    assert written["metrics"] == record["metrics"]
    with pytest.raises(LmforgeError, match="has no test split"):
        evaluate_run(entry_cfg("evaluate", [f"run={trained_run['run_dir']}", "split=test"]))


def test_corrupt_checkpoint_is_one_sentence(trained_run, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LmforgeError, match="cannot be read"):
        generate_from_run(entry_cfg("generate", [f"run={trained_run['run_dir']}", f"checkpoint={bad}"]))


def test_cli_generate_prints_text_and_a_missing_run_is_one_sentence(trained_run):
    import subprocess
    import sys

    def cli(*args):
        code = (
            "import sys; from lmforge.cli import generate; sys.argv = ['lmforge-generate', *sys.argv[1:]]; generate()"
        )
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)

    ok = cli(f"run={trained_run['run_dir']}", "prompt=KING:", "max_new_tokens=20")
    assert ok.returncode == 0 and ok.stdout.startswith("KING:")
    missing = cli()
    assert missing.returncode == 1
    assert missing.stderr.strip() == 'error: Say which run to use: lmforge-generate run=<run dir> prompt="ROMEO:"'
