"""End-to-end runs on Tiny Shakespeare with tiny configs, in process."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import TINY, make_cfg, run_cli
from lmforge.config_dirs import CONF_DIR
from lmforge.data.sources import TextCorpus
from lmforge.data.tokenizers import char_tokenizer, encode_text, load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.rundirs.new import make_run_dir
from lmforge.training import run_training

RESULT_FIELDS = {
    "run_id",
    "run_dir",
    "started_at",
    "git_sha",
    "git_dirty",
    "versions",
    "seed",
    "model",
    "task",
    "parameters",
    "metrics",
    "wall_time_s",
    "tokens_per_s",
    "command",
    "world_size",
    "hardware",
}


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """No W&B key anywhere and no WANDB_MODE: the default must go offline by itself."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def test_a_failed_run_closes_its_wandb_run(cfg_factory, offline_wandb):
    import sys

    overrides = [o for o in TINY if not o.startswith("logger=")]
    with pytest.raises(LmforgeError, match="cannot be built from its config"):  # fails after W&B has started
        run_training(cfg_factory([*overrides, "model.n_head=3"]))
    assert sys.modules["wandb"].run is None  # the next run in this process gets a run of its own


def test_default_run_writes_everything_offline(cfg_factory, offline_wandb):
    overrides = [o for o in TINY if not o.startswith("logger=")]  # the default loggers: W&B + CSV
    cfg = cfg_factory(overrides)
    record = run_training(cfg)
    run_dir = Path(record["run_dir"])

    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("run-*.wandb"))
    metrics_csv = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics_csv and "val/loss" in metrics_csv
    for name in ("config.yaml", "tokenizer.json", "metrics.json", "curves.png", "train.log", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert "sample at step 4" in (run_dir / "train.log").read_text()

    lines = (Path(cfg.paths.results_file)).read_text().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) >= RESULT_FIELDS
    assert result["steps"] == 4 and result["world_size"] == 1
    assert result["model"] == "gpt2-tiny" and result["task"] == "tinyshakespeare"
    assert result["metrics"]["val/loss"] > 0 and result["tokens_per_s"] > 0
    assert result["versions"]["torch"] and len(result["git_sha"] or "x" * 40) == 40

    # The saved tokenizer gives the same ids as the one the run trained with.
    texts = TextCorpus(name="tinyshakespeare", builtin="tinyshakespeare").load(None)
    sample = texts["validation"].text()[:3000]
    assert encode_text(load_tokenizer(run_dir), sample) == encode_text(char_tokenizer(texts["train"]), sample)


@pytest.mark.slow
def test_loss_falls_well_below_unigram_entropy(cfg_factory):
    texts = TextCorpus(name="tinyshakespeare", builtin="tinyshakespeare").load(None)
    counts = Counter(texts["train"].text())
    total = sum(counts.values())
    unigram = -sum(c / total * math.log(c / total) for c in counts.values())  # ~3.3 nats
    cfg = cfg_factory(
        [
            "experiment=shakespeare-char",
            "logger=none",
            "trainer.max_steps=300",
            "trainer.val_check_interval=300",
            "task.module.num_samples=0",
        ]
    )
    record = run_training(cfg)
    assert record["metrics"]["val/loss"] < unigram - 0.6, (record["metrics"], unigram)


@pytest.mark.slow
def test_overfit_preset_drives_loss_near_zero(cfg_factory):
    cfg = cfg_factory(
        [
            "debug=overfit",
            "logger=none",
            "task.data.block_size=32",
            "task.data.batch_size=4",
            "task.module.num_samples=0",
        ]
    )
    record = run_training(cfg)
    assert record["metrics"]["train/loss"] < 0.1, record["metrics"]


def test_bf16_mixed_precision_runs_a_few_steps(cfg_factory):
    record = run_training(
        cfg_factory([*TINY, "trainer.precision=bf16-mixed", "trainer.max_steps=2", "trainer.val_check_interval=2"])
    )
    assert math.isfinite(record["metrics"]["val/loss"])


def test_profile_preset_writes_a_report(cfg_factory):
    record = run_training(cfg_factory([*TINY, "debug=profile", "trainer.max_steps=3", "trainer.val_check_interval=3"]))
    reports = list(Path(record["run_dir"]).glob("*profile*.txt"))
    assert reports and "run_training_epoch" in reports[0].read_text()


def test_two_runs_in_the_same_second_get_two_dirs(tmp_path):
    dirs = {make_run_dir(tmp_path, "m", "t")[1] for _ in range(5)}
    assert len(dirs) == 5 and all(d.is_dir() for d in dirs)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = make_cfg([f"experiment={experiment}"], tmp_path)
    assert cfg.model.name and cfg.task.name
    instantiate(cfg.task.source)
    instantiate(cfg.optimizer)
    instantiate(cfg.scheduler)


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp", "fsdp"])
@pytest.mark.parametrize("logger", ["default", "wandb", "csv", "tensorboard", "all", "none"])
def test_config_groups_compose(trainer, logger, tmp_path):
    cfg = make_cfg([f"trainer={trainer}", f"logger={logger}"], tmp_path)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_makes_one_run(tmp_path):
    result = run_cli(["experiment=shakespeare-char", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                      "trainer.max_steps=10", "trainer.val_check_interval=10", "trainer.limit_val_batches=4",
                      "task.module.num_samples=0", f"paths.output_root={tmp_path}"], timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list(tmp_path.glob("runs/*/*"))
    assert len(run_dirs) == 1
    assert len(list((run_dirs[0] / "wandb").glob("offline-run-*"))) == 1
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["steps"] == 10 and math.isfinite(record["metrics"]["val/loss"])
    assert result.stdout.count("run dir:") == 2  # start and end lines, from rank 0 only


@pytest.mark.slow
def test_compile_runs_and_keeps_checkpoint_names(cfg_factory):
    import torch

    record = run_training(cfg_factory([*TINY, "compile=true", "trainer.max_steps=2", "trainer.val_check_interval=2"]))
    state = torch.load(Path(record["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "backbone.transformer.wte.weight" in state and not any("_orig_mod" in k for k in state)


def test_activation_checkpointing_and_a_chunked_loss_train_the_same_run(cfg_factory):
    """The same seed with and without them: the same losses (both recompute; neither changes the math)."""
    tiny = [*TINY, "model.n_layer=2", "model.dropout=0.1", "test_after_fit=false"]
    plain = run_training(cfg_factory(tiny))["metrics"]
    saving = [*tiny, "activation_checkpointing=true", "task.module.loss_chunk_size=100"]
    frugal = run_training(cfg_factory(saving))["metrics"]
    assert frugal["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-5)
    assert frugal["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_dir(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    args = ["experiment=shakespeare-char", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
            "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.limit_val_batches=2", "logger=none",
            "task.module.num_samples=0", f"paths.output_root={tmp_path}"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()][0].startswith("torchrun-")
    assert len(list((tmp_path / "runs").iterdir())) == 1
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_two_torchrun_nodes_without_an_rdzv_id_share_one_run_dir(tmp_path):
    """Two torchrun agents on this machine stand for two nodes (static rendezvous at --master_addr,
    no --rdzv_id): their ranks must still agree on one run dir, with nothing left by the second node."""
    from conftest import free_port, torchrun_nodes

    args = ["experiment=shakespeare-char", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1",
            "trainer.accelerator=cpu", "trainer.max_steps=6", "trainer.val_check_interval=6",
            "trainer.limit_val_batches=2", "logger=none", "task.module.num_samples=0", f"paths.output_root={tmp_path}"]  # fmt: skip
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    with torchrun_nodes([[*rendezvous, f"--node_rank={rank}"] for rank in (0, 1)], args) as nodes:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("torchrun-")
    (record,) = (json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())
    assert record["world_size"] == 2 and record["steps"] == 6 and record["run_dir"] == str(run_dir)


def test_early_stopping_ends_the_run_and_says_so(cfg_factory):
    """A min_delta that nothing meets: the first validation sets the best, the second ends the run."""
    record = run_training(cfg_factory([*TINY, "trainer.max_steps=12", "callbacks=[default,early-stopping]",
                                       "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=100"]))  # fmt: skip
    assert record["steps"] == 4 and record["stopped_early"].startswith("Monitored metric val/loss did not improve")
    assert (Path(record["run_dir"]) / "checkpoints" / "last.ckpt").is_file()
    assert run_training(cfg_factory(TINY))["stopped_early"] is None


def test_mfu_is_the_flops_rate_over_the_given_peak(cfg_factory):
    """A peak of 1 GFLOP/s: MFU is tokens/s times the GPT's FLOPs per token over it; a CPU has no known peak."""
    from lmforge.models.gpt import GPT

    record = run_training(cfg_factory([*TINY, "callbacks.throughput.peak_tflops=0.001"]))
    context = 64  # experiment=shakespeare-char's block size; 65 characters and an unknown-character token
    per_token = GPT(66, n_layer=1, n_head=2, n_embd=32, n_positions=context, bias=False).flops_per_token(context)
    assert record["mfu"] == pytest.approx(record["tokens_per_s"] * per_token / 1e9, rel=1e-3)
    assert "train/mfu" not in record["metrics"]
    assert run_training(cfg_factory(TINY))["mfu"] is None
