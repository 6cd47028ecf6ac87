"""callbacks=ema: the checkpoints hold an exponential moving average of the weights, and a resumed run
continues the same average."""

from pathlib import Path

import pytest
import torch

from conftest import TINY, SimulatedCrash, entry_cfg, requires_data
from lmforge.compose.parts import build_callbacks
from lmforge.errors import LmforgeError
from lmforge.inference import evaluate_run
from lmforge.training import run_training

DECAY = 0.4  # small, so that 8 steps reach the cap after the warm-up
EMA = [*TINY, "trainer.max_steps=8", "trainer.val_check_interval=4", "model.dropout=0.1", "callbacks=ema",
       f"callbacks.ema.decay={DECAY}", "test_after_fit=false"]  # fmt: skip


class RecordWeights:
    """A callback that keeps the trained weights after every optimizer step, in ``RecordWeights.steps``."""

    steps: list[dict[str, torch.Tensor]] = []

    def __new__(cls):
        import pytorch_lightning as pl

        class _Record(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, *args):
                weights = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
                cls.steps.append(weights)

        return _Record()


def expected_average(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The moving average the callback documents: a copy at the first update, then the warmed-up decay."""
    average = dict(steps[0])
    for n, weights in enumerate(steps[1:], start=1):
        decay = min(DECAY, (1 + n) / (10 + n))
        average = {name: decay * average[name] + (1 - decay) * weights[name] for name in average}
    return average


def last_checkpoint(result: dict) -> dict:
    return torch.load(Path(result["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)


def test_checkpoint_holds_the_moving_average_and_a_resumed_run_continues_it(cfg_factory):
    RecordWeights.steps.clear()
    straight = run_training(cfg_factory([*EMA, "+callbacks.record._target_=test_weight_averaging.RecordWeights"]))
    assert len(RecordWeights.steps) == 8
    ckpt = last_checkpoint(straight)
    for name, value in expected_average(RecordWeights.steps).items():
        torch.testing.assert_close(ckpt["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        # The trained weights are kept beside the average, for resume=.
        torch.testing.assert_close(ckpt["current_model_state"][name], RecordWeights.steps[-1][name], msg=name)
    name = "backbone.lm_head.weight"
    assert not torch.equal(ckpt["state_dict"][name], ckpt["current_model_state"][name])

    crashing = cfg_factory([*EMA, "callbacks.last_checkpoint.every_n_train_steps=2",
                            "+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=5"])  # fmt: skip
    with pytest.raises(SimulatedCrash):
        run_training(crashing)
    resumed = run_training(cfg_factory([f"resume={crashing.paths.run_dir}"]))
    assert resumed["steps"] == 8
    assert resumed["metrics"]["val/loss"] == pytest.approx(straight["metrics"]["val/loss"], abs=1e-5)
    for key in ("state_dict", "current_model_state"):
        for name, value in ckpt[key].items():
            torch.testing.assert_close(last_checkpoint(resumed)[key][name], value, rtol=1e-5, atol=1e-6, msg=name)


@requires_data
def test_the_test_after_fit_scores_the_average(cfg_factory):
    # A GRU on SST-2, which has a test split, at a high learning rate and a slow average, so that the
    # average and the trained weights score differently. The run's test must score the average (as
    # lmforge-evaluate does from the checkpoint's state_dict), not the trained weights beside it.
    run = run_training(cfg_factory(["model=gru", "task=sst2", "model.hidden_size=16", "model.embedding_size=16",
                                    "logger=none", "optimizer.lr=0.01", "trainer.max_steps=16",
                                    "trainer.val_check_interval=16", "trainer.limit_val_batches=2",
                                    "trainer.limit_test_batches=2", "callbacks=ema", "callbacks.ema.decay=0.9"]))  # fmt: skip

    def test_loss(checkpoint: str) -> float:
        cfg = entry_cfg("evaluate", [f"run={run['run_dir']}", f"checkpoint={checkpoint}", "split=test",
                                     "limit_batches=2"])  # fmt: skip
        return evaluate_run(cfg)["metrics"]["test/loss"]

    ckpt = torch.load(run["best_checkpoint"], weights_only=True)
    trained = Path(run["run_dir"]) / "trained-weights.ckpt"
    torch.save({**ckpt, "state_dict": ckpt["current_model_state"]}, trained)
    assert run["metrics"]["test/loss"] == pytest.approx(test_loss(run["best_checkpoint"]), abs=1e-6)
    assert abs(run["metrics"]["test/loss"] - test_loss(str(trained))) > 1e-5  # metrics keep 6 decimals


def test_a_decay_outside_zero_to_one_is_one_sentence(cfg_factory):
    with pytest.raises(LmforgeError, match="between 0 and 1"):
        build_callbacks(cfg_factory([*EMA, "callbacks.ema.decay=1.5"]))
