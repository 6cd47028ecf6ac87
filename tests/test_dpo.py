"""task=dpo: preference pairs, the DPO/IPO loss against its formula, a reference without a second copy."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, make_cfg, requires_data
from lmforge.data.chat import ChatFile
from lmforge.data.preference import PreferenceDataModule
from lmforge.data.tokenizers import gpt2_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.gpt import GPT
from lmforge.tasks.preference import preference_loss, sequence_logprobs

pytestmark = requires_data


def samsum_pairs(path: Path, n: int) -> Path:
    """SAMSum pairs: a dialogue's reference summary chosen over the summary of another dialogue."""
    with open(Path(DATA_DIR) / "samsum/train.jsonl", encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if len(r["dialogue"]) < 200 and r["summary"].strip()][:n]
    rng = random.Random(0)
    lines = []
    for i, row in enumerate(rows):
        other = rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]
        lines.append({"prompt": "Summarize:\n" + row["dialogue"].replace("\r\n", "\n"), "chosen": row["summary"].strip(),
                      "rejected": other["summary"].strip()})  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_loss_is_the_formula_and_log_probabilities_are_sums():
    torch.manual_seed(0)
    model = GPT(vocab_size=11, n_layer=1, n_head=2, n_embd=16, n_positions=16).eval()
    ids = torch.randint(0, 11, (2, 6))
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, 1, 2, 3, 4, 5]])
    logp = model(ids).log_softmax(-1)
    expected = torch.stack([logp[0, 2, 3] + logp[0, 3, 4], sum(logp[1, t, labels[1, t]] for t in range(1, 6))])
    assert torch.allclose(sequence_logprobs(model, ids, labels), expected, atol=1e-5)
    h = torch.tensor([-1.0, 0.0, 2.5])
    dpo = [-math.log(1 / (1 + math.exp(-0.1 * x))) for x in h.tolist()]
    assert torch.allclose(preference_loss(h, 0.1, "dpo"), torch.tensor(dpo), atol=1e-6)
    assert torch.allclose(preference_loss(h, 0.5, "ipo"), (h - 1.0) ** 2)


@pytest.mark.parametrize(
    ("line", "reason"),
    [('{"prompt": "hi", "chosen": "Hello.", "rejected": " Hello. "}', "chosen and rejected are the same text"),
     ('{"prompt": "hi", "chosen": "Hello."}', 'needs "prompt", "chosen" and "rejected"'),
     ('{"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}', "role 'robot'"),
     ("not json", "not JSON")],
)  # fmt: skip
def test_a_bad_pair_is_one_sentence_naming_file_and_line(tmp_path, line, reason):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "chosen": "Hello.", "rejected": "Go away."}) + f"\n{line}\n")
    texts = ChatFile(path=str(path), validation_path=str(path)).load(None)
    tok = gpt2_tokenizer(local_dir=str(Path(DATA_DIR) / "tokenizers/gpt2"))
    with pytest.raises(LmforgeError, match=rf"{path}:2: .*{reason}"):
        PreferenceDataModule(texts, tok, block_size=64)
    data = PreferenceDataModule(texts, tok, block_size=64, skip_invalid=True)
    ids, labels = data.collate(data.examples["train"])
    assert ids.shape[0] == 2 and tok.decode(labels[0][labels[0] >= 0].tolist(), skip_special_tokens=False).startswith(
        "Hello."
    )  # row 0 the chosen conversation, row 1 the rejected one


def first_and_last(run_dir: str, key: str) -> tuple[float, float]:
    with open(next(Path(run_dir).glob("csv/**/metrics.csv")), encoding="utf-8") as f:
        values = [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return values[0], values[-1]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_a_few_steps_prefer_the_chosen_replies(tmp_path, finetune):
    """From scratch on 24 SAMSum pairs (scored again as validation): the reference is the start, so the first
    loss is log 2; after 30 steps the chosen replies win. With LoRA the reference is the base, adapters off."""
    from lmforge.training import run_training

    pairs = samsum_pairs(tmp_path / "pairs.jsonl", 24)
    overrides = ["model=gpt2-tiny", "model.n_layer=1", "model.n_embd=64", "model.n_head=2", "tokenizer=bpe",
                 "tokenizer.vocab_size=600", "task=dpo", f"task.source.path={pairs}",
                 f"task.source.validation_path={pairs}", "task.data.block_size=256", "task.module.beta=0.5",
                 "logger=csv", "trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.log_every_n_steps=1",
                 "optimizer.lr=3e-3", "scheduler.warmup_steps=0", f"finetune={finetune}"]  # fmt: skip
    if finetune == "lora":
        overrides += ["finetune.r=16", "optimizer.lr=2e-2"]
    record = run_training(make_cfg(overrides, tmp_path / "outputs"))
    first, last = first_and_last(record["run_dir"], "train/loss")
    assert first == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert last < first
    assert record["metrics"]["val/reward_accuracy"] > 0.75 and record["metrics"]["val/margin"] > 0


def test_a_resumed_dpo_run_keeps_its_reference_and_ends_where_an_uninterrupted_one_ends(cfg_factory, tmp_path):
    from conftest import crashed_run
    from lmforge.training import run_training

    pairs = samsum_pairs(tmp_path / "pairs.jsonl", 12)
    split = ["model=gpt2-tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "tokenizer=bpe",
             "tokenizer.vocab_size=400", "task=dpo", f"task.source.path={pairs}", f"task.source.validation_path={pairs}",
             "task.data.block_size=256", "task.data.batch_size=4", "logger=none", "trainer.max_steps=8",
             "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "optimizer.lr=3e-3",
             "scheduler.warmup_steps=0", "test_after_fit=false"]  # fmt: skip
    straight = run_training(cfg_factory(split))
    run_dir = crashed_run(cfg_factory, split)
    resumed = run_training(cfg_factory([f"resume={run_dir}"]))
    assert resumed["steps"] == 8
    for key in ("train/loss", "val/loss", "val/margin"):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], abs=1e-5), key
    saved = torch.load(Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(name.startswith("reference.") for name in saved)


def test_a_dpo_run_chats_with_the_template_it_was_tuned_with(tmp_path):
    from conftest import entry_cfg
    from lmforge.data.chat import run_chat_template
    from lmforge.inference import generate_from_run
    from lmforge.training import run_training

    pairs = samsum_pairs(tmp_path / "pairs.jsonl", 8)
    record = run_training(make_cfg(["model=gpt2-tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                                    "tokenizer=bpe", "tokenizer.vocab_size=400", "task=dpo", f"task.source.path={pairs}",
                                    "task.data.block_size=256", "logger=none", "trainer.max_steps=2",
                                    "trainer.val_check_interval=2"], tmp_path / "outputs"))  # fmt: skip
    from lmforge.rundirs.config import saved_config

    assert run_chat_template(saved_config(Path(record["run_dir"]))) is not None
    replies = generate_from_run(entry_cfg("generate", [f"run={record['run_dir']}", "chat=true", "prompt=Hi",
                                                       "max_new_tokens=4", "greedy=true"]))  # fmt: skip
    assert len(replies) == 1


def test_samsum_pairs_prefer_each_dialogues_own_summary():
    from lmforge.data.preference import SummaryPairs

    splits = SummaryPairs(per_split=50, seed=1).load(DATA_DIR)
    assert set(splits) >= {"train", "validation"} and all(len(lines) > 40 for lines in splits.values())
    with open(Path(DATA_DIR) / "samsum/val.jsonl", encoding="utf-8") as f:
        summaries = {r["summary"].strip() for r in map(json.loads, f)}
    pairs = [json.loads(line) for _, _, line in splits["validation"]]
    assert all(p["chosen"] in summaries and p["rejected"] in summaries and p["chosen"] != p["rejected"] for p in pairs)
    assert pairs[0]["prompt"].startswith("Summarize this dialogue:\n")
    assert SummaryPairs(per_split=50, seed=1).load(DATA_DIR) == splits


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "prefix", "prompt"])
def test_added_weights_off_computes_what_the_base_computes(cfg_factory, method):
    import copy

    from lmforge.compose.parts import build_backbone, build_finetune
    from lmforge.finetune import added_weights_off

    cfg = cfg_factory(["model=gpt2-tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", f"finetune={method}"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model, 50).eval()
    base = copy.deepcopy(backbone)
    build_finetune(cfg).apply(backbone, cfg.model.get("targets"), cfg.model.name)
    with torch.no_grad():
        for p in backbone.parameters():
            if p.requires_grad:  # only the added weights train: make them matter
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 50, (2, 12))
    assert not torch.allclose(backbone(ids), base(ids), atol=1e-4)
    with added_weights_off(backbone):
        assert torch.allclose(backbone(ids), base(ids), atol=1e-5)
    assert not torch.allclose(backbone(ids), base(ids), atol=1e-4)  # and back on
