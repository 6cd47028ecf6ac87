"""Seq2seq: parallel data, teacher forcing, prefix LMs, BLEU/chrF/ROUGE, training and generating from a run dir."""

import json
import random

import pytest
import sacrebleu
import torch
from hydra.utils import instantiate

from conftest import DATA_DIR, entry_cfg, requires_data
from lmforge.compose.parts import build_data, check_pairing
from lmforge.data.seq2seq import IGNORE, ParallelTexts, Seq2SeqDataModule
from lmforge.data.tokenizers import EOS, bpe_tokenizer, char_tokenizer, eos_token_id
from lmforge.errors import LmforgeError
from lmforge.inference import evaluate_run, generate_from_run
from lmforge.models.gpt import GPT
from lmforge.tasks.seq2seq import Seq2SeqTask, text_scores
from lmforge.training import run_training

# A toy language pair: every word has one translation and the order is kept.
LEXICON = {"red": "rot", "blue": "blau", "dog": "Hund", "cat": "Katze", "runs": "rennt", "sleeps": "schläft",
           "big": "groß", "small": "klein", "the": "der", "house": "Haus", "near": "nahe", "green": "grün"}  # fmt: skip


def toy_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    sources = [" ".join(rng.choice(sorted(LEXICON)) for _ in range(rng.randint(3, 7))) for _ in range(n)]
    return sources, [" ".join(LEXICON[w] for w in s.split()) for s in sources]


def write_aligned(folder, splits=(("train", 1200), ("val", 100), ("test", 100))) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in splits:
        en, de = toy_pairs(n, seed=len(split))
        (folder / f"{split}.en").write_text("\n".join(en) + "\n")
        (folder / f"{split}.de").write_text("\n".join(de) + "\n")


def test_aligned_folder_tables_and_mismatched_files(tmp_path):
    write_aligned(tmp_path / "pairs")
    source = ParallelTexts(name="toy", path=str(tmp_path / "pairs"), source_column="en", target_column="de")
    texts = source.load(None, required=("train", "validation", "test"))
    assert {k: len(v["source"]) for k, v in texts.items()} == {"train": 1200, "validation": 100, "test": 100}
    first = texts["train"]["source"][0].split()
    assert texts["train"]["target"][0].split() == [LEXICON[w] for w in first]
    flipped = ParallelTexts(name="toy", path=str(tmp_path / "pairs"), source_column="de", target_column="en")
    assert flipped.load(None)["train"]["source"][0] == texts["train"]["target"][0]

    rows = [{"dialogue": f"A: hi\r\nB: line {i}", "summary": f"s {i}"} for i in range(50)]
    (tmp_path / "talk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = ParallelTexts(name="t", path=str(tmp_path / "talk.jsonl"), source_column="dialogue",
                          target_column="summary", holdout_fraction=0.2)  # fmt: skip
    split = table.load(None)
    assert len(split["train"]["source"]) == 40 and len(split["validation"]["source"]) == 10
    assert all("\r" not in s for s in split["train"]["source"])  # one line-break convention
    with pytest.raises(LmforgeError, match="no column 'text'"):
        ParallelTexts(name="t", path=str(tmp_path / "talk.jsonl"), source_column="text").load(None)

    (tmp_path / "pairs" / "train.de").write_text("nur eine Zeile\n")
    with pytest.raises(LmforgeError, match="has 1,200 lines but .* has 1"):
        source.load(None)


@requires_data
def test_multi30k_and_samsum_from_the_mirror(cfg_factory):
    cfg = cfg_factory(["model=transformer", "task=multi30k"])
    texts = instantiate(cfg.task.source).load(cfg.paths.data_dir, required=("train", "validation", "test"))
    assert {k: len(v["source"]) for k, v in texts.items()} == {"train": 29000, "validation": 1014, "test": 1000}
    assert texts["train"]["source"][0].startswith("Two young, White males")
    assert texts["train"]["target"][0].startswith("Zwei junge weiße Männer")
    flipped = cfg_factory(["model=transformer", "task=multi30k", "task.source_lang=de", "task.target_lang=en"])
    assert instantiate(flipped.task.source).load(DATA_DIR)["train"]["source"][0].startswith("Zwei junge")

    samsum = cfg_factory(["model=transformer", "task=samsum"])
    texts = instantiate(samsum.task.source).load(DATA_DIR, required=("train", "validation", "test"))
    assert {k: len(v["source"]) for k, v in texts.items()} == {"train": 14732, "validation": 818, "test": 819}
    assert not any("\r" in s for s in texts["train"]["source"])


def test_hub_only_tasks_offline_name_their_hub_id(cfg_factory, tmp_path):
    for task, hub_id in (
        ("wmt14", "wmt/wmt14"),
        ("cnn_dailymail", "abisee/cnn_dailymail"),
        ("xsum", "EdinburghNLP/xsum"),
    ):
        cfg = cfg_factory(["model=transformer", f"task={task}"], data_dir=str(tmp_path))
        with pytest.raises(LmforgeError, match=f"not found: .*{hub_id}"):
            build_data(cfg)


def test_model_task_pairs_that_cannot_work_stop_in_one_sentence(cfg_factory):
    with pytest.raises(LmforgeError, match="Seq2SeqTask needs an encoder-decoder or a decoder backbone; "
                                           "model bert-mini is an encoder"):  # fmt: skip
        check_pairing(cfg_factory(["model=bert-mini", "task=multi30k"]))
    with pytest.raises(LmforgeError, match="ClassificationTask needs .*; model transformer is an encoder-decoder"):
        check_pairing(cfg_factory(["model=transformer", "task=sst2"]))
    check_pairing(cfg_factory(["model=gpt2-tiny", "task=multi30k"]))  # a decoder translates as a prefix LM


def _toy_data(max_target_length=128):
    sources, targets = toy_pairs(40, seed=0)
    tokenizer = bpe_tokenizer("\n".join(sources + targets), vocab_size=300)
    texts = {"train": {"source": sources, "target": targets}}
    return tokenizer, Seq2SeqDataModule(texts, tokenizer, max_target_length=max_target_length, batch_size=4)


def test_batches_hold_teacher_forcing_inputs_and_padded_labels():
    tokenizer, data = _toy_data()
    eos = tokenizer.token_to_id(EOS)
    batch = data.collate(data.examples["train"][:4])
    for i, (source, target, text) in enumerate(data.examples["train"][:4]):
        n = len(target)
        assert target[-1] == eos and source[-1] == eos
        assert batch["labels"][i, :n].tolist() == target and (batch["labels"][i, n:] == IGNORE).all()
        assert batch["decoder_input_ids"][i, :n].tolist() == [eos] + target[:-1]  # shifted right by one
        assert batch["input_ids"][i, : len(source)].tolist() == source
        assert batch["attention_mask"][i].sum() == len(source)
        assert tokenizer.decode(target[:-1]).strip() == text == batch["target_text"][i]
    cut = Seq2SeqDataModule({"train": {"source": ["a b c"], "target": ["red " * 50]}}, tokenizer, max_target_length=5)
    assert len(cut.examples["train"][0][1]) == 5 and cut.examples["train"][0][1][-1] == eos


def test_a_decoder_reads_source_eos_target_with_the_loss_on_the_target_only():
    tokenizer, data = _toy_data()
    model = GPT(tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_embd=16, n_positions=64)
    task = Seq2SeqTask(model, optimizer=torch.optim.AdamW, tokenizer=tokenizer)
    batch = data.collate(data.examples["train"][:3])
    input_ids, mask, labels = task._prefix_lm_batch(batch)
    for i, (source, target, _) in enumerate(data.examples["train"][:3]):
        n = len(source) + len(target) - 1
        assert input_ids[i, :n].tolist() == source + target[:-1]
        assert labels[i, :n].tolist() == [IGNORE] * (len(source) - 1) + target
        assert mask[i].sum() == n and (labels[i, n:] == IGNORE).all()


def test_text_scores_are_sacrebleu_and_torchmetrics_rouge():
    hypotheses = ["a man rides a red bike .", "two dogs play in the snow", "nothing alike"]
    references = ["a man is riding a red bike .", "two dogs are playing in the snow", "completely different words"]
    scores = text_scores(hypotheses, references, ("bleu", "chrf", "rouge"))
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    # ROUGE-1 of the first pair by hand (punctuation dropped): 5 shared unigrams, 6 generated, 7 in the reference.
    first = text_scores(hypotheses[:1], references[:1], ("rouge",))
    assert first["rouge1"] == pytest.approx(100 * 2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7), abs=1e-3)
    assert text_scores(references, references, ("bleu",))["bleu"] == pytest.approx(100)


def test_a_tokenizer_without_an_end_token_gets_one_for_translation(cfg_factory, tmp_path):
    write_aligned(tmp_path / "pairs", splits=(("train", 20), ("val", 5)))
    cfg = cfg_factory(["model=gpt2-tiny", "tokenizer=char", "task=seq2seq", f"task.data.path={tmp_path / 'pairs'}",
                       "task.data.source_column=en", "task.data.target_column=de"])  # fmt: skip
    tokenizer, dm = build_data(cfg)
    chars = tokenizer.get_vocab_size() - 1
    assert tokenizer.token_to_id("<|endoftext|>") == dm.eos_id == chars  # after the last character's id
    assert sorted(i for t, i in tokenizer.get_vocab().items() if t != "<|endoftext|>") == list(range(chars))
    with pytest.raises(LmforgeError, match="no end-of-sequence token .*tokenizer=bpe"):
        eos_token_id(char_tokenizer("abc"))  # a tokenizer handed over as it is (a saved run's) still says so


TOY_RUN = ["task=seq2seq", "task.data.source_column=en", "task.data.target_column=de", "tokenizer.vocab_size=300",
           "task.data.batch_size=32", "logger=none", "trainer.val_check_interval=150", "trainer.limit_val_batches=1.0",
           "optimizer.lr=3e-3", "scheduler.warmup_steps=30", "task.module.max_new_tokens=24"]  # fmt: skip


@pytest.fixture(scope="module")
def toy_translation_run(tmp_path_factory):
    """A tiny Transformer trained on the toy language pair (300 steps), shared by the tests below."""
    from conftest import make_cfg

    root = tmp_path_factory.mktemp("toy")
    write_aligned(root / "pairs")
    overrides = [*TOY_RUN, f"task.data.path={root / 'pairs'}", "model=transformer", "model.n_layer=2",
                 "model.n_decoder_layer=2", "model.d_model=64", "model.d_ff=128", "model.n_head=2",
                 "model.norm_first=true", "trainer.max_steps=300", "task.module.num_beams=3"]  # fmt: skip
    return run_training(make_cfg(overrides, root / "outputs"))


@pytest.mark.slow
def test_a_transformer_learns_the_toy_translation(toy_translation_run):
    metrics = toy_translation_run["metrics"]
    assert metrics["test/bleu"] > 85 and metrics["val/bleu"] > 85, metrics
    assert metrics["test/loss"] < 0.3


@pytest.mark.slow
def test_generate_and_evaluate_from_a_seq2seq_run_dir(toy_translation_run, capsys):
    run_dir = toy_translation_run["run_dir"]
    texts = generate_from_run(entry_cfg("generate", [f"run={run_dir}", "text=[the big dog runs,the small cat sleeps]",
                                                     "num_beams=3", "device=cpu"]))  # fmt: skip
    assert texts == ["der groß Hund rennt", "der klein Katze schläft"]
    assert "der groß Hund rennt" in capsys.readouterr().out
    greedy = generate_from_run(entry_cfg("generate", [f"run={run_dir}", "text=the big dog runs", "num_beams=1",
                                                      "device=cpu"]))  # fmt: skip
    assert greedy == texts[:1]
    with pytest.raises(LmforgeError, match="say what to transform"):
        generate_from_run(entry_cfg("generate", [f"run={run_dir}"]))
    record = evaluate_run(entry_cfg("evaluate", [f"run={run_dir}", "device=cpu"]))
    assert record["split"] == "test"
    assert record["metrics"]["test/bleu"] == pytest.approx(toy_translation_run["metrics"]["test/bleu"], abs=1e-6)


# model -> (overrides, steps, lowest acceptable validation BLEU). T5, whose only position signal is a
# relative bias, learns the word order slowest: 600 steps reach ~20-25 BLEU (~95% of words right).
GENERATORS = {
    "gpt2-tiny": (["tokenizer=bpe", "model.n_layer=2", "model.n_embd=64", "model.n_head=2"], 300, 60),
    "gru-attention": (["model.hidden_size=64", "model.embedding_size=64", "model.dropout=0.1"], 600, 80),
    "t5-tiny": (["model.n_layer=2", "model.n_decoder_layer=2", "model.d_model=64", "model.d_ff=128",
                 "model.dropout=0.0", "optimizer.lr=1e-3"], 600, 15),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("model", GENERATORS)
def test_every_kind_of_generator_learns_the_toy_translation(model, cfg_factory, tmp_path):
    write_aligned(tmp_path / "pairs")
    overrides, steps, lowest = GENERATORS[model]
    record = run_training(cfg_factory([*TOY_RUN, f"task.data.path={tmp_path / 'pairs'}", f"model={model}", *overrides,
                                       f"trainer.max_steps={steps}", "trainer.limit_test_batches=0"]))  # fmt: skip
    assert record["metrics"]["val/bleu"] > lowest, record["metrics"]
    assert record["metrics"]["val/chrf"] > 60, record["metrics"]


@requires_data
@pytest.mark.slow
def test_validation_loss_goes_down_on_multi30k(cfg_factory):
    record = run_training(cfg_factory(["model=transformer", "task=multi30k", "model.n_layer=1", "model.n_decoder_layer=1",
                                       "model.d_model=64", "model.d_ff=128", "model.n_head=2", "logger=none",
                                       "optimizer.lr=2e-3", "scheduler.warmup_steps=10", "trainer.max_steps=60",
                                       "trainer.val_check_interval=30", "trainer.limit_val_batches=2",
                                       "trainer.limit_test_batches=1", "task.module.val_generate_limit=16",
                                       "task.module.max_new_tokens=12", "task.module.num_beams=2"]))  # fmt: skip
    losses = [float(r["val/loss"]) for r in _csv_rows(record["run_dir"]) if r.get("val/loss")]
    assert len(losses) == 2 and losses[1] < losses[0] < 9.2, losses  # from ln(8192) = 9.01 downwards
    assert "test/bleu" in record["metrics"] and "test/chrf" in record["metrics"]


def _csv_rows(run_dir):
    import csv
    from pathlib import Path

    return list(csv.DictReader(open(next(Path(run_dir).rglob("metrics.csv")))))


def test_length_bucketing_keeps_every_pair_once_and_cuts_padding():
    from lmforge.data.sampling import ResumableShuffleSampler

    lengths = [random.Random(i).randint(2, 60) for i in range(3000)]
    bucketed = list(ResumableShuffleSampler(3000, seed=1, lengths=lengths, batch_size=32))
    free = list(ResumableShuffleSampler(3000, seed=1))
    assert sorted(bucketed) == list(range(3000))  # an epoch still sees every pair once

    def padded(order):
        return sum(max(lengths[i] for i in order[k : k + 32]) * 32 for k in range(0, 3000, 32))

    assert padded(bucketed) < 0.75 * padded(free)
    resumed = ResumableShuffleSampler(3000, seed=1, lengths=lengths, batch_size=32)
    resumed.skip = 320
    assert list(resumed) == bucketed[320:]  # a resumed run continues the same batches


@pytest.mark.slow
def test_ddp_scores_every_validation_pair_once(tmp_path):
    from conftest import run_cli

    write_aligned(tmp_path / "pairs")
    result = run_cli([*TOY_RUN, f"task.data.path={tmp_path / 'pairs'}", "model=transformer", "model.n_layer=1",
                      "model.n_decoder_layer=1", "model.d_model=64", "model.d_ff=128", "model.n_head=2",
                      "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=60",
                      "trainer.val_check_interval=60", "test_after_fit=false", f"paths.output_root={tmp_path / 'out'}"],
                     timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    # One process over the whole validation split, same weights: the same loss and BLEU as the two ranks together.
    alone = evaluate_run(entry_cfg("evaluate", [f"run={record['run_dir']}", "split=validation", "checkpoint=last",
                                                "device=cpu"]))  # fmt: skip
    assert alone["metrics"]["val/loss"] == pytest.approx(record["metrics"]["val/loss"], abs=1e-4)
    assert alone["metrics"]["val/bleu"] == pytest.approx(record["metrics"]["val/bleu"], abs=0.5)
    assert 1 < record["metrics"]["val/bleu"] < 95  # learning, not learnt: half the pairs would score differently


def test_transformer_dropout_on_attention_and_activations_follows_dropout_unless_set():
    from lmforge.models.transformer import Transformer

    default = Transformer(50, n_layer=1, n_head=2, d_model=16, d_ff=32, dropout=0.2)
    layer = default.decoder[0]
    assert layer.self_attn.dropout == layer.cross_attn.dropout == 0.2 and layer.ff.dropout.p == 0.2
    lean = Transformer(50, n_layer=1, n_head=2, d_model=16, d_ff=32, dropout=0.2, attention_dropout=0.0,
                       activation_dropout=0.0)  # fmt: skip
    for layer in (*lean.encoder, *lean.decoder):
        assert isinstance(layer.ff.dropout, torch.nn.Identity) and layer.self_attn.dropout == 0.0
    assert lean.decoder[0].cross_attn.dropout == 0.0 and lean.decoder[0].sublayers[0].dropout.p == 0.2
    # Only dropout differs: in eval mode both compute the same function of the same weights.
    lean.load_state_dict(default.state_dict())
    ids, mask = torch.randint(0, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(lean.eval()(ids, mask, ids[:, :4]), default.eval()(ids, mask, ids[:, :4]))


def test_serve_translates_as_generate_does(toy_translation_run):
    """lmforge-serve: the run's beam search by default, greedy with temperature 0, alone or batched."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from conftest import serving

    run_dir = toy_translation_run["run_dir"]
    with serving(f"run={run_dir}") as (url, _):
        model = run_dir.rstrip("/").rsplit("/", 1)[-1]

        def complete(prompt: str, **options) -> str:
            body = {"model": model, "prompt": prompt, "max_tokens": 24, **options}
            return httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

        assert complete("the big dog runs") == "der groß Hund rennt"  # beam search, as lmforge-generate
        sources = ["the big dog runs", "the small cat sleeps", "the big cat runs", "the small dog sleeps"]
        alone = [complete(s, temperature=0) for s in sources]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda s: complete(s, temperature=0), sources)) == alone
        chat = {"model": model, "messages": [{"role": "user", "content": "the small cat sleeps"}], "temperature": 0}
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
        assert reply["choices"][0]["message"]["content"] == alone[1]
