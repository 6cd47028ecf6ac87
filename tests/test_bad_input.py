"""Bad input and faults, as a user meets them on the command line.

Every case of :data:`CASES` runs its command in a subprocess and must exit with status 1, print
one sentence on stderr (``error: ...``, matching the case's pattern), print no traceback, and
leave the run dirs it was pointed at exactly as they were. Adding a case is one line.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY, make_cfg

pytestmark = pytest.mark.slow

# Placeholders in argv and env: {run} a finished language-model run, {cls} a finished classifier run,
# {corrupt} a copy of {run} whose last.ckpt is garbage, {data} a folder of small data files,
# {empty} an empty folder, {out} where new runs go.
CASES = [
    # (name, argv: entry point then arguments, env, pattern of the one sentence after "error: ")
    ("unknown-model", ["train", "model=gtp2"], {}, r"Unknown model 'gtp2'; choose one of: .*gpt2-tiny"),
    ("unknown-task", ["train", "task=sst3"], {}, r"Unknown task 'sst3'; choose one of: .*sst2"),
    ("unknown-optimizer", ["train", "optimizer=adamm"], {}, r"Unknown optimizer 'adamm'; choose one of: adamw, muon, sgd\.$"),
    ("unknown-experiment", ["train", "experiment=shakespeare-chr"], {}, r"Unknown experiment 'shakespeare-chr'"),
    ("sweep-bad-value", ["train", "-m", "model=gpt2-tiny,gtp2"], {}, r"Unknown model 'gtp2'"),
    ("key-typo", ["train", "trainer.max_stpes=3"], {}, r"^trainer\.max_stpes is not a config key \(did you mean trainer\.max_steps\?\)"),
    ("model-key-typo", ["train", "model.n_layr=2"], {}, r"^model\.n_layr is not a config key \(did you mean model\.n_layer\?\)"),
    ("wrong-type", ["train", "trainer.max_steps=abc"], {}, r"^trainer\.max_steps=abc is not valid: .* takes a number \(its default is \d+\)\.$"),
    ("wrong-type-generate", ["generate", "run={run}", "max_new_tokens=many"], {}, r"^max_new_tokens=many is not valid: .* takes a number"),
    ("override-syntax", ["train", "model.n_layer=[1"], {}, r"^Cannot parse an override \(.*\[1'\); see https://hydra\.cc"),
    ("trainer-refuses-value", ["train", "trainer.precision=bogus"], {}, r"^The trainer cannot be built from trainer\.\*: Precision 'bogus' is invalid"),
    ("moved-target", ["train", "model=transformer", "task=multi30k", "task.source._target_=lmforge.data.parallel.ParallelTexts"], {}, r"^task\.source\._target_: lmforge\.data\.parallel\.ParallelTexts has moved to lmforge\.data\.seq2seq\.ParallelTexts; update the config that names it\.$"),
    ("unknown-target", ["train", "task.module._target_=lmforge.tasks.nowhere.Task"], {}, r"^task\.module\._target_: there is no lmforge\.tasks\.nowhere\.Task to import; check its module and class name\.$"),
    ("impossible-pair", ["train", "model=lstm", "task=mlm"], {}, r"needs an encoder backbone; model lstm is an RNN; models that can: bert-base, bert-mini, bert-tiny\.$"),
    ("chunked-loss-compiled", ["train", "compile=true", "task.module.loss_chunk_size=64"], {}, r"^task\.module\.loss_chunk_size cannot be used with compile=true: .*compiled forward\.$"),
    ("checkpointing-an-rnn", ["train", "model=lstm", "task=text-classification", "task.data.path={data}/reviews.csv", "activation_checkpointing=true"], {}, r"^activation_checkpointing=true needs a transformer backbone; lstm has no blocks to checkpoint\.$"),
    ("missing-dataset", ["train", "task=sst2"], {"LMFORGE_DATA": "{empty}"}, r"^Dataset 'sst2' not found: looked in .*glue/sst2.*set LMFORGE_DATA"),
    ("empty-data-file", ["train", "task=text-classification", "task.data.path={data}/empty.csv"], {}, r"^Data file .*empty\.csv is empty"),
    ("header-only-data-file", ["train", "task=text-classification", "task.data.path={data}/header-only.csv"], {}, r"^Data file .*header-only\.csv holds no examples \(a header only\)"),
    ("missing-label-column", ["train", "task=text-classification", "task.data.path={data}/stars.csv"], {}, r"has no column 'label' \(it has: text, stars\); set task\.data\.text_column"),
    ("corrupt-checkpoint", ["train", "resume={corrupt}"], {}, r"^Checkpoint .*last\.ckpt cannot be read \(\w+\); it is corrupt"),
    ("resume-other-model", ["train", "resume={run}", "model=lstm"], {}, r"^Cannot resume .* with model=lstm: the run was trained with model=gpt2-tiny; drop model= to continue it, or start a new run \(init_from="),
    ("resume-other-seed", ["train", "resume={run}", "seed=7"], {}, r"^Cannot resume .* with seed=7: the run was trained with seed=\d+; drop seed="),
    ("resume-missing-dir", ["train", "resume={out}/no-such-run"], {}, r"^Cannot resume .*no-such-run: it is not a run directory"),
    ("init-from-other-architecture", ["train", "init_from={run}", "model=lstm", "task=text-classification", "task.data.path={data}/reviews.csv"], {}, r"^init_from: .* holds no weights of this \w+ backbone\.$"),
    ("init-from-other-shape", ["train", "init_from={run}/checkpoints/last.ckpt", "model.n_embd=64"], {}, r"^init_from: transformer\.wte\.weight is \(\d+, 32\) in .* but \(\d+, 64\) in this model"),
    ("evaluate-not-a-run", ["evaluate", "run={data}"], {}, r"is not a run directory \(no config\.yaml in it\)\.$"),
    ("generate-from-classifier", ["generate", "run={cls}", "prompt=hi"], {}, r"is a text-classification run, not a language model, so it cannot generate text"),
]  # fmt: skip

ENTRY_POINTS = {
    "train": [str(REPO / "train.py")],
    **{
        name: ["-c", f"from lmforge.cli import {name}; {name}()"]
        for name in ("evaluate", "generate", "predict", "export")
    },
}
TINY_RUN = [*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "test_after_fit=false"]  # fmt: skip
CLASSIFIER_RUN = ["model=gpt2-tiny", "task=text-classification", "logger=none", "trainer.max_steps=2",
                  "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.n_layer=1", "model.n_embd=32",
                  "model.n_head=2"]  # fmt: skip


def run_entry(argv: list[str], env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run an lmforge entry point (``train``, ``evaluate``, ``generate``, ``predict``) as a user would."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    command = [sys.executable, *ENTRY_POINTS[argv[0]], *argv[1:]]
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_one_sentence(result: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit status 1, stderr exactly one ``error: `` line matching ``pattern``, no traceback; returns the sentence."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    sentence = lines[0].removeprefix("error: ")
    assert re.search(pattern, sentence), sentence
    return sentence


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: its content hash and modification time."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """The run dirs and files the cases point at, made once: two tiny finished runs, a corrupt copy, data files."""
    from lmforge.training import run_training

    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    data.mkdir()
    words = ["good", "bad", "great", "awful", "witty", "dull"]
    with open(data / "reviews.csv", "w", newline="") as f:
        rows = [[" ".join(words[(i * 7 + j) % 6] for j in range(4)), "pos" if i % 2 else "neg"] for i in range(40)]
        csv.writer(f).writerows([["text", "label"], *rows])
    with open(data / "stars.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "stars"], *[["a film", 3]] * 10])
    (data / "empty.csv").touch()
    (data / "header-only.csv").write_text("text,label\n\n")
    (root / "empty").mkdir()
    runs = root / "runs"
    lm = run_training(make_cfg(TINY_RUN, runs))["run_dir"]
    cls = run_training(make_cfg([*CLASSIFIER_RUN, f"task.data.path={data}/reviews.csv"], runs))["run_dir"]
    corrupt = root / "corrupt"
    shutil.copytree(lm, corrupt)
    (corrupt / "checkpoints" / "last.ckpt").write_bytes(os.urandom(512))
    return {"run": lm, "cls": cls, "corrupt": str(corrupt), "data": str(data), "empty": str(root / "empty"),
            "out": str(root / "out"), "root": str(root)}  # fmt: skip


@pytest.mark.parametrize(("name", "argv", "env", "pattern"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_sentence(places, name, argv, env, pattern):
    argv = [arg.format(**places) for arg in argv]
    if argv[0] == "train":
        argv.append(f"paths.output_root={places['out']}")
    before = snapshot(Path(places["root"]) / "runs") | snapshot(Path(places["corrupt"]))
    result = run_entry(argv, {key: value.format(**places) for key, value in env.items()})
    assert_one_sentence(result, pattern)
    assert snapshot(Path(places["root"]) / "runs") | snapshot(Path(places["corrupt"])) == before


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    result = run_entry(["train", *TINY, "optimizer.lr=1e30", "trainer.max_steps=6",
                        "callbacks.last_checkpoint.every_n_train_steps=1", f"paths.output_root={tmp_path}"])  # fmt: skip
    sentence = assert_one_sentence(
        result,
        r"^The training loss became (nan|inf|-inf) at step \d+, so the run stopped \(.*last\.ckpt is the last "
        r"state saved before it\); lower optimizer\.lr \(now 1e\+30\)",
    )
    step = int(re.search(r"at step (\d+)", sentence).group(1))
    last = Path(re.search(r"\((\S+last\.ckpt) is", sentence).group(1))
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] < step  # nothing was saved after the loss went bad
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    assert not (last.parent.parent / "metrics.json").exists()


def test_wandb_server_that_never_answers_falls_back_to_offline(tmp_path):
    key = "0123456789abcdef" * 2 + "deadbeef"  # a made-up 40-character key
    with socket.socket() as server:  # accepts connections, never answers: a network black hole
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        env = {"WANDB_API_KEY": key, "WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}"}
        result = run_entry(["train", *TINY_RUN, "logger=wandb", f"paths.output_root={tmp_path}"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B could not start online" in result.stdout and "logging offline instead" in result.stdout
    run_dir = next((tmp_path / "runs").glob("*/*"))
    # The run id holds the time the run started, the offline run's folder the time W&B gave up on the server.
    started = datetime.strptime(OmegaConf.load(run_dir / "config.yaml").run_id[:15], "%Y%m%d-%H%M%S")
    offline = next((run_dir / "wandb").glob("offline-run-*"))
    gave_up = datetime.strptime(offline.name.split("-")[2], "%Y%m%d_%H%M%S")
    assert (gave_up - started).total_seconds() <= 15, offline.name
    for path in run_dir.rglob("*"):
        assert not path.is_file() or key.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_a_nan_loss_under_ddp_stops_every_rank_with_one_sentence(tmp_path):
    """Both ranks stop at the same step (neither waits forever on the other) and one sentence is printed."""
    result = run_entry(["train", *TINY, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                        "optimizer.lr=1e30", "trainer.max_steps=6", f"paths.output_root={tmp_path}"])  # fmt: skip
    assert_one_sentence(result, r"^The training loss became (nan|inf|-inf) at step \d+, so the run stopped")
    assert not list(tmp_path.glob("runs/*/*/metrics.json"))
