"""Data at scale: token stores, lazy shuffling, file corpora, bounded memory."""

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models

from conftest import REPO, SimulatedCrash
from lmforge.data import token_store
from lmforge.data.file_corpora import PythonSources, TextFileCorpus
from lmforge.data.language_modeling import LanguageModelingDataModule
from lmforge.data.sampling import ResumableShuffleSampler, SeededPermutation
from lmforge.data.sources import TextCorpus
from lmforge.data.text_splits import InMemoryText, sample_chunks
from lmforge.data.tokenizers import bpe_tokenizer, build_tokenizer, char_tokenizer, encode_text
from lmforge.errors import LmforgeError
from lmforge.training import run_training

SHAKESPEARE = TextCorpus(name="tinyshakespeare", builtin="tinyshakespeare")
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
]


def generated_text(n_chars: int, seed: int = 0) -> str:
    """Random lines of common words: a corpus of any size that no two seeds share."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)[rng.integers(len(WORDS), size=n_chars // 3)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n".join(lines)[:n_chars] + "\n"


# --- the permutation and the sampler -------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097])
def test_seeded_permutation_is_a_permutation_and_depends_on_its_seed(n):
    order = SeededPermutation(n, seed=5).take(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    assert SeededPermutation(n, seed=5)[n // 2] == order[n // 2]
    if n >= 64:
        assert not np.array_equal(order, SeededPermutation(n, seed=6).take(np.arange(n)))
        assert not np.array_equal(order, np.arange(n))


def test_a_billion_window_starts_are_shuffled_without_a_list():
    sampler = ResumableShuffleSampler(1_000_000_000, seed=1)
    first = [i for _, i in zip(range(5), iter(sampler))]
    assert len(set(first)) == 5 and all(0 <= i < 1_000_000_000 for i in first)
    resumed = ResumableShuffleSampler(1_000_000_000, seed=1)
    resumed.skip = 3
    assert next(iter(resumed)) == first[3]


def test_ddp_ranks_share_out_one_epoch_and_resume_part_way():
    ranks = [list(ResumableShuffleSampler(1001, seed=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 501
    assert set(ranks[0]) | set(ranks[1]) == set(range(1001))
    resumed = ResumableShuffleSampler(1001, seed=2, num_replicas=2, rank=1)
    resumed.skip = 100
    assert list(resumed) == ranks[1][100:]
    resumed.set_epoch(1)
    assert list(resumed) != ranks[1] and len(list(resumed)) == 501  # a new epoch starts from its beginning


# --- token stores --------------------------------------------------------------------------------


def test_memory_mapped_windows_hold_the_tokens_of_the_in_memory_encoding(tmp_path):
    splits = SHAKESPEARE.load(None)
    train, validation = splits["train"].text(), splits["validation"].text()
    for tok in (char_tokenizer(train), bpe_tokenizer(train[:300_000], vocab_size=500)):
        dm = LanguageModelingDataModule(splits, tok, block_size=64, batch_size=4, cache_dir=str(tmp_path))
        for name, text in (("train", train), ("validation", validation)):
            assert np.array_equal(dm.stores[name].to_numpy(), np.array(encode_text(tok, text)))
        x, y = dm._windows("train", 64)[1000]
        assert x.tolist() == encode_text(tok, train)[64_000:64_064] and y.tolist()[:-1] == x.tolist()[1:]
    assert dm.chars_per_token["train"] == pytest.approx(len(train) / len(dm.stores["train"]))


def test_a_store_reads_windows_across_its_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(token_store, "SHARD_TOKENS", 1000)
    text = generated_text(20_000)
    tok = char_tokenizer(text)
    store = token_store.open_or_build(InMemoryText(text), tok, tmp_path)
    ids = np.array(encode_text(tok, text))
    assert len(store.meta["shard_tokens"]) == -(-len(ids) // 1000) > 10 and store.dtype == np.uint16
    assert np.array_equal(store[990:2010], ids[990:2010]) and np.array_equal(store.to_numpy(), ids)


def test_documents_are_separated_by_the_end_of_text_token(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta\n")
    (tmp_path / "b.txt").write_text("gamma delta\n")
    split = TextFileCorpus(files=str(tmp_path))._split_of(sorted(map(str, tmp_path.glob("*.txt"))))
    tok = bpe_tokenizer("alpha beta gamma delta\n" * 50, vocab_size=300)
    ids = token_store.open_or_build(split, tok, tmp_path / "cache").to_numpy().tolist()
    eos = tok.token_to_id("<|endoftext|>")
    assert ids.count(eos) == 1 and tok.decode(ids[: ids.index(eos)]) == "alpha beta\n"


def _build_in_child(text: str, cache: str, marker_dir: str, start) -> None:
    original = token_store._build

    def recording_build(*args, **kwargs):
        Path(marker_dir, f"built-{os.getpid()}").touch()
        time.sleep(1.0)  # hold the lock long enough for the other process to wait on it
        return original(*args, **kwargs)

    token_store._build = recording_build
    start.wait()
    store = token_store.open_or_build(InMemoryText(text), char_tokenizer(text), cache)
    Path(marker_dir, f"tokens-{os.getpid()}").write_text(str(store.to_numpy().sum()))


def test_two_processes_build_one_store_once(tmp_path):
    text = generated_text(200_000)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_build_in_child, args=(text, str(tmp_path / "c"), str(tmp_path), start)) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(list(tmp_path.glob("built-*"))) == 1
    sums = {p.read_text() for p in tmp_path.glob("tokens-*")}
    assert len(sums) == 1 and len(list(tmp_path.glob("tokens-*"))) == 2
    assert len(list((tmp_path / "c" / "tokens").glob("*/meta.json"))) == 1


@pytest.mark.slow
def test_torchrun_ranks_starting_together_build_each_store_once_and_train_on_it(tmp_path):
    """Both ranks reach the build at once (torchrun starts them together, unlike Lightning's launcher):
    one builds under the lock, the other waits and opens the same files; no barrier is involved."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part{i}.txt").write_text(generated_text(4_000_000, seed=i))
    args = [
        "task=text", f"task.source.files={corpus}", "task.source.holdout_fraction=0.25", "trainer=ddp",
        "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2", "logger=none", "task.module.num_samples=0", "model.n_layer=1",
        f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py")]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    stores = sorted((tmp_path / "cache" / "tokens").iterdir())
    assert len([p for p in stores if (p / "meta.json").is_file()]) == 2  # train and validation, once each
    assert not [p for p in stores if ".tmp-" in p.name]
    (record,) = (json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines())
    assert record["world_size"] == 2 and record["steps"] == 3


def test_an_interrupted_build_is_rebuilt_not_read(tmp_path):
    corpus = tmp_path / "big.txt"
    corpus.write_text(generated_text(30_000_000))
    cache = tmp_path / "cache"
    script = (
        "import sys; from lmforge.data.file_corpora import TextFileCorpus; from lmforge.data.tokenizers import char_tokenizer;"
        "from lmforge.data import token_store;"
        f"s = TextFileCorpus(files={str(corpus)!r}).load(None)['train'];"
        f"token_store.open_or_build(s, char_tokenizer(s), {str(cache)!r})"
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while not list((cache / "tokens").glob("*.tmp-*/shard_00000.bin")) and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list((cache / "tokens").glob("*.tmp-*")), "the build was killed before it wrote anything"
    assert not list((cache / "tokens").glob("*/meta.json"))

    split = TextFileCorpus(files=str(corpus)).load(None)["train"]
    store = token_store.open_or_build(split, char_tokenizer(split), cache)
    assert len(store) == store.num_chars == int(corpus.stat().st_size * 0.99)
    assert not list((cache / "tokens").glob("*.tmp-*"))  # the killed build's folder is gone


def test_a_full_disk_stops_the_build_in_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    def full(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_store._ShardWriter, "write", full)
    text = generated_text(10_000)
    with pytest.raises(LmforgeError, match="disk filled up .*paths.cache_dir"):
        token_store.open_or_build(InMemoryText(text), char_tokenizer(text), tmp_path)
    assert all(p.suffix == ".lock" for p in (tmp_path / "tokens").iterdir())


def test_a_vocabulary_too_large_for_the_id_type_is_refused(tmp_path):
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0"))
    assert token_store.token_dtype(big.get_vocab_size()) == np.uint32
    with pytest.raises(LmforgeError, match="token_dtype=uint16 cannot hold .*70,000"):
        token_store.open_or_build(InMemoryText("w1 w2"), big, tmp_path, requested_dtype="uint16")


def test_an_empty_corpus_says_so(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "also.txt").write_text("")
    (tmp_path / "third.txt").write_text("")
    splits = TextFileCorpus(files=str(tmp_path), holdout_fraction=0.34).load(None)
    with pytest.raises(LmforgeError, match="holds no text"):
        token_store.open_or_build(splits["train"], char_tokenizer("abc"), tmp_path / "cache")


# --- file corpora --------------------------------------------------------------------------------


def test_a_split_too_short_for_one_window_says_which_and_how_to_fix_it(tmp_path):
    text = generated_text(5_000)
    dm = LanguageModelingDataModule({"train": text, "validation": "too short\n"}, char_tokenizer(text), block_size=64)
    with pytest.raises(LmforgeError, match=r"validation split holds 10 tokens, too few .*block_size=64"):
        dm.val_dataloader()


def test_text_files_are_split_by_document_with_a_fixed_seed(tmp_path):
    for i in range(200):
        (tmp_path / f"doc{i:03d}.txt").write_text(f"document {i}\n")
    corpus = TextFileCorpus(files=str(tmp_path / "*.txt"), holdout_fraction=0.05, test_fraction=0.05)
    splits = corpus.load(None, required=("train", "validation", "test"))
    names = {k: {os.path.basename(p.path) for p in v.pieces} for k, v in splits.items()}
    assert len(names["validation"]) == len(names["test"]) == 10 and len(names["train"]) == 180
    assert not (names["train"] & names["validation"]) and not (names["validation"] & names["test"])
    again = corpus.load(None, required=("train", "validation", "test"))
    assert {os.path.basename(p.path) for p in again["validation"].pieces} == names["validation"]


def test_rows_of_jsonl_and_parquet_files_are_documents_held_out_by_hash(tmp_path):
    rows = [{"text": f"row number {i}", "id": i} for i in range(3000)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1500]))
    pq.write_table(pa.Table.from_pylist(rows[1500:]), tmp_path / "b.parquet")
    splits = TextFileCorpus(files=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], holdout_fraction=0.1).load(
        None
    )
    docs = {k: ["".join(d) for d in v.documents()] for k, v in splits.items()}
    assert len(docs["train"]) + len(docs["validation"]) == 3000
    assert 200 < len(docs["validation"]) < 400 and not set(docs["train"]) & set(docs["validation"])


def test_bad_files_stop_in_one_sentence_naming_the_file(tmp_path):
    with pytest.raises(LmforgeError, match="matches no"):
        TextFileCorpus(files=str(tmp_path / "nothing" / "**" / "*.txt")).load(None)
    (tmp_path / "ok.txt").write_text("fine text\n" * 10)
    (tmp_path / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    split = TextFileCorpus(files=str(tmp_path))._split_of(sorted(map(str, tmp_path.glob("*.txt"))))
    with pytest.raises(LmforgeError, match=r"blob\.txt is not"):
        token_store.open_or_build(split, char_tokenizer("fine text"), tmp_path / "cache")
    (tmp_path / "rows.jsonl").write_text('{"body": "no text field"}\n')
    rows = TextFileCorpus(files=str(tmp_path / "rows.jsonl"))._split_of([str(tmp_path / "rows.jsonl")])
    with pytest.raises(LmforgeError, match=r"rows\.jsonl line 1 has no field 'text'.*text_column"):
        list(rows.documents())
    assert not list((tmp_path / "cache" / "tokens").glob("*/meta.json"))


def test_the_code_corpus_is_this_machines_python_sources():
    splits = PythonSources().load(None, required=("train", "validation", "test"))
    train = {p.path for p in splits["train"].pieces}
    assert splits["train"].num_bytes > 50_000_000 and all(p.endswith(".py") for p in train)
    assert any(p.endswith(f"{os.sep}os.py") for p in train | {p.path for p in splits["validation"].pieces})
    assert not train & {p.path for p in splits["test"].pieces}


# --- tokenizers from a bounded sample ------------------------------------------------------------


def test_tokenizers_train_on_a_bounded_seeded_sample_and_are_cached(tmp_path):
    split = InMemoryText(generated_text(3_000_000))
    sample = list(sample_chunks(split, 500_000, seed=0))
    assert 400_000 < sum(map(len, sample)) < 600_000 and sample == list(sample_chunks(split, 500_000, seed=0))
    calls = []

    def builder(text):
        calls.append(1)
        return bpe_tokenizer(text, vocab_size=300)

    first = build_tokenizer(builder, split, str(tmp_path), "bpe-300", sample_chars=500_000)
    second = build_tokenizer(builder, split, str(tmp_path), "bpe-300", sample_chars=500_000)
    assert len(calls) == 1 and first.get_vocab() == second.get_vocab()


# --- end to end ----------------------------------------------------------------------------------


def test_a_streamed_corpus_trains_and_resumes_where_it_stopped(cfg_factory, tmp_path):
    folder = tmp_path / "stream"
    folder.mkdir()
    for i in range(3):
        lines = generated_text(40_000, seed=i).splitlines()
        (folder / f"train-{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (folder / "valid.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in generated_text(5_000, 9).splitlines())
    )
    split = [
        "task=text", f"task.source.files={folder}/train-*.jsonl", f"task.source.validation_files={folder}/valid.jsonl",
        "task.source.streaming=true", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.dropout=0.1",
        "task.data.block_size=32", "task.data.batch_size=4", "logger=none", "trainer.max_steps=8", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "test_after_fit=false", "task.module.num_samples=0",
    ]  # fmt: skip
    straight = run_training(cfg_factory(split))
    assert straight["steps"] == 8
    crashing = cfg_factory([*split, "callbacks.last_checkpoint.every_n_train_steps=2",
                            "+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=5"])  # fmt: skip
    with pytest.raises(SimulatedCrash):
        run_training(crashing)
    ckpt = torch.load(Path(crashing.paths.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["LanguageModelingDataModule"]["stream_snapshots"]  # the stream's position
    resumed = run_training(cfg_factory([f"resume={crashing.paths.run_dir}"]))
    assert resumed["steps"] == 8
    for key in ("train/loss", "val/loss"):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], abs=1e-5), key


def _stream_windows(path: Path, rank: int, world_size: int, resume: tuple | None = None) -> list[list[int]]:
    from datasets import load_dataset

    from lmforge.data.streaming import StreamedText, StreamedWindows

    stream = load_dataset("json", data_files=[str(path)], split="train", streaming=True)
    windows = StreamedWindows(StreamedText(stream, "text", "test"), char_tokenizer(WORDS_TEXT), 16, rank, world_size)
    if resume is not None:
        windows.resume_at(*resume)
    out = [x.tolist() + y[-1:].tolist() for x, y in windows]
    return out, list(windows.snapshots)


WORDS_TEXT = " \n" + "".join(sorted(set("".join(WORDS))))


def test_ddp_ranks_take_turns_at_a_stream_and_get_the_same_number_of_windows(tmp_path):
    # 200 short documents in 64-document batches: rounds of windows straddle the batches.
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": generated_text(50, seed=i)}) + "\n" for i in range(200)))
    alone, _ = _stream_windows(path, 0, 1)
    ranks = [_stream_windows(path, r, 3)[0] for r in range(3)]
    assert len(alone) % 3 and len({len(windows) for windows in ranks}) == 1  # equal, though not divisible
    assert [w for round_ in zip(*ranks) for w in round_] == alone[: len(ranks[0]) * 3]  # rank r: windows r, r+3, ...
    # A resumed rank continues with its own next window, from a snapshot of the whole stream's position.
    _, snapshots = _stream_windows(path, 1, 3)
    resumed, _ = _stream_windows(path, 1, 3, resume=(snapshots, 3 * 4))  # 4 windows per rank were taken
    assert resumed == ranks[1][4:]


PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


@pytest.mark.slow
def test_a_stream_shorter_than_the_run_trains_under_ddp_across_its_end(tmp_path):
    """Two gloo ranks on a stream they read to the end several times: neither waits for the
    other's data in a collective (split by rows, the ranks would hold different numbers of windows)."""
    folder = tmp_path / "stream"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "".join(json.dumps({"text": generated_text(300, seed=i)}) + "\n" for i in range(9))
    )
    (folder / "valid.jsonl").write_text(json.dumps({"text": generated_text(3_000, seed=99)}) + "\n")
    args = [
        "task=text", f"task.source.files={folder}/train.jsonl", f"task.source.validation_files={folder}/valid.jsonl",
        "task.source.streaming=true", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        "trainer.max_steps=30", "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "logger=none",
        "task.module.num_samples=0", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "task.data.block_size=32",
        "task.data.batch_size=4", f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (record,) = (json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines())
    assert record["world_size"] == 2 and record["steps"] == 30
    (last,) = (tmp_path / "out").glob("runs/*/*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["epoch"] >= 2  # 2.7 kB in windows of 32, 8 a step: 10 steps a pass


@pytest.mark.slow
def test_a_50_mb_corpus_trains_in_memory_that_does_not_grow_with_it(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"part{i}.txt").write_text(generated_text(10_000_000, seed=i))
    command = [
        sys.executable, "-c", PEAK_RSS, sys.executable, str(REPO / "train.py"), "task=text",
        f"task.source.files={corpus}", "task.source.holdout_fraction=0.2", "logger=none",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
        "task.module.num_samples=0", f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    peak_mb = int(done.stdout.split("peak_rss_kb")[-1]) / 1024
    # Before token stores this run took about 180 bytes per character: 9 GB.
    assert peak_mb < 2000, f"peak RSS {peak_mb:.0f} MB"
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[-1])
    assert record["steps"] == 3
