"""finetune=: which weights train (full, freeze, LoRA, AdaLoRA, IA3, bottleneck adapters), what checkpoints
keep, and that adapter runs resume, predict and export."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import SimulatedCrash, entry_cfg, requires_data
from lmforge.errors import LmforgeError
from lmforge.finetune import IA3, AdaLoRA, Adapter, Freeze, LoRA, Prefix, Prompt
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.tasks.classification import ClassificationTask
from lmforge.training import run_training


@functools.cache
def _model_cfg(model: str):
    return entry_cfg("train", [f"model={model}"]).model


def targets(model: str) -> dict[str, str]:
    """The ``targets`` of a shipped model config, as composed (they come from its family, conf/model/family/)."""
    return OmegaConf.to_container(_model_cfg(model).targets)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_positions=16).eval()


def trainable(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


IDS = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "method, trains",
    [
        (LoRA(r=4, modules=["attention"]), ("lora_A", "lora_B")),
        (AdaLoRA(init_r=4, target_r=2, total_steps=10), ("lora_A", "lora_B", "lora_E")),
        (IA3(), ("ia3_l",)),
        (Adapter(size=8), ("adapter_down", "adapter_up")),
    ],
    ids=["lora", "adalora", "ia3", "adapter"],
)
def test_adapters_start_as_the_base_model_and_only_they_train(method, trains):
    base = tiny_gpt()
    expected = base(IDS)
    model = tiny_gpt()
    method.apply(model, targets("gpt2"), "gpt2")
    model.eval()
    names = trainable(model)
    assert names and all(any(t in n for t in trains) for n in names), names
    if not isinstance(method, AdaLoRA):  # AdaLoRA starts with random singular values, so it moves at once
        torch.testing.assert_close(model(IDS), expected)
    added = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert added < 0.25 * sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("method", [LoRA(r=4, modules=["attention", "feedforward"]), IA3()], ids=["lora", "ia3"])
def test_merged_adapters_give_the_same_outputs_with_the_plain_names(method):
    model = tiny_gpt()
    method.apply(model, targets("gpt2"), "gpt2")
    model.eval()  # the injected dropout layers start in training mode
    with torch.no_grad():  # move the adapters away from their identity start
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    adapted = model(IDS)
    method.merge(model)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in tiny_gpt().named_parameters()}
    torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=1e-5)


def test_freeze_embeddings_first_layers_or_everything_but_the_head():
    bert = Bert(vocab_size=50, n_layer=3, n_head=2, hidden_size=16, intermediate_size=32, n_positions=16)
    Freeze(embeddings=True, layers=2).apply(bert, targets("bert-mini"), "bert-mini")
    frozen = {n for n, _ in bert.named_parameters()} - trainable(bert)
    assert all(n.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1.")) for n in frozen)
    assert any(n.startswith("encoder.layer.1.") for n in frozen) and "encoder.layer.2.output.dense.weight" not in frozen
    gpt = tiny_gpt()
    task = ClassificationTask(gpt, num_classes=2, optimizer=functools.partial(torch.optim.AdamW))
    Freeze(backbone=True).apply(gpt, targets("gpt2"), "gpt2")
    assert trainable(task) == {"head.weight"}


def test_a_method_the_model_has_no_targets_for_is_one_sentence():
    from lmforge.models.rnn import RNN

    with pytest.raises(LmforgeError, match="names no model.targets.attention"):
        LoRA().apply(RNN(vocab_size=20, hidden_size=8, embedding_size=8), targets("lstm"), "lstm")


# An adapter run from a public-format checkpoint: a tiny GPT-2 saved by transformers.
@pytest.fixture
def gpt2_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def lora_run(folder: Path, *extra: str) -> list[str]:
    return ["model=gpt2", f"model.pretrained={folder}", "task=tinyshakespeare", "finetune=lora", "logger=none",
            "task.data.block_size=32", "task.data.batch_size=4", "trainer.max_steps=8", "trainer.val_check_interval=4",
            "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "task.module.sample_tokens=4",
            "model.dropout=0.1", *extra]  # fmt: skip


@requires_data
@pytest.mark.slow
def test_lora_run_keeps_small_checkpoints_and_resumes_exactly(cfg_factory, gpt2_folder):
    straight = run_training(cfg_factory(lora_run(gpt2_folder)))
    ckpt = torch.load(Path(straight["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)
    names = set(ckpt["state_dict"])
    assert ckpt["base"] == {"pretrained": str(gpt2_folder.resolve())}
    assert names and all("lora_" in n for n in names), names  # no frozen base weights in the file
    assert straight["trainable_parameters"] < 0.01 * straight["parameters"] and straight["peak_memory_mb"] > 0

    crashing = cfg_factory([*lora_run(gpt2_folder), "callbacks.last_checkpoint.every_n_train_steps=2",
                            "+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=5"])  # fmt: skip
    with pytest.raises(SimulatedCrash):
        run_training(crashing)
    resumed = run_training(cfg_factory([f"resume={crashing.paths.run_dir}"]))
    assert resumed["steps"] == 8
    for key in ("train/loss", "val/loss"):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], abs=1e-5), key


@requires_data
@pytest.mark.slow
def test_lora_run_generates_evaluates_and_exports_merged(cfg_factory, gpt2_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    from conftest import entry_cfg
    from lmforge.compose.weights import load_run
    from lmforge.hub.export import export_run
    from lmforge.inference import evaluate_run

    record = run_training(cfg_factory(lora_run(gpt2_folder, "optimizer.lr=1e-2")))
    run = load_run(record["run_dir"])
    ids = torch.tensor([run.tokenizer.encode("ROMEO: But soft").ids])
    with torch.no_grad():
        ours = run.backbone(ids)
    base = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    assert (ours - base(ids).logits).abs().max() > 1e-3  # the adapters changed the model
    evaluated = evaluate_run(
        entry_cfg("evaluate", [f"run={record['run_dir']}", "split=validation", "checkpoint=last", "limit_batches=2"])
    )
    assert evaluated["metrics"]["val/loss"] == pytest.approx(record["metrics"]["val/loss"], abs=1e-4)
    out = export_run(record["run_dir"], tmp_path / "hf")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, atol=1e-4, rtol=0)


@requires_data
@pytest.mark.slow
@pytest.mark.parametrize("method", ["freeze", "adalora", "ia3", "adapter", "prefix", "prompt"])
def test_every_method_runs_from_its_config(cfg_factory, method):
    record = run_training(cfg_factory(["model=bert-tiny", "task=mlm", "task/source=tinyshakespeare",
                                       f"finetune={method}", "logger=none", "debug=fast"]))  # fmt: skip
    assert 0 < record["trainable_parameters"] < record["parameters"]
    assert record["metrics"]["val/loss"] == record["metrics"]["val/loss"]  # a number, not NaN


def tiny_backbones():
    """A GPT, a BERT and a T5, small and in eval mode, with the targets of their model configs."""
    from lmforge.models.t5 import T5

    torch.manual_seed(0)
    bert = Bert(vocab_size=40, n_layer=2, n_head=2, hidden_size=16, intermediate_size=32, n_positions=16)
    t5 = T5(vocab_size=40, n_layer=2, n_head=2, d_model=16, d_kv=8, d_ff=32, dropout=0.0)
    return [(tiny_gpt(), "gpt2"), (bert.eval(), "bert-mini"), (t5.eval(), "t5-tiny")]


def outputs(backbone, ids, mask):
    if backbone.kind == "seq2seq":
        return backbone(ids, mask, ids[:, :5])
    return backbone.hidden_states(ids, mask)


@pytest.mark.parametrize("method", [Prefix(length=3), Prompt(length=4)], ids=["prefix", "prompt"])
def test_prefix_and_prompt_train_alone_keep_shapes_and_respect_padding(method):
    ids = torch.randint(1, 40, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    for backbone, model in tiny_backbones():
        before = outputs(backbone, ids, mask)
        method.apply(backbone, targets(model), model)
        names = trainable(backbone)
        assert names and all(("prefix." in n) or n.startswith("prompt.") for n in names), (model, names)
        after = outputs(backbone, ids, mask)
        assert after.shape == before.shape and not torch.allclose(after, before), model
        # The padded row gives what the same sentence alone gives.
        alone = outputs(backbone, ids[1:, :5], mask[1:, :5])
        if backbone.kind == "seq2seq":
            torch.testing.assert_close(after[1:], alone, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(after[1:, :5], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [Prefix(length=3), Prompt(length=4)], ids=["prefix", "prompt"])
def test_cached_generation_with_prefix_or_prompt_equals_recomputing(method):
    from lmforge.generation import generate

    for backbone, model in tiny_backbones()[::2]:  # the GPT and the T5
        method.apply(backbone, targets(model), model)
        ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(3))
        cached = generate(backbone, ids, 8, temperature=0.0, use_cache=True, decoder_start_token_id=0)
        recomputed = generate(backbone, ids, 8, temperature=0.0, use_cache=False, decoder_start_token_id=0)
        assert torch.equal(cached, recomputed), model


@requires_data
@pytest.mark.slow
def test_init_from_a_lora_run_starts_from_its_merged_weights(cfg_factory, gpt2_folder):
    from lmforge.compose.weights import load_run

    lora = run_training(cfg_factory(lora_run(gpt2_folder, "optimizer.lr=1e-2")))
    shape = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.n_positions=64"]
    plain = run_training(cfg_factory(["model=gpt2", *shape, "task=tinyshakespeare", f"init_from={lora['run_dir']}",
                                      "task.data.block_size=32", "optimizer.lr=0", "logger=none", "debug=fast"]))  # fmt: skip
    assert "loaded 29 of 29 backbone tensors" in Path(plain["run_dir"], "train.log").read_text()
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    with torch.no_grad():
        torch.testing.assert_close(load_run(plain["run_dir"]).backbone(ids), load_run(lora["run_dir"]).backbone(ids),
                                   atol=1e-5, rtol=0)  # fmt: skip
