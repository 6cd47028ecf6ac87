"""Masked-LM pretraining, init_from, and experiments that run both stages in one command."""

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import requires_data, run_cli
from lmforge.errors import LmforgeError
from lmforge.tasks.masked_lm import IGNORE, mask_tokens
from lmforge.training import run_training

MLM_TINY = ["model=bert-tiny", "task=mlm", "task/source=sst2-pretrain", "logger=none", "task.data.block_size=30",
            "task.data.batch_size=16", "trainer.limit_val_batches=4", "test_after_fit=false"]  # fmt: skip


def test_masking_chooses_15_percent_and_splits_them_80_10_10():
    ids = torch.randint(10, 1000, (64, 512))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False  # [CLS]
    inputs, labels = mask_tokens(ids, maskable, mask_id=3, vocab_size=1000, generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    assert not chosen[:, 0].any()
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs == 3) & chosen
    kept = (inputs == ids) & chosen
    assert masked.sum() / chosen.sum() == pytest.approx(0.8, abs=0.01)
    assert kept.sum() / chosen.sum() == pytest.approx(0.1 + 0.1 / 1000, abs=0.01)  # a random token may be itself
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_masked_lm_needs_an_encoder_and_a_mask_token(cfg_factory):
    with pytest.raises(LmforgeError, match="needs an encoder backbone"):
        run_training(
            cfg_factory(["model=gpt2-tiny", "task=mlm", "task/source=tinyshakespeare", "logger=none", "debug=fast"])
        )
    with pytest.raises(LmforgeError, match=r"needs a tokenizer with \[MASK\]"):
        run_training(
            cfg_factory(
                [
                    "model=bert-tiny",
                    "tokenizer=char",
                    "task=mlm",
                    "task/source=tinyshakespeare",
                    "logger=none",
                    "debug=fast",
                ]
            )
        )


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A bert-tiny pretrained for 60 steps on the SST-2 pretraining text."""
    from conftest import make_cfg

    cfg = make_cfg([*MLM_TINY, "trainer.max_steps=60", "trainer.val_check_interval=30", "optimizer.lr=2e-3",
                    "scheduler.warmup_steps=10"], tmp_path_factory.mktemp("mlm"))  # fmt: skip
    return run_training(cfg)


@requires_data
@pytest.mark.slow
def test_masked_lm_loss_falls_on_real_text(pretrained_run):
    rows = list(csv.DictReader(Path(pretrained_run["run_dir"], "csv", "metrics.csv").read_text().splitlines()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[-1] < val[0] < 8.0, val  # an untrained model scores ln(30522) = 10.3
    assert pretrained_run["metrics"]["val/acc"] > 0.02  # chance is 1/30522, pretrained_run["metrics"]


@requires_data
@pytest.mark.slow
def test_init_from_loads_the_backbone_and_reports_what_it_skipped(pretrained_run, cfg_factory):
    # tokenizer=char is overruled: the weights read the ids of the tokenizer they were trained with.
    record = run_training(cfg_factory(["model=bert-tiny", "task=sst2", f"init_from={pretrained_run['run_dir']}",
                                       "tokenizer=char", "logger=none", "debug=fast"]))  # fmt: skip
    line = next(line for line in Path(record["run_dir"], "train.log").read_text().splitlines() if " init_from " in line)
    assert "loaded 39 of 39 backbone tensors" in line and "the task head only" in line
    assert "head.decoder" in line  # the MLM head stayed behind
    from lmforge.rundirs.checkpoints import backbone_state_dict, load_checkpoint

    before = backbone_state_dict(load_checkpoint(pretrained_run["best_checkpoint"]))
    after = backbone_state_dict(load_checkpoint(record["run_dir"] + "/checkpoints/last.ckpt"))
    # debug=fast trains one step, so the weights moved only a little from the pretrained ones
    name = "encoder.layer.0.attention.self.query.weight"
    assert (after[name] - before[name]).abs().max() < 0.05
    assert (
        Path(record["run_dir"], "tokenizer.json").read_text()
        == Path(pretrained_run["run_dir"], "tokenizer.json").read_text()
    )
    # The saved config and the log name the tokenizer the run has: the one of the run it starts from.
    saved = OmegaConf.load(Path(record["run_dir"], "config.yaml")).tokenizer
    assert saved == OmegaConf.load(Path(pretrained_run["run_dir"], "config.yaml")).tokenizer
    assert f"tokenizer: {saved.name} (" in Path(record["run_dir"], "train.log").read_text()


@requires_data
def test_init_from_a_different_shape_fails_in_one_sentence(pretrained_run, cfg_factory):
    with pytest.raises(LmforgeError, match=r"init_from: .* is \(\d+, 128\) in .* but \(\d+, 256\) in this model"):
        run_training(cfg_factory(["model=bert-mini", "task=sst2", f"init_from={pretrained_run['run_dir']}",
                                  "logger=none", "debug=fast"]))  # fmt: skip
    with pytest.raises(LmforgeError, match="no such run directory or checkpoint"):
        run_training(cfg_factory(["model=bert-tiny", "task=sst2", "init_from=/nonexistent/run", "logger=none"]))


@requires_data
@pytest.mark.slow
def test_pretrain_finetune_experiment_runs_both_stages_in_one_command(tmp_path):
    result = run_cli(["experiment=sst2-pretrain-finetune", "model=bert-tiny", "trainer.max_steps=4",
                      "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                      "logger=none", f"paths.output_root={tmp_path}"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["mlm", "sst2"]
    assert "stage 2/2: finetune" in result.stderr + result.stdout
    finetune_log = Path(records[1]["run_dir"], "train.log").read_text()
    assert f"init_from {records[0]['best_checkpoint']}" in finetune_log


@requires_data
@pytest.mark.slow
def test_a_causal_lm_run_starts_a_decoder_classifier(cfg_factory):
    from conftest import TINY

    lm = run_training(cfg_factory(TINY))
    record = run_training(cfg_factory(["model=gpt2-tiny", "task=sst2", "task.data.max_length=64", "model.bias=false",
                                       "model.n_positions=64", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                                       f"init_from={lm['run_dir']}", "logger=none", "debug=fast"]))  # fmt: skip
    line = next(line for line in Path(record["run_dir"], "train.log").read_text().splitlines() if " init_from " in line)
    assert "loaded 10 of 10 backbone tensors" in line and "not used from the checkpoint: none" in line, line
