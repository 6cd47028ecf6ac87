"""Time `python train.py experiment=shakespeare-char` against nanoGPT's train.py on the same recipe.

Both commands run one after the other on this machine, timed from start to exit
(start-up included), and the script prints a table of wall time and validation loss
at every evaluation step, with the ratio of the wall times.

    python benchmarks/shakespeare_char.py --nanogpt /path/to/nanoGPT [--repeats 1]

``--nanogpt`` is a checkout of karpathy/nanoGPT with
``data/shakespeare_char/{train,val}.bin`` prepared (its ``prepare.py``); without it
only lmforge runs.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_ARGS = [
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
    "--lr_decay_iters=2000", "--dropout=0.0", "--wandb_log=False",
]  # fmt: skip


def run_lmforge(output_root: Path) -> tuple[float, dict[int, float]]:
    """Run the lmforge recipe; return wall seconds and {step: val loss}."""
    cmd = [sys.executable, str(REPO / "train.py"), "experiment=shakespeare-char", f"paths.output_root={output_root}"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - start
    metrics = next(output_root.glob("runs/*/*/csv/metrics.csv"))
    losses = {}
    with open(metrics, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/loss"):
                losses[int(row["step"]) + 1] = float(row["val/loss"])
    return wall, losses


def run_nanogpt(checkout: Path) -> tuple[float, dict[int, float]]:
    """Run nanoGPT's train.py on the same recipe; return wall seconds and {step: val loss}."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "train.py", *NANOGPT_ARGS], cwd=checkout, check=True, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    losses = {
        int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", out.stdout)
    }
    return wall, losses


def main() -> None:
    """Run both, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, help="path to a prepared nanoGPT checkout")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results: list[tuple[str, float, dict[int, float]]] = []
    for i in range(args.repeats):
        if args.nanogpt:
            results.append((f"nanoGPT #{i + 1}", *run_nanogpt(args.nanogpt)))
        with tempfile.TemporaryDirectory() as tmp:
            results.append((f"lmforge #{i + 1}", *run_lmforge(Path(tmp))))

    steps = sorted({s for _, _, losses in results for s in losses if s > 0})
    print(f"{'run':<12} {'wall s':>7} " + " ".join(f"{s:>6}" for s in steps))
    for name, wall, losses in results:
        print(f"{name:<12} {wall:7.1f} " + " ".join(f"{losses.get(s, float('nan')):6.3f}" for s in steps))
    if args.nanogpt:
        ours = [w for n, w, _ in results if n.startswith("lmforge")]
        theirs = [w for n, w, _ in results if n.startswith("nanoGPT")]
        print(f"wall-time ratio lmforge / nanoGPT: {sum(ours) / sum(theirs):.2f}")


if __name__ == "__main__":
    main()
