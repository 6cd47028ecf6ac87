"""SST-2 with every fine-tuning method, from an lmforge-pretrained backbone, at the same budget.

Stage one pretrains a backbone here (bert-mini with masked language modelling, gpt2-tiny as a
causal LM, both on the SST-2 training sentences plus the mirror's other English text), or takes
a run dir given with --bert-base / --gpt-base. Stage two fine-tunes it on SST-2 once per
``finetune=`` method with the same steps, batch and schedule (each method at its own learning
rate), one run after the other. The table gives validation accuracy (best checkpoint), the
trainable share of the parameters, milliseconds per training step (forward, backward, optimizer) and
the run's peak memory (resident set on CPU).

    python benchmarks/peft.py                               # both backbones, every method
    python benchmarks/peft.py --backbones bert-mini --steps 300 --pretrain-steps 300
    python benchmarks/peft.py --bert-base outputs/runs/<date>/<mlm run> --methods lora ia3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from recipe_runs import run_recipe

PRETRAIN = {
    "bert-mini": ["model=bert-mini", "task=mlm", "task/source=sst2-pretrain", "task.data.block_size=62",
                  "task.data.batch_size=64", "optimizer.lr=1e-3", "scheduler=linear", "scheduler.warmup_steps=100",
                  "trainer.limit_val_batches=20"],
    "gpt2-tiny": ["model=gpt2-tiny", "tokenizer=word", "task=tinyshakespeare", "task/source=sst2-pretrain",
                  "task.data.block_size=64", "task.data.batch_size=32", "model.n_positions=128", "optimizer.lr=1e-3",
                  "trainer.limit_val_batches=20"],
}  # fmt: skip
# Fine-tuning: the same for every method but the learning rate (adapters want larger steps than full tuning).
FINETUNE = ["task=sst2", "task.module.pooling=mean", "task.data.batch_size=32", "scheduler=linear",
            "scheduler.warmup_steps=50", "trainer.limit_val_batches=1.0", "trainer.limit_test_batches=0"]  # fmt: skip
METHODS = {
    "full": ["finetune=full", "optimizer.lr=2e-4"],
    "linear-probe": ["finetune=freeze", "finetune.backbone=true", "optimizer.lr=2e-3"],
    "freeze-2": ["finetune=freeze", "finetune.layers=2", "optimizer.lr=2e-4"],
    "lora": ["finetune=lora", "finetune.modules=[attention,feedforward]", "optimizer.lr=1e-3"],
    "adalora": ["finetune=adalora", "finetune.modules=[attention,feedforward]", "optimizer.lr=1e-3"],
    "ia3": ["finetune=ia3", "optimizer.lr=3e-3"],
    "adapter": ["finetune=adapter", "optimizer.lr=1e-3"],
    "prefix": ["finetune=prefix", "optimizer.lr=3e-3"],
    "prompt": ["finetune=prompt", "optimizer.lr=3e-2"],
}


def main() -> None:
    """Pretrain (unless given), fine-tune with each method, print the table and a key=value line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="*", choices=sorted(PRETRAIN), default=sorted(PRETRAIN))
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps of every method")
    parser.add_argument("--bert-base", help="an MLM run dir of bert-mini to start from (skips its pretraining)")
    parser.add_argument("--gpt-base", help="a language-model run dir of gpt2-tiny to start from")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    given = {"bert-mini": args.bert_base, "gpt2-tiny": args.gpt_base}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            base = given[backbone]
            if not base:
                steps = [
                    f"trainer.max_steps={args.pretrain_steps}",
                    f"trainer.val_check_interval={args.pretrain_steps}",
                ]
                record, wall, _ = run_recipe([*PRETRAIN[backbone], *steps, f"seed={args.seed}"], Path(tmp) / backbone)
                base = record["run_dir"]
                print(f"pretrained {backbone}: {wall:.0f} s, {record['metrics']}", file=sys.stderr, flush=True)
            for method in args.methods:
                overrides = [f"model={backbone}", *FINETUNE, *METHODS[method], f"init_from={base}",
                             f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps // 2}",
                             f"seed={args.seed}"]  # fmt: skip
                record, wall, _ = run_recipe(overrides, Path(tmp) / f"{backbone}-{method}")
                rows.append((backbone, method, record, wall, record.get("step_ms") or float("nan")))
                print(f"done: {backbone} {method}: {wall:.0f} s, {record['metrics'].get('best_val/acc')}",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"{'backbone':<11}{'method':<14}{'val acc':>9}{'trainable':>12}{'share':>8}{'ms/step':>9}{'peak MB':>9}"
          f"{'wall s':>8}")  # fmt: skip
    for backbone, method, record, wall, ms in rows:
        share = 100 * record["trainable_parameters"] / record["parameters"]
        print(f"{backbone:<11}{method:<14}{record['metrics']['best_val/acc']:>9.4f}"
              f"{record['trainable_parameters']:>12,}{share:>7.2f}%{ms:>9.0f}{record['peak_memory_mb']:>9.0f}"
              f"{wall:>8.0f}")  # fmt: skip
    print(" ".join(f"{b}_{m}_acc={r['metrics']['best_val/acc']:.4f}" for b, m, r, _, _ in rows))


if __name__ == "__main__":
    main()
