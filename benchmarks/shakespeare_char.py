"""Time to quality on Tiny Shakespeare: lmforge's recipes against nanoGPT's baby recipe, side by side.

The runs go one after the other on this machine, each timed from the moment its command starts
(start-up included):

- ``nanogpt``: nanoGPT's ``train.py`` on its CPU baby recipe (``--nanogpt``, a prepared checkout);
- ``baby``: ``train.py experiment=shakespeare-char``, the same recipe in lmforge;
- ``fast``: ``train.py experiment=shakespeare-char-fast`` (Muon, batch 32, 300 steps, whole-split validation).

The target is nanoGPT's step-2,000 validation loss on the whole validation split (its final weights,
evaluated by ``full_validation.py``; without ``--nanogpt``, ``--target``). Printed per run: command to
first step, wall time, time to target (until a validation on the whole split first reaches the target:
nanoGPT's own step-2,000 evaluation, the fast recipe's validations, the baby recipe's final weights),
and the validation losses, then the ratios to nanoGPT.

    python benchmarks/shakespeare_char.py --nanogpt /path/to/nanoGPT [--repeats 1] [--runs nanogpt baby fast]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
NANOGPT_ARGS = [
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
    "--lr_decay_iters=2000", "--dropout=0.0", "--wandb_log=False",
    # Its weights at step 2,000 are the target's source (by default it saves only on a better 20-batch loss).
    "--always_save_checkpoint=True",
]  # fmt: skip
RECIPES = {"baby": "shakespeare-char", "fast": "shakespeare-char-fast"}


@dataclass
class Timed:
    """One run: seconds from its command's start to the first step's end and to exit; its validations."""

    name: str
    first_step: float
    wall: float
    vals: list[tuple[int, float, float]]  # (step, loss, seconds since start)
    full_split: bool  # the validations score the whole split
    checkpoint: Path | None = None
    final_full: float | None = None  # the final weights on the whole split
    load: float = 0.0  # the 1-minute load average when it ended: above ~2.5 another job shared the 2 cores


def run_lmforge(recipe: str, output_root: Path) -> Timed:
    """Run ``train.py experiment=<recipe>`` with the timeline callback; its run dir stays under ``output_root``."""
    events = output_root / "timeline.jsonl"
    cmd = [sys.executable, str(REPO / "train.py"), f"experiment={RECIPES[recipe]}", f"paths.output_root={output_root}",
           "+callbacks.timeline._target_=timeline.Timeline", f"+callbacks.timeline.path={events}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=env)
    wall = time.time() - start
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    first = next(e["t"] - start for e in lines if e["event"] == "first_step")
    vals = [(e["step"], e["loss"], e["t"] - start) for e in lines if e["event"] == "val"]
    run_dir = next(output_root.glob("runs/*/*/checkpoints")).parent
    return Timed(f"lmforge {recipe}", first, wall, vals, full_split=recipe == "fast", checkpoint=run_dir)


def run_nanogpt(checkout: Path, out_dir: Path) -> Timed:
    """Run nanoGPT's ``train.py`` on the baby recipe, timing its output lines as they come."""
    cmd = [sys.executable, "train.py", *NANOGPT_ARGS, f"--out_dir={out_dir}"]
    start = time.time()
    first, vals = None, []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line when it is printed, not when a buffer fills
    with subprocess.Popen(
        cmd, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            if first is None and line.startswith("iter 0:"):
                first = time.time() - start
            if m := re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line):
                vals.append((int(m[1]), float(m[2]), time.time() - start))
    if proc.returncode:
        raise RuntimeError(f"nanoGPT's train.py failed (exit status {proc.returncode})")
    return Timed("nanoGPT", first, time.time() - start, vals, full_split=False, checkpoint=out_dir / "ckpt.pt")


def score_final_weights(runs: list[Timed]) -> None:
    """Each run's final weights on the whole validation split (after all timing is done)."""
    from full_validation import full_split_loss, validation_windows

    windows = validation_windows()
    for run in runs:
        if run.checkpoint is not None:
            run.final_full = full_split_loss(run.checkpoint, windows)[1]


def time_to_target(run: Timed, target: float) -> float | None:
    """Seconds until a whole-split validation first reached ``target``; None if none did."""
    if run.name == "nanoGPT":  # the target is its step-2,000 loss: reached at its step-2,000 evaluation
        return run.vals[-1][2] if run.vals else None
    if run.full_split:
        return next((t for _, loss, t in run.vals if loss <= target), None)
    # A 20-batch estimate is no whole-split figure: only the final weights count, at the last validation.
    return run.vals[-1][2] if run.vals and run.final_full is not None and run.final_full <= target else None


def report(runs: list[Timed], target: float) -> None:
    """The table (Markdown) and the ratios of the time to target."""
    reference = [time_to_target(r, target) for r in runs if r.name == "nanoGPT"]
    ref = sum(reference) / len(reference) if reference else None
    steps = sorted({s for r in runs for s, _, _ in r.vals if s > 0})
    print(f"\ntarget: {target:.4f} (nanoGPT's step-2,000 loss on the whole validation split)\n")
    print("| run | command to first step s | wall s | time to target s | vs nanoGPT | final loss, whole split | load | "
          + " | ".join(f"val {s}" for s in steps) + " |")  # fmt: skip
    print("|---" * (7 + len(steps)) + "|")
    for run in runs:
        ttt = time_to_target(run, target)
        ratio = f"{ttt / ref:.2f}x" if ttt and ref else ""
        losses = {s: loss for s, loss, _ in run.vals}
        cells = [f"{losses[s]:.4f}" if s in losses else "" for s in steps]
        final = f"{run.final_full:.4f}" if run.final_full is not None else ""
        ttt_cell = f"{ttt:.1f}" if ttt is not None else "not reached"
        print(f"| {run.name} | {run.first_step:.1f} | {run.wall:.1f} | {ttt_cell} | {ratio} | {final} | {run.load:.1f} | "
              + " | ".join(cells) + " |")  # fmt: skip
    for name in ("lmforge fast", "lmforge baby"):
        mine = [time_to_target(r, target) for r in runs if r.name == name]
        if ref and mine and all(mine):
            walls = [r.wall for r in runs if r.name == name], [r.wall for r in runs if r.name == "nanoGPT"]
            print(f"{name} / nanoGPT: time to target {sum(mine) / len(mine) / ref:.2f}x, "
                  f"wall time {sum(walls[0]) / len(walls[0]) / (sum(walls[1]) / len(walls[1])):.2f}x")  # fmt: skip


def main() -> None:
    """Run the chosen runs ``--repeats`` times, interleaved, then score and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, help="path to a prepared nanoGPT checkout")
    parser.add_argument("--runs", nargs="+", default=["nanogpt", "baby", "fast"], choices=["nanogpt", "baby", "fast"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--target", type=float, help="the target loss when nanoGPT does not run (RESULTS.md: 1.8983)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    runs: list[Timed] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for which in args.runs:
                out = Path(tmp) / f"{which}{i}"
                out.mkdir()
                if which == "nanogpt" and args.nanogpt:
                    runs.append(run_nanogpt(args.nanogpt, out))
                elif which != "nanogpt":
                    runs.append(run_lmforge(which, out))
                runs[-1].load = os.getloadavg()[0]
                print(f"done: {which} #{i + 1}, load {runs[-1].load:.1f}", flush=True)
        score_final_weights(runs)
    nanogpt = [r.final_full for r in runs if r.name == "nanoGPT"]
    target = sum(nanogpt) / len(nanogpt) if nanogpt else args.target
    if target is None:
        parser.error("without --nanogpt, give --target")
    report(runs, target)


if __name__ == "__main__":
    main()
