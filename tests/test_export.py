"""lmforge-export: a run dir becomes a Hugging Face folder that transformers' Auto classes load and that
computes what the lmforge task computes; a public checkpoint goes in and comes back out unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pretrained import padded, saved, sst2_sentences

from conftest import TINY, requires_data
from lmforge.compose.parts import make_task
from lmforge.compose.weights import load_run
from lmforge.errors import LmforgeError
from lmforge.hub.export import export_run
from lmforge.rundirs.checkpoints import load_task_state
from lmforge.training import run_training

transformers = pytest.importorskip("transformers")
pytestmark = [requires_data, pytest.mark.slow]

FAST = ["logger=none", "debug=fast"]


def task_of(run_dir: str):
    """The run's task with its best checkpoint's weights, in eval mode."""
    run = load_run(run_dir)
    checkpoint = run.saved
    task = make_task(run.cfg, run.backbone, run.tokenizer, checkpoint.get("data_arguments") or {})
    load_task_state(task, checkpoint)
    return task.eval(), run.tokenizer


def exported(record: dict, tmp_path: Path, auto: str):
    """Export the run and load it back with ``transformers.<auto>`` and ``AutoTokenizer``."""
    out = export_run(record["run_dir"], tmp_path / "hf")
    model = getattr(transformers, auto).from_pretrained(out).eval()
    return model, transformers.AutoTokenizer.from_pretrained(out), out


def test_language_model_exports_to_causal_lm(cfg_factory, tmp_path):
    record = run_training(cfg_factory(TINY))  # gpt2-tiny has no biases: exported as zero biases
    model, hf_tokenizer, out = exported(record, tmp_path, "AutoModelForCausalLM")
    task, tokenizer = task_of(record["run_dir"])
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    ids = torch.tensor([tokenizer.encode(text).ids])
    assert hf_tokenizer(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, task.backbone(ids), atol=1e-4, rtol=0)
    card = (out / "README.md").read_text()
    assert "GPT2LMHeadModel" in card and "val/loss" in card and "AutoModelForCausalLM" in card


@pytest.mark.parametrize(
    "model_overrides", [["model=bert-tiny"], ["model=gpt2-tiny", "tokenizer=word", "model.n_layer=1"]], ids=str
)
def test_classifier_exports_to_sequence_classification(cfg_factory, tmp_path, model_overrides):
    record = run_training(cfg_factory([*model_overrides, "task=sst2", *FAST]))
    model, hf_tokenizer, _ = exported(record, tmp_path, "AutoModelForSequenceClassification")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    task, tokenizer = task_of(record["run_dir"])
    ids, mask = padded(tokenizer, sst2_sentences())
    ids = ids.masked_fill(mask == 0, model.config.pad_token_id)  # GPT-2 finds the last token by the pad id
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, task(ids, mask), atol=1e-4, rtol=0)


def test_tagger_exports_to_token_classification(cfg_factory, tmp_path):
    record = run_training(cfg_factory(["model=bert-tiny", "task=conll2003", *FAST]))
    model, _, _ = exported(record, tmp_path, "AutoModelForTokenClassification")
    assert "B-PER" in model.config.label2id
    task, tokenizer = task_of(record["run_dir"])
    ids, mask = padded(tokenizer, ["EU rejects German call to boycott British lamb .", "Peter Blackburn"])
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
        ours = task.head(task.backbone.hidden_states(ids, mask))
    torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()], atol=1e-4, rtol=0)


def test_masked_lm_exports_to_bert_for_masked_lm(cfg_factory, tmp_path):
    record = run_training(cfg_factory(["model=bert-tiny", "task=mlm", "task/source=tinyshakespeare", *FAST]))
    model, _, _ = exported(record, tmp_path, "AutoModelForMaskedLM")
    task, tokenizer = task_of(record["run_dir"])
    ids, mask = padded(tokenizer, ["To be, or not to [MASK], that is the question."])
    with torch.no_grad():
        ours = task.head(task.backbone.hidden_states(ids, mask))
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ours, atol=1e-4, rtol=0)


def test_translator_exports_to_t5_with_the_same_translations(cfg_factory, tmp_path):
    overrides = ["model=t5-tiny", "task=multi30k", "test_after_fit=false", "task.module.val_generate_limit=4",
                 "task.module.max_new_tokens=8"]  # fmt: skip
    record = run_training(cfg_factory([*overrides, *FAST]))
    model, hf_tokenizer, _ = exported(record, tmp_path, "AutoModelForSeq2SeqLM")
    task, tokenizer = task_of(record["run_dir"])
    source = "A man is riding a bike."
    ours = task.generate_texts([source], "", max_new_tokens=8, num_beams=1, temperature=0.0)[0]
    encoded = hf_tokenizer([source + hf_tokenizer.eos_token], return_tensors="pt", add_special_tokens=False)
    theirs = model.generate(**encoded, max_new_tokens=8, do_sample=False, num_beams=1)
    assert hf_tokenizer.decode(theirs[0], skip_special_tokens=True) == ours


def test_public_checkpoint_round_trips_through_a_run(cfg_factory, tmp_path):
    """A BertForSequenceClassification goes in through model.pretrained (head included), trains at lr 0,
    and comes out of lmforge-export with identical tensors."""
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                                     vocab_size=30522, num_labels=2)  # fmt: skip
    folder = saved(transformers.BertForSequenceClassification(config), tmp_path / "in")
    record = run_training(cfg_factory(["model=bert-mini", f"model.pretrained={folder}", "task=sst2",
                                       "optimizer.lr=0", *FAST]))  # fmt: skip
    log = Path(record["run_dir"], "train.log").read_text()
    assert "loaded 39 backbone and 2 head tensors; newly initialised: none" in log
    out = export_run(record["run_dir"], tmp_path / "out")
    before, after = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, atol=0, rtol=0, msg=name)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_runs_without_a_hf_equivalent_say_so(cfg_factory, tmp_path):
    record = run_training(cfg_factory(["model=bert-tiny", "task=sst2", "task.module.pooling=mean", *FAST]))
    with pytest.raises(LmforgeError, match="pools with 'mean'; BertForSequenceClassification reads the"):
        export_run(record["run_dir"], tmp_path / "hf")
    record = run_training(cfg_factory(["model=lstm", "task=sst2", *FAST]))
    with pytest.raises(LmforgeError, match="Model lstm has no Hugging Face equivalent"):
        export_run(record["run_dir"], tmp_path / "hf2")
    record = run_training(cfg_factory(["model=t5-tiny", "model.copy=true", "task=multi30k", "test_after_fit=false",
                                       "task.module.val_generate_limit=2", "task.module.max_new_tokens=4", *FAST]))  # fmt: skip
    with pytest.raises(
        LmforgeError, match=r"copies source tokens \(model.copy=true\), which T5ForConditionalGeneration"
    ):
        export_run(record["run_dir"], tmp_path / "hf3")
