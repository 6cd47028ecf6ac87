"""Extractive QA on the local SQuAD split: bert-mini from scratch against bert-mini after masked-LM pretraining.

The data mirror holds only SQuAD v1.1's dev file, which task=squad splits by article (training
articles, 4 validation articles, 8 held-out test articles): these are NOT SQuAD dev scores. Both
recipes fine-tune with the same overrides (the fine-tuning stage of experiment=squad-pretrain-finetune);
the second first pretrains on the training articles' contexts and WikiText-2. Runs go one after the
other, timed from start to exit (the pretrained row's wall time covers both stages).

    python benchmarks/squad.py
    python benchmarks/squad.py --only bert-mini --seeds 1 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from recipe_runs import REPO, run_recipe

EXPERIMENT = "squad-pretrain-finetune"
FINETUNE = list(OmegaConf.load(REPO / "conf" / "experiment" / f"{EXPERIMENT}.yaml").stages.finetune)
RECIPES = {
    "bert-mini": [f"experiment={EXPERIMENT}", "stages=null", *FINETUNE],
    "bert-mini-pretrained": [f"experiment={EXPERIMENT}"],
}


def main() -> None:
    """Run the chosen recipes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(RECIPES), help="recipes to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1337])
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for every run (trainer.max_steps=20)")
    args = parser.parse_args()
    rows = []
    for name in args.only or list(RECIPES):
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                record, wall, stages = run_recipe([*RECIPES[name], f"seed={seed}", *args.overrides], Path(tmp))
            rows.append({"name": name, "seed": seed, "wall_s": wall, "stages": stages, **record})
            m = record["metrics"]
            print(f"done: {name} seed {seed}: {wall:.0f} s, test EM {m['test/em']:.2f} F1 {m['test/f1']:.2f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(f"{'recipe':<22}{'seed':>6}{'stages':>8}{'steps':>7}{'wall s':>8}{'val F1 (best)':>15}"
          f"{'test EM':>9}{'test F1':>9}")  # fmt: skip
    for r in rows:
        m = r["metrics"]
        print(f"{r['name']:<22}{r['seed']:>6}{r['stages']:>8}{r['steps']:>7}{r['wall_s']:>8.0f}"
              f"{m['best_val/f1']:>15.2f}{m['test/em']:>9.2f}{m['test/f1']:>9.2f}")  # fmt: skip
    print("Local split of SQuAD v1.1 dev (8 held-out test articles, 1,559 questions): not SQuAD dev scores.")


if __name__ == "__main__":
    main()
