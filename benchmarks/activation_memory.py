"""Memory and step time of lmforge's GPT with and without ``activation_checkpointing=true``, and with the
chunked loss (``task.module.loss_chunk_size``) on top.

    python benchmarks/activation_memory.py [--steps 4]

Each (size, setting) trains for a few steps (forward + backward + fused AdamW, fp32, random
batches) in a fresh process, so the peak of one does not hide the other's. The table gives the
process's peak memory (resident set on the CPU; on a GPU, the most CUDA memory allocated); the part
of it above what the last step started with (weights, gradients, AdamW state: what a step adds,
activations and logits); the median step time after the first step; and the ratios to the plain
run. It ends with one line of ``key=value`` pairs.

Checkpointing drops the activations inside the blocks, not the logits: with GPT-2's 50,257-token
vocabulary the logits and their gradient are a large share of what a step adds at short contexts,
which the chunked loss (256 positions at a time) removes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from throughput import full_logits_loss, timed_step  # noqa: E402  (this folder is on sys.path when the script runs)

from lmforge.models.gpt import GPT  # noqa: E402
from lmforge.models.layers import enable_activation_checkpointing  # noqa: E402
from lmforge.tasks.language_modeling import chunked_cross_entropy  # noqa: E402

# name: (n_layer, n_head, n_embd, vocab, context, batch)
SIZES = {
    "6x384, 65 chars, ctx 1024": (6, 6, 384, 65, 1024, 4),
    "gpt2 124M, ctx 256": (12, 12, 768, 50257, 256, 4),
}


def _memory_mb(device: torch.device, peak: bool) -> float:
    """This process's memory now or at its peak: resident set on the CPU, allocated CUDA memory on a GPU."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


# setting: (activation checkpointing, positions per loss chunk or None)
SETTINGS = {"off": (False, None), "on": (True, None), "on + chunked loss": (True, 256)}


def measure(size: str, setting: str, steps: int) -> dict[str, float]:
    """Train ``steps`` steps of one size and setting in this process: peak memory and what the last step
    added (MB), median step time (ms)."""
    layers, heads, width, vocab, ctx, batch = SIZES[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPT(vocab, layers, heads, width, ctx, bias=True).to(device).train()
    checkpointing, chunk = SETTINGS[setting]
    if checkpointing:
        enable_activation_checkpointing(model)

    def chunked_loss(model, x, y):
        return chunked_cross_entropy(model.hidden_states(x), model.lm_head, y, chunk)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = torch.randint(0, vocab, (steps, batch, ctx + 1), device=device)
    times = []
    for d in data:
        before = _memory_mb(device, peak=False)  # weights, last step's gradients, AdamW state
        times.append(
            timed_step(model, opt, d[:, :-1], d[:, 1:], "fp32", device, chunked_loss if chunk else full_logits_loss)
        )
    peak = _memory_mb(device, peak=True)
    return {"peak_mb": peak, "step_mb": peak - before, "step_ms": statistics.median(times[1:]) * 1e3}


def in_fresh_process(size: str, setting: str, steps: int) -> dict[str, float]:
    """:func:`measure` in a child process (peak memory is per process)."""
    cmd = [sys.executable, __file__, "--one", size, "--setting", setting, "--steps", str(steps)]
    # glibc keeps freed blocks below its (self-raising) mmap threshold for reuse, so the resident set would
    # not fall after a step; a fixed 64 KiB threshold returns every tensor's memory when it is freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    """Print the table and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="off", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.setting, args.steps)))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{time.strftime('%Y-%m-%d')}  torch {torch.__version__}  {device}, fp32, {args.steps} steps each")
    what = "peak CUDA MB" if torch.cuda.is_available() else "peak RSS MB"
    print(f"{'size':<27} {'checkpointing':<18} {what:>12} {'step adds MB':>13} {'ms/step':>8}  vs off: step adds, time")
    ratios: dict[str, list[float]] = {}
    for size in SIZES:
        rows = {setting: in_fresh_process(size, setting, args.steps) for setting in SETTINGS}
        for setting, row in rows.items():
            memory, slower = row["step_mb"] / rows["off"]["step_mb"], row["step_ms"] / rows["off"]["step_ms"]
            print(f"{size:<27} {setting:<18} {row['peak_mb']:12,.0f} {row['step_mb']:13,.0f} {row['step_ms']:8.0f}"
                  f"  {memory:.2f}x, {slower:.2f}x")  # fmt: skip
            if setting != "off":
                key = "checkpointing" if setting == "on" else "chunked"
                ratios.setdefault(f"{key}_step_memory_ratio", []).append(memory)
                ratios.setdefault(f"{key}_step_time_ratio", []).append(slower)
    print("\n" + " ".join(f"{k}={statistics.median(v):.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
