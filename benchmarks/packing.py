"""Sequence packing against padding: tokens/s and padding share of SFT-style training steps.

    LMFORGE_DATA=/path/to/mirror python benchmarks/packing.py [--seconds 100] [--row-length 512]

The instruction mixture does not exist yet, so its length distribution is built from the tasks it will
hold, read from the data mirror: SAMSum (dialogue -> summary), SST-2 (sentence -> label), Multi30k
(English -> German), SQuAD dev (context and question -> answer) and CoNLL-2003 (sentence -> entities),
the same number of examples from each, written as a user turn and an assistant reply and tokenized with
the GPT-2 BPE (``<data_dir>/tokenizers/gpt2``). The loss covers the reply only, as task=sft's does.

A small GPT (``--layers`` x ``--width``) trains on the CPU (forward, next-token loss over all positions as the
language-modelling task computes it, backward, AdamW) with four kinds of batches. Its vocabulary is
``--vocab`` ids, GPT-2's folded into it (id mod vocab): the lengths are GPT-2's, but the output layer over
50,257 tokens would take most of a CPU step whatever the batches hold.

- padded to the row length: every example alone in a row of ``--row-length`` positions;
- padded to the longest: ``--batch`` random examples, padded to the longest of them;
- padded, length-grouped: the same, batches drawn from pools sorted by length (what task=sft does unpacked,
  :class:`lmforge.data.sampling.ResumableShuffleSampler`);
- packed: rows of ``--row-length`` filled by :func:`lmforge.data.packing.pack_examples` (best-fit decreasing),
  attention kept inside each example through ``document_ids``.

The modes take turns a step at a time (after a warm-up step each) for ``--seconds`` in all, each step timed
alone, so that whatever else the machine does spreads over all of them alike. "Real tokens" are positions
that hold an example's token (padding excluded); the padding share is the rest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lmforge.data.labels import IGNORE  # noqa: E402
from lmforge.data.packing import collate_packed, collate_padded, pack_examples  # noqa: E402
from lmforge.data.sampling import ResumableShuffleSampler  # noqa: E402
from lmforge.data.tokenizers import gpt2_tokenizer  # noqa: E402
from lmforge.models.gpt import GPT  # noqa: E402

Pair = tuple[str, str]  # (user turn, assistant reply)


def samsum(data: Path, rng: random.Random, n: int) -> list[Pair]:
    rows = [json.loads(line) for line in (data / "samsum" / "train.jsonl").open(encoding="utf-8")]
    return [(f"Summarize this dialogue.\n{r['dialogue']}", r["summary"]) for r in rng.sample(rows, n)]


def sst2(data: Path, rng: random.Random, n: int) -> list[Pair]:
    lines = (data / "glue" / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in rng.sample(lines, n)]
    return [(f"Is this review positive or negative?\n{s}", ["negative", "positive"][int(y)]) for s, y in rows]


def multi30k(data: Path, rng: random.Random, n: int) -> list[Pair]:
    en = (data / "multi30k" / "train.en").read_text(encoding="utf-8").splitlines()
    de = (data / "multi30k" / "train.de").read_text(encoding="utf-8").splitlines()
    return [(f"Translate into German.\n{en[i]}", de[i]) for i in rng.sample(range(len(en)), n)]


def squad(data: Path, rng: random.Random, n: int) -> list[Pair]:
    articles = json.loads((data / "squad" / "dev-v1.1.json").read_text(encoding="utf-8"))["data"]
    questions = [(p["context"], q) for a in articles for p in a["paragraphs"] for q in p["qas"]]
    return [
        (f"Answer from the passage.\n{context}\nQuestion: {q['question']}", q["answers"][0]["text"])
        for context, q in rng.sample(questions, n)
    ]


def conll(data: Path, rng: random.Random, n: int) -> list[Pair]:
    sentences, words, tags = [], [], []
    for line in [*(data / "conll2003" / "train.txt").read_text(encoding="utf-8").splitlines(), ""]:
        if line.strip():
            word, *_, tag = line.split()
            words.append(word)
            tags.append(tag)
        elif words:
            sentences.append((words, tags))
            words, tags = [], []
    return [(f"List the named entities.\n{' '.join(w)}", _entities(w, t)) for w, t in rng.sample(sentences, n)]


def _entities(words: list[str], tags: list[str]) -> str:
    spans: list[list[str]] = []
    for word, tag in zip(words, tags):
        if tag.startswith("B-") or (tag.startswith("I-") and not spans):
            spans.append([tag[2:], word])
        elif tag.startswith("I-"):
            spans[-1].append(word)
    return "; ".join(f"{s[0]}: {' '.join(s[1:])}" for s in spans) or "none"


SOURCES = {"samsum": samsum, "sst2": sst2, "multi30k": multi30k, "squad": squad, "conll2003": conll}


def encode(tok, pairs: list[Pair], row_length: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids and labels (the reply only) of each pair, kept to ``row_length + 1`` tokens (the start, as
    task=sft keeps); and how many were cut."""
    prompts = tok.encode_batch([f"<|user|>\n{p}\n<|assistant|>\n" for p, _ in pairs], add_special_tokens=False)
    replies = tok.encode_batch([f"{r}<|endoftext|>" for _, r in pairs], add_special_tokens=False)
    ids, labels, cut = [], [], 0
    for p, r in zip(prompts, replies):
        x, y = p.ids + r.ids, [IGNORE] * len(p.ids) + r.ids
        cut += len(x) > row_length + 1
        ids.append(x[: row_length + 1])
        labels.append(y[: row_length + 1])
    return ids, labels, cut


def padded_batches(examples, batch: int, order: Iterator[int], pad_to: int | None) -> Iterator:
    """Batches of ``batch`` examples in ``order``, padded to the longest (or to ``pad_to`` positions)."""
    while True:
        chosen = [examples[next(order)] for _ in range(batch)]
        padded = collate_padded(chosen)
        if pad_to is not None and padded.input_ids.shape[1] < pad_to:
            grow = pad_to - padded.input_ids.shape[1]
            padded = padded._replace(
                input_ids=F.pad(padded.input_ids, (0, grow)), labels=F.pad(padded.labels, (0, grow), value=IGNORE)
            )
        yield padded, sum(len(ids) - 1 for ids, _ in chosen)


def random_order(n: int, seed: int) -> Iterator[int]:
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.permutation(n).tolist()


def grouped_order(lengths: list[int], batch: int, seed: int) -> Iterator[int]:
    sampler = ResumableShuffleSampler(len(lengths), seed, np.asarray(lengths), batch)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from sampler


def packed_batches(rows, batch: int, seed: int) -> Iterator:
    order = random_order(len(rows), seed)
    while True:
        packed = collate_packed([rows[next(order)] for _ in range(batch)])
        yield packed, int((packed.document_ids >= 0).sum())


def train_step(model, opt, batch) -> None:
    """Forward, mean next-token loss over the labelled positions, backward, AdamW."""
    logits = model(batch.input_ids % model.vocab_size, document_ids=batch.document_ids)
    labels = batch.labels.where(batch.labels == IGNORE, batch.labels % model.vocab_size)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run_interleaved(model, opt, modes: dict[str, Iterator], seconds: float) -> dict[str, dict]:
    """A warm-up step of each mode, then a step of each in turn for ``seconds``: each mode's steps, time,
    positions and real tokens."""
    for batches in modes.values():
        train_step(model, opt, next(batches)[0])
    totals = {m: {"steps": 0, "seconds": 0.0, "positions": 0, "real": 0} for m in modes}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for mode, batches in modes.items():
            batch, real = next(batches)
            start = time.perf_counter()
            train_step(model, opt, batch)
            t = totals[mode]
            t["seconds"] += time.perf_counter() - start
            t["steps"], t["positions"], t["real"] = (
                t["steps"] + 1,
                t["positions"] + batch.input_ids.numel(),
                t["real"] + real,
            )
    return totals


def load_examples(data: Path, per_source: int, row_length: int, seed: int, tok) -> tuple[list, list[str]]:
    """The mixture's examples as (ids, labels), and a line of length statistics per source."""
    rng = random.Random(seed)
    examples, lines = [], []
    for name, read in SOURCES.items():
        ids, labels, cut = encode(tok, read(data, rng, per_source), row_length)
        lengths = [len(x) for x in ids]
        lines.append(f"{name:10s} {len(ids):6d} {statistics.mean(lengths):8.1f} {statistics.median(lengths):7.0f} "
                     f"{max(lengths):6d} {cut:6d}")  # fmt: skip
        examples += list(zip(ids, labels))
    return examples, lines


def print_table(results: dict, batch_sizes: dict) -> None:
    base = results["padded, length-grouped"]["real"] / results["padded, length-grouped"]["seconds"]
    print("| batches | examples or rows / step | positions / step | padding share | steps/s | real tokens/s | "
          "vs padded, length-grouped |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for mode, t in results.items():
        rate = t["real"] / t["seconds"]
        print(f"| {mode} | {batch_sizes[mode]} | {t['positions'] / t['steps']:,.0f} | "
              f"{1 - t['real'] / t['positions']:.1%} | {t['steps'] / t['seconds']:.2f} | {rate:,.0f} | "
              f"{rate / base:.2f}x |")  # fmt: skip
    rates = {m: t["real"] / t["seconds"] for m, t in results.items()}
    print("\npacking " + " ".join(f"{k.replace(', ', '_').replace(' ', '_')}_tokens_per_s={v:.0f}" for k, v in rates.items())
          + f" packed_vs_grouped={rates['packed'] / base:.2f} packed_vs_fixed={rates['packed'] / rates['padded to the row length']:.2f}"
          + f" packed_vs_longest={rates['packed'] / rates['padded to the longest']:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("LMFORGE_DATA"), help="the data mirror (LMFORGE_DATA)")
    parser.add_argument("--per-source", type=int, default=600, help="examples from each task")
    parser.add_argument("--row-length", type=int, default=512, help="positions per row (task=sft's block_size)")
    parser.add_argument("--batch", type=int, default=16, help="examples per padded batch (task=sft's batch_size)")
    parser.add_argument("--rows", type=int, default=4, help="rows per packed (and row-length padded) batch")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192, help="embedding rows; GPT-2's ids are folded into them")
    parser.add_argument("--seconds", type=float, default=100.0, help="timed seconds, all modes together")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.data:
        sys.exit("Set LMFORGE_DATA (or --data) to the data mirror.")
    data = Path(args.data)
    print(f"{date.today()}  torch {torch.__version__}  {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    examples, lines = load_examples(
        data, args.per_source, args.row_length, args.seed, gpt2_tokenizer(local_dir=str(data / "tokenizers" / "gpt2"))
    )
    print("\nsource     examples  mean   median    max    cut (tokens, GPT-2 BPE)\n" + "\n".join(lines))
    rows = pack_examples([x for x, _ in examples], [y for _, y in examples], args.row_length)
    print(
        f"\n{len(examples)} examples -> {len(rows)} packed rows of {args.row_length} ({rows.padding_share:.1%} padding)\n"
    )
    lengths = [len(x) for x, _ in examples]
    modes = {
        "padded to the row length": (padded_batches(examples, args.rows, random_order(len(examples), 1), args.row_length), args.rows),
        "padded to the longest": (padded_batches(examples, args.batch, random_order(len(examples), 1), None), args.batch),
        "padded, length-grouped": (padded_batches(examples, args.batch, grouped_order(lengths, args.batch, 1), None), args.batch),
        "packed": (packed_batches(rows, args.rows, 1), args.rows),
    }  # fmt: skip
    torch.manual_seed(args.seed)
    model = GPT(
        args.vocab, n_layer=args.layers, n_head=max(1, args.width // 64), n_embd=args.width, n_positions=args.row_length
    )
    print(f"model: GPT {args.layers} x {args.width}, {model.num_parameters():,} parameters, vocabulary {args.vocab}\n")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    results = run_interleaved(model, opt, {m: batches for m, (batches, _) in modes.items()}, args.seconds)
    print_table(
        results, {m: f"{n} {'rows' if 'row' in m or m == 'packed' else 'examples'}" for m, (_, n) in modes.items()}
    )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
