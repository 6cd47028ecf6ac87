"""SST-2 validation accuracy and wall time for every backbone, trained from scratch on this machine.

Each recipe is a `python train.py ...` command, run one after the other (never two at once:
they would fight over the cores), timed from start to exit. The script prints a table of
steps, wall time, validation accuracy of the best checkpoint (chosen on validation accuracy,
as every SST-2 run does) and of the last step, and the unofficial test accuracy.

    python benchmarks/sst2.py                       # every recipe, seed 1337
    python benchmarks/sst2.py --only lstm gru --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from recipe_runs import logged, run_recipe

# name -> overrides of `python train.py`. Stage runs (pretrain-finetune) report the fine-tuning stage
# with the wall time of both stages.
# The recipe of experiment=sst2-lstm (batch 64, linear decay, validation on the whole split) without its LSTM keys.
TRANSFORMER = [
    "task=sst2",
    "scheduler=linear",
    "scheduler.warmup_steps=100",
    "optimizer.betas=[0.9,0.999]",
    "optimizer.weight_decay=0.01",
    "task.data.batch_size=64",
    "trainer.val_check_interval=250",
    "trainer.limit_val_batches=1.0",
    "trainer.max_steps=1500",
]
RECIPES = {
    "lstm": ["experiment=sst2-lstm"],
    "gru": ["experiment=sst2-gru"],
    "gpt2-tiny": [*TRANSFORMER, "model=gpt2-tiny", "tokenizer=word", "model.dropout=0.1", "optimizer.lr=1e-3"],
    "bert-mini": [*TRANSFORMER, "model=bert-mini", "task.module.pooling=mean", "optimizer.lr=5e-4"],
    "bert-mini-pretrained": ["experiment=sst2-pretrain-finetune"],
}  # fmt: skip


def run(name: str, seed: int, output_root: Path) -> dict:
    """Train one recipe; return its (last) results record with the whole command's wall time."""
    record, wall, stages = run_recipe([*RECIPES[name], f"seed={seed}"], output_root)
    last = logged(record["run_dir"], "val/acc")[-1][1]
    return {"name": name, "seed": seed, "wall_s": wall, "stages": stages, "last_val_acc": last, **record}


def main() -> None:
    """Run the chosen recipes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(RECIPES), help="recipes to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1337])
    args = parser.parse_args()
    rows = []
    for name in args.only or list(RECIPES):
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(run(name, seed, Path(tmp)))
            r = rows[-1]
            print(f"done: {name} seed {seed}: {r['wall_s']:.0f} s, best val acc {r['metrics']['best_val/acc']:.4f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(f"{'recipe':<22}{'seed':>6}{'steps':>7}{'wall s':>8}{'val acc (best)':>16}{'val acc (last)':>16}"
          f"{'test acc*':>11}")  # fmt: skip
    for r in rows:
        m = r["metrics"]
        print(f"{r['name']:<22}{r['seed']:>6}{r['steps']:>7}{r['wall_s']:>8.0f}{m['best_val/acc']:>16.4f}"
              f"{r['last_val_acc']:>16.4f}{m.get('test/acc', float('nan')):>11.4f}")  # fmt: skip
    print("* test_labeled.tsv: labels recovered by third parties, not the official GLUE test; best checkpoint.")


if __name__ == "__main__":
    main()
