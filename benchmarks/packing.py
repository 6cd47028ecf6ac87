"""Sequence packing against padding: tokens/s and padding share of SFT-style training steps.

    LMFORGE_DATA=/path/to/mirror python benchmarks/packing.py [--seconds 100] [--row-length 512]

The examples are the instruction mixture's training conversations (``task/source=instruct-mixture``,
``--per-task`` from each of SST-2, SAMSum, Multi30k, SQuAD and CoNLL-2003), rendered by the default chat
template and tokenized with the GPT-2 BPE (``<data_dir>/tokenizers/gpt2``) as task=sft encodes them, the
loss on the replies only.

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

from lmforge.data.chat import InvalidConversation, encode_conversation  # noqa: E402
from lmforge.data.chat_template import DEFAULT_SPECIAL_TOKENS, DEFAULT_TEMPLATE, ChatTemplate  # noqa: E402
from lmforge.data.instruct_mixture import TASKS, InstructMixture  # noqa: E402
from lmforge.data.labels import IGNORE  # noqa: E402
from lmforge.data.packing import collate_packed, collate_padded, pack_examples  # noqa: E402
from lmforge.data.sampling import ResumableShuffleSampler  # noqa: E402
from lmforge.data.tokenizers import EOS, gpt2_tokenizer  # noqa: E402
from lmforge.models.gpt import GPT  # noqa: E402


def encode(conversations: list[list[dict]], tok, row_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Each conversation as task=sft encodes it: the default chat template, the loss on the replies, at
    most ``row_length + 1`` tokens (the start kept); and how many it skips, as ``skip_invalid=true`` does
    (a prompt longer than the row)."""
    template = ChatTemplate(DEFAULT_TEMPLATE, eos_token=EOS)
    examples, skipped = [], 0
    for messages in conversations:
        try:
            examples.append(encode_conversation(template, tok, messages, row_length))
        except InvalidConversation:
            skipped += 1
    return examples, skipped


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


def load_examples(data: Path, per_task: int, row_length: int, seed: int, tok) -> tuple[list, list[str]]:
    """The mixture's training conversations as (ids, labels), and a line of length statistics per task."""
    lines = InstructMixture(train_per_task=per_task, seed=seed).load(str(data), ("train",))["train"]
    by_task: dict[str, list] = {}
    for origin, _, line in lines:
        by_task.setdefault(origin.split("/")[1], []).append(json.loads(line)["messages"])
    examples, table = [], []
    for task in TASKS:
        encoded, skipped = encode(by_task[task], tok, row_length)
        lengths = [len(x) for x, _ in encoded]
        cut = sum(n > row_length for n in lengths)  # at the cap: cut, but for one that fits exactly
        table.append(f"{task:10s} {len(encoded):6d} {statistics.mean(lengths):8.1f} {statistics.median(lengths):7.0f} "
                     f"{max(lengths):6d} {cut:6d} {skipped:8d}")  # fmt: skip
        examples += encoded
    return examples, table


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
    parser.add_argument("--per-task", type=int, default=600, help="training conversations from each task")
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
    tok = gpt2_tokenizer(local_dir=str(data / "tokenizers" / "gpt2"))
    tok.add_special_tokens(list(DEFAULT_SPECIAL_TOKENS))  # what task=sft adds for the template
    examples, lines = load_examples(data, args.per_task, args.row_length, args.seed, tok)
    print("\ntask       examples  mean   median    max    cut  skipped (tokens, GPT-2 BPE)\n" + "\n".join(lines))
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
