"""Beam-search settings of a trained seq2seq run, scored on one split: choose them on validation, then test.

    python benchmarks/seq2seq_decoding.py <run dir> validation 1:0 2:0 1:15 1:20   # length_penalty:min_new_tokens
    python benchmarks/seq2seq_decoding.py <run dir> test 1:15

Reads the split through the run's own data module (its source length, prefix and batches) and scores
every pair with the task's own text metrics, so that the run's own settings reproduce its test scores.
Prints one line per setting: the scores, the mean length of the outputs in words, the seconds it took.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lmforge.compose.parts import build_data, make_task
from lmforge.compose.weights import load_run
from lmforge.rundirs.checkpoints import load_task_state
from lmforge.tasks.text_metrics import text_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("split", choices=["validation", "test"])
    parser.add_argument("settings", nargs="+", help="length_penalty:min_new_tokens, e.g. 1:15")
    parser.add_argument("--beams", type=int, default=4)
    args = parser.parse_args()

    run = load_run(args.run_dir)
    if os.environ.get("LMFORGE_DATA"):
        run.cfg.paths.data_dir = os.environ["LMFORGE_DATA"]
    _, data = build_data(run.cfg, run.tokenizer, required=(args.split,))
    task = make_task(run.cfg, run.backbone, run.tokenizer, run.saved.get("data_arguments") or {})
    load_task_state(task, run.saved)
    task.eval()
    data.setup("validate" if args.split == "validation" else "test")
    batches = list(data.val_dataloader() if args.split == "validation" else data.test_dataloader())
    for setting in args.settings:
        penalty, shortest = setting.split(":")
        start = time.perf_counter()
        outputs, references = [], []
        for batch in batches:
            ids = task.generate_ids(batch["input_ids"], batch["attention_mask"], num_beams=args.beams,
                                    length_penalty=float(penalty), min_new_tokens=int(shortest))  # fmt: skip
            outputs += task.decode(ids)
            references += batch["target_text"]
        scores = text_scores(outputs, references, task.metrics)
        words = sum(len(text.split()) for text in outputs) / len(outputs)
        shown = " ".join(f"{name} {value:.2f}" for name, value in scores.items())
        print(f"{args.split} ({len(outputs)} pairs) length_penalty {penalty} min_new_tokens {shortest}: {shown}; "
              f"{words:.1f} words ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    with torch.no_grad():
        main()
