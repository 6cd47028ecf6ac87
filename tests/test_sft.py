"""task=sft: conversations from JSON lines, the chat template, the loss on the replies, chat and export."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, entry_cfg, make_cfg, requires_data
from lmforge.data.chat import ChatDataModule, ChatFile, conversation, encode_conversation
from lmforge.data.chat_template import DEFAULT_SPECIAL_TOKENS, DEFAULT_TEMPLATE, ChatTemplate
from lmforge.data.labels import IGNORE
from lmforge.data.tokenizers import EOS, gpt2_tokenizer
from lmforge.errors import LmforgeError

pytestmark = requires_data
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, how are you?"},
        {"role": "assistant", "content": "Fine, thanks."}, {"role": "user", "content": "Good."},
        {"role": "assistant", "content": "Bye now."}]  # fmt: skip


def tokenizer():
    tok = gpt2_tokenizer(local_dir=str(Path(DATA_DIR) / "tokenizers/gpt2"))
    tok.add_special_tokens(list(DEFAULT_SPECIAL_TOKENS))
    return tok


def write_sst2_chats(path: Path, n: int) -> Path:
    """``n`` SST-2 sentences as conversations, alternating the three line shapes."""
    with open(Path(DATA_DIR) / "glue/sst2/train.tsv", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f, delimiter="\t"))]
    lines = []
    for i, row in enumerate(rows):
        label = "positive" if row["label"] == "1" else "negative"
        if i % 3 == 0:
            lines.append(
                {"instruction": "Is this review positive or negative?", "input": row["sentence"], "output": label}
            )
        elif i % 3 == 1:
            lines.append({"instruction": "Positive or negative?", "context": row["sentence"], "response": label})
        else:
            lines.append({"messages": [{"role": "user", "content": f"Sentiment of: {row['sentence']}"},
                                       {"role": "assistant", "content": label}]})  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_loss_covers_exactly_the_replies_and_what_ends_them():
    tok = tokenizer()
    template = ChatTemplate(DEFAULT_TEMPLATE, eos_token=EOS)
    ids, labels = encode_conversation(template, tok, CHAT, block_size=512)
    learned = [t for t in labels if t != IGNORE]
    assert tok.decode(learned, skip_special_tokens=False) == f"Fine, thanks.{EOS}\nBye now.{EOS}\n"
    assert [t for t, label in zip(ids, labels) if label != IGNORE] == learned
    everything = encode_conversation(template, tok, CHAT, block_size=512, train_on="all")[1]
    assert everything == ids and tok.decode(ids, skip_special_tokens=False) == template.render(CHAT)
    # Truncation keeps the start; a window that ends before the first reply refuses the conversation.
    first_reply = labels.index(next(t for t in labels if t != IGNORE))
    cut_ids, cut_labels = encode_conversation(template, tok, CHAT, block_size=first_reply + 2)
    assert cut_ids == ids[: first_reply + 3] and cut_labels == labels[: first_reply + 3]
    with pytest.raises(ValueError, match="before the first reply, more than the window"):
        encode_conversation(template, tok, CHAT, block_size=first_reply - 1)


def test_alpaca_and_dolly_lines_become_conversations():
    alpaca = conversation({"instruction": "Translate.", "input": "Hallo", "output": "Hello", "system": "Be exact."})
    assert alpaca == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Translate.\n\nHallo"},
                      {"role": "assistant", "content": "Hello"}]  # fmt: skip
    dolly = conversation({"instruction": "Name a colour.", "context": "", "response": "Red", "category": "open_qa"})
    assert dolly == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red"}]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "not JSON"),
        ('["a list"]', "not a JSON object"),
        ('{"prompt": "hi", "completion": "yo"}', 'no "messages", nor "instruction"'),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
         "message 1 has role 'wizard'"),
        ('{"messages": [{"role": "user", "content": "' + "word " * 300 + '"}, {"role": "assistant", "content": "yo"}]}',
         "before the first reply, more than the window of 64"),
    ],
)  # fmt: skip
def test_a_bad_line_is_one_sentence_naming_file_and_line_or_is_skipped(tmp_path, line, reason):
    good = json.dumps({"messages": CHAT})
    path = tmp_path / "chats.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n")
    texts = ChatFile(path=str(path), validation_path=str(path)).load(None)
    with pytest.raises(LmforgeError, match=rf"{path}:2: .*{reason}.*skip_invalid=true"):
        ChatDataModule(texts, tokenizer(), block_size=64)
    skipping = ChatDataModule(texts, tokenizer(), block_size=64, skip_invalid=True)
    assert skipping.split_sizes == {"train": 2, "validation": 2}


def test_a_template_without_replies_is_refused(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    users_only = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    texts = ChatFile(path=str(path), validation_path=str(path)).load(None)
    with pytest.raises(LmforgeError, match=r":1: the chat template renders no assistant reply"):
        ChatDataModule(texts, tokenizer(), chat_template=users_only, special_tokens=[])


def test_a_grown_vocabulary_keeps_the_checkpoint_rows():
    from lmforge.models.backbone import grown_vocabulary
    from lmforge.models.gpt import GPT

    small, big = (GPT(vocab_size=v, n_layer=1, n_head=2, n_embd=16, n_positions=32) for v in (50, 53))
    saved, own = small.state_dict()["transformer.wte.weight"], big.state_dict()["transformer.wte.weight"]
    grown = grown_vocabulary(big, saved, own)
    assert torch.equal(grown[:50], saved) and torch.equal(grown[50:], own[50:])
    assert grown_vocabulary(big, saved, own.clone()) is None  # not the embedding table itself
    assert grown_vocabulary(big, own, own) is None  # nothing to grow


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """An LM base (GPT-2 BPE) on Tiny Shakespeare, then task=sft from it on SST-2 conversations."""
    from lmforge.training import run_training

    root = tmp_path_factory.mktemp("sft")
    small = ["model=gpt2-tiny", "model.n_layer=2", "tokenizer=gpt2", "logger=csv", "trainer.limit_val_batches=2",
             "trainer.log_every_n_steps=1", "optimizer.lr=2e-3", "scheduler.warmup_steps=5"]  # fmt: skip
    base = run_training(make_cfg([*small, "task=tinyshakespeare", "task.data.block_size=64", "trainer.max_steps=10",
                                  "trainer.val_check_interval=10"], root / "base"))  # fmt: skip
    chats = write_sst2_chats(root / "chats.jsonl", 1200)
    return run_training(make_cfg([*small, "task=sft", f"task.source.path={chats}", f"init_from={base['run_dir']}",
                                  "task.data.block_size=96", "task.data.packing=true", "task.data.batch_size=8", "trainer.max_steps=60",
                                  "trainer.val_check_interval=30"],
                                 root / "sft"))  # fmt: skip


def train_losses(run_dir: str) -> list[float]:
    with open(next(Path(run_dir).glob("csv/**/metrics.csv")), encoding="utf-8") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_sft_from_an_lm_run_learns_the_replies(sft_run):
    losses = train_losses(sft_run["run_dir"])
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5  # the replies are a handful of tokens: learned fast
    assert sft_run["metrics"]["val/loss"] < 1.5


def test_export_gives_transformers_the_same_chat_ids(sft_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.data.chat import run_chat_template
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.hub.export import export_run
    from lmforge.rundirs.config import saved_config

    folder = export_run(sft_run["run_dir"], tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    template = run_chat_template(saved_config(Path(sft_run["run_dir"])))
    ours = load_tokenizer(sft_run["run_dir"])
    for messages, prompt in ((CHAT, False), (CHAT[:4], True)):
        theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        theirs = list(theirs["input_ids"]) if hasattr(theirs, "keys") else list(theirs)
        assert theirs == ours.encode(template.render(messages, prompt), add_special_tokens=False).ids


def test_chat_reuses_the_cache_across_turns_and_answers_in_the_terminal(sft_run):
    from lmforge.chat_session import ChatSession
    from lmforge.compose.weights import load_run
    from lmforge.data.chat import run_chat_template

    run = load_run(sft_run["run_dir"])
    session = ChatSession(run.backbone, run.tokenizer, run_chat_template(run.cfg), run.tokenizer.token_to_id(EOS),
                          max_new_tokens=8, temperature=0)  # fmt: skip
    messages = [{"role": "user", "content": "Sentiment of: a gorgeous, witty, seductive movie."}]
    first = session.reply(messages)
    assert first in ("positive", "negative")
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Sentiment of: a dull mess."}]
    assert session.reply(messages) in ("positive", "negative") and session.reused > 10  # the first turn was kept
    typed = "Sentiment of: an utterly charming film.\nSentiment of: boring and bad.\n\n"
    done = subprocess.run([str(Path(sys.executable).parent / "lmforge-generate"), f"run={sft_run['run_dir']}",
                           "chat=true", "greedy=true", "max_new_tokens=8"], input=typed, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("assistant> ") == 2


def test_chat_without_a_run_dir_is_one_sentence(tmp_path):
    from lmforge.inference import generate_from_run

    run = Path(__file__)  # not a run dir: the usual sentence
    with pytest.raises(LmforgeError, match="not a run directory"):
        generate_from_run(entry_cfg("generate", [f"run={run.parent}", "chat=true"]))


def test_serve_chats_with_the_run_template(sft_run):
    import httpx

    from conftest import serving
    from lmforge.chat_session import ChatSession
    from lmforge.compose.weights import load_run
    from lmforge.data.chat import run_chat_template

    run = load_run(sft_run["run_dir"])
    template = run_chat_template(run.cfg)
    messages = [{"role": "user", "content": "Sentiment of: a gorgeous, witty, seductive movie."}]
    session = ChatSession(run.backbone, run.tokenizer, template, run.tokenizer.token_to_id(EOS), 8, temperature=0)
    with serving(f"run={sft_run['run_dir']}") as (url, _):
        body = {"model": Path(sft_run["run_dir"]).name, "messages": messages, "temperature": 0, "max_tokens": 8}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    prompt = run.tokenizer.encode(template.render(messages, add_generation_prompt=True), add_special_tokens=False).ids
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    assert reply["choices"][0]["message"]["content"].strip() == session.reply(messages)
    assert reply["choices"][0]["finish_reason"] == "stop"  # the reply ended with the end-of-text token


def test_the_instruct_mixture_keeps_each_tasks_held_out_splits(tmp_path):
    from lmforge.data.instruct_mixture import TASKS, InstructMixture

    splits = InstructMixture(train_per_task=40, eval_per_task=6, seed=3).load(DATA_DIR)
    assert {k: len(v) for k, v in splits.items()} == {"train": 200, "validation": 30, "test": 30}
    for split, lines in splits.items():
        origins = {origin for origin, _, _ in lines}
        assert origins == {f"instruct-mixture/{task}/{split}" for task in TASKS}  # each task's own split
        records = [json.loads(line) for _, _, line in lines]
        assert all(conversation(r)[-1]["role"] == "assistant" for r in records)
    train = [json.loads(line) for _, _, line in splits["train"]]
    sst2 = [r for r in train if r["task"] == "sst2"]
    assert {r["messages"][1]["content"] for r in sst2} == {"positive", "negative"}
    assert len({r["messages"][0]["content"].split(":")[0][:20] for r in sst2}) > 1  # several phrasings
    conll = [r["messages"][1]["content"] for r in train if r["task"] == "conll2003"]
    assert any(": " in answer for answer in conll) and all(
        answer == "none" or all(line.split(": ")[0] in ("PER", "LOC", "ORG", "MISC") for line in answer.splitlines())
        for answer in conll
    )
    again = InstructMixture(train_per_task=40, eval_per_task=6, seed=3).load(DATA_DIR)
    assert again == splits  # the seed fixes the draw and the phrasings


def test_predict_replies_to_a_file_of_prompts(sft_run, tmp_path):
    from lmforge.inference import predict_from_run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Sentiment of: a gorgeous, witty, seductive movie.\nSentiment of: a dull, tedious mess.\n")
    out = tmp_path / "replies.jsonl"
    results = predict_from_run(entry_cfg("predict", [f"run={sft_run['run_dir']}", f"file={prompts}", f"output={out}"]))
    assert [r["prompt"] for r in results] == prompts.read_text().splitlines()
    assert all(r["reply"] in ("positive", "negative") for r in results)
    assert [json.loads(line) for line in out.read_text().splitlines()] == results


def test_replies_are_scored_task_by_task_with_each_tasks_metric():
    from lmforge.experiments.instruct import score_task

    assert score_task("sst2", ["positive.", "Negative", "positive"], ["positive", "negative", "negative"]) == {
        "acc": pytest.approx(200 / 3)
    }
    assert score_task("squad", ["Denver Broncos", "the Panthers"], ["Denver Broncos", "Carolina Panthers"]) == {
        "em": 50.0,
        "f1": pytest.approx(250 / 3, rel=1e-6),  # "the" dropped: P 1, R 1/2, F1 2/3 -> (100 + 66.7) / 2
    }
    entities = score_task(
        "conll2003", ["PER: Peter Blackburn\nLOC: London", "none"], ["PER: Peter Blackburn", "ORG: EU"]
    )
    assert entities == {"precision": 50.0, "recall": 50.0, "f1": 50.0}
    assert score_task("multi30k", ["ein Mann fährt Rad ."], ["ein Mann fährt Rad ."])["bleu"] == pytest.approx(100.0)
    assert set(score_task("samsum", ["Amanda baked cookies."], ["Amanda baked cookies for Jerry."])) == {
        "rouge1",
        "rouge2",
        "rougeL",
    }


def test_only_the_mixtures_conversations_are_scored_by_generation():
    """A user's chat line with a field named task, or a preference pair, is not a mixture task to score."""
    from types import SimpleNamespace

    from lmforge.experiments.instruct import score_replies

    lines = [("chats.jsonl", 1, json.dumps({"task": "summarize", "messages": [{"role": "user", "content": "hi"}]})),
             ("pairs.jsonl", 1, json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}))]  # fmt: skip
    data = SimpleNamespace(lines={"test": lines})
    assert score_replies(None, None, None, data, "test") == {}  # nothing generated, nothing to build
    assert score_replies(None, None, None, SimpleNamespace(), "test") == {}  # a data module without lines


def test_evaluate_scores_a_mixture_run_task_by_task(tmp_path):
    from lmforge.experiments.instruct import score_task
    from lmforge.inference import evaluate_run
    from lmforge.training import run_training

    record = run_training(make_cfg(["model=gpt2-tiny", "model.n_layer=1", "model.n_embd=64", "model.n_head=2",
                                    "tokenizer=bpe", "tokenizer.vocab_size=800", "task=sft",
                                    "task/source=instruct-mixture", "task.source.train_per_task=30",
                                    "task.source.eval_per_task=4", "task.data.block_size=256",
                                    "task.data.skip_invalid=true", "logger=none", "trainer.max_steps=4",
                                    "trainer.val_check_interval=4"], tmp_path / "outputs"))  # fmt: skip
    assert "test/loss" in record["metrics"]  # the mixture has a test split: each task's own
    keys = ("test/sst2/acc", "test/samsum/rougeL", "test/multi30k/bleu", "test/squad/f1", "test/conll2003/f1")
    for key in keys:  # the training run scored its test replies at its end
        assert key in record["metrics"] and 0 <= record["metrics"][key] <= 100, key
    # Its replies are on disk, one line per test conversation, and give back the recorded scores.
    replies = [json.loads(line) for line in (Path(record["run_dir"]) / "replies.jsonl").read_text().splitlines()]
    assert {r["task"] for r in replies} == {"sst2", "samsum", "multi30k", "squad", "conll2003"}
    sst2 = [r for r in replies if r["task"] == "sst2"]
    assert len(sst2) == 4 and all(r["reference"] in ("positive", "negative") for r in sst2)
    rescored = score_task("sst2", [r["reply"] for r in sst2], [r["reference"] for r in sst2])["acc"]
    assert rescored == pytest.approx(record["metrics"]["test/sst2/acc"])
    scores = evaluate_run(entry_cfg("evaluate", [f"run={record['run_dir']}", "max_new_tokens=8"]))["metrics"]
    for key in keys:
        assert key in scores and 0 <= scores[key] <= 100, key
    # The same best checkpoint, the same greedy replies: evaluate gives what training recorded (64 tokens there).
    again = evaluate_run(entry_cfg("evaluate", [f"run={record['run_dir']}"]))["metrics"]
    assert {k: again[k] for k in keys} == {k: record["metrics"][k] for k in keys}
    assert (Path(record["run_dir"]) / "eval-test-replies.jsonl").read_text() == "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in replies
    )


def test_packed_conversations_give_the_loss_and_gradients_of_padded_ones(tmp_path):
    from lmforge.models.gpt import GPT
    from lmforge.tasks.language_modeling import LanguageModelingTask

    path = write_sst2_chats(tmp_path / "chats.jsonl", 24)
    texts = ChatFile(path=str(path), validation_path=str(path)).load(None)
    padded = ChatDataModule(texts, tokenizer(), block_size=96)
    packed = ChatDataModule(texts, tokenizer(), block_size=96, packing=True)
    assert len(packed.examples["train"]) < len(padded.examples["train"]) / 2  # several conversations a row
    rows, conversations = len(packed.examples["train"]), len(padded.examples["train"])
    assert packed.split_sizes["train"] == f"{conversations} in {rows} packed rows"  # what the run's log says
    assert padded.split_sizes["train"] == conversations
    torch.manual_seed(0)
    model = GPT(vocab_size=50260, n_layer=1, n_head=2, n_embd=32, n_positions=96)
    task = LanguageModelingTask(model, optimizer=None)
    losses, grads = [], []
    for batch in (padded.collate(padded.examples["train"]),
                  packed.collate_for("train")([packed.examples["train"][i] for i in range(len(packed.examples["train"]))])):  # fmt: skip
        model.zero_grad()
        loss = task._loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad.clone())
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
