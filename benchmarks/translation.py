"""Multi30k en->de test2016 sacreBLEU (and SAMSum ROUGE) with wall time, for each seq2seq recipe trained from scratch here.

Each recipe is a `python train.py ...` command, run one after the other (two at once would
fight over the cores), timed from start to exit. The table gives steps, wall time, the best
validation BLEU (greedy decoding, the checkpoint choice), and the test scores of that
checkpoint with beam search (task.module.num_beams).

    python benchmarks/translation.py                          # every Multi30k recipe
    python benchmarks/translation.py --only transformer t5-tiny
    python benchmarks/translation.py --only samsum-transformer
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from recipe_runs import logged, run_recipe

# The vocabulary and schedule of experiment=multi30k-transformer, for the other backbones.
MULTI30K = ["task=multi30k", "tokenizer.vocab_size=5000", "optimizer.betas=[0.9,0.98]", "optimizer.weight_decay=0.01",
            "scheduler.warmup_steps=400", "scheduler.min_lr_ratio=0.02", "trainer.val_check_interval=400",
            "trainer.limit_val_batches=1.0"]  # fmt: skip
RECIPES = {
    "transformer": ["experiment=multi30k-transformer"],
    "t5-tiny": [*MULTI30K, "model=t5-tiny", "optimizer.lr=1e-3", "trainer.max_steps=2400"],
    "lstm-attention": [*MULTI30K, "model=lstm-attention", "optimizer.lr=2e-3", "trainer.max_steps=600",
                       "trainer.val_check_interval=300"],
    "gpt2-tiny-prefix-lm": [*MULTI30K, "model=gpt2-tiny", "tokenizer=bpe", "model.dropout=0.1", "optimizer.lr=1e-3",
                            "trainer.max_steps=2000"],
    "samsum-transformer": ["model=transformer", "model.norm_first=true", "task=samsum", "optimizer.lr=7e-4",
                           "optimizer.betas=[0.9,0.98]", "scheduler.warmup_steps=100", "trainer.max_steps=600",
                           "trainer.val_check_interval=300", "trainer.limit_val_batches=1.0"],
}  # fmt: skip


def run(name: str, seed: int, output_root: Path) -> dict:
    """Train one recipe; return its results record with the whole command's wall time."""
    record, wall, _ = run_recipe([*RECIPES[name], f"seed={seed}"], output_root)
    key = "val/rougeL" if name.startswith("samsum") else "val/bleu"
    curve = logged(record["run_dir"], key)
    return {"name": name, "seed": seed, "wall_s": wall, "curve": curve, **record}


def main() -> None:
    """Run the chosen recipes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", nargs="*", choices=sorted(RECIPES), help="recipes to run (default: the Multi30k ones)"
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[1337])
    args = parser.parse_args()
    rows = []
    for name in args.only or [n for n in RECIPES if not n.startswith("samsum")]:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(run(name, seed, Path(tmp)))
            print(f"done: {name} seed {seed}: {rows[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"{'recipe':<22}{'seed':>6}{'steps':>7}{'wall min':>10}{'best val':>10}{'test':>8}{'test 2':>8}  scores")
    for r in rows:
        m = r["metrics"]
        summary = r["name"].startswith("samsum")
        best = max(v for _, v in r["curve"])
        test = (m["test/rouge1"], m["test/rouge2"]) if summary else (m["test/bleu"], m["test/chrf"])
        what = "val ROUGE-L; test ROUGE-1, ROUGE-2" if summary else "val BLEU (greedy); test BLEU, chrF (beams)"
        print(f"{r['name']:<22}{r['seed']:>6}{r['curve'][-1][0]:>7}{r['wall_s'] / 60:>10.1f}{best:>10.2f}"
              f"{test[0]:>8.2f}{test[1]:>8.2f}  {what}")  # fmt: skip
        print(f"{'':<22}validation curve: " + ", ".join(f"{step}: {value:.1f}" for step, value in r["curve"]))


if __name__ == "__main__":
    main()
