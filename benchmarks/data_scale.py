"""How lmforge's data pipeline scales with the corpus: preparation speed, warm start-up and memory.

    python benchmarks/data_scale.py [--sizes 1 10 100 300] [--tokenizers char bpe] [--no-code]

Corpora: Tiny Shakespeare repeated 1x, 10x, 100x, 300x (one file each, in a temporary folder),
``task=code`` (the Python sources of this interpreter), and as the reference for start-up the
default ``task=tinyshakespeare`` (the copy shipped with lmforge). For each corpus and tokenizer, in fresh
processes one after another:

1. ``lmforge-prepare`` into an empty cache: wall time, the token store's build time and rate
   (MB of text per second over both cores), peak RSS;
2. ``train.py`` for one step with the store warm: wall time from the command to the end of the
   step (validation and test off; the fastest of ``--warm-repeats``), peak RSS;

and, beside them, the bare ``tokenizers`` rate: ``encode_batch`` over the same 10x text, cut into
the same 64 KB chunks, with the same tokenizer, on the same cores. RAM per token is the growth of
the training run's peak RSS over the 1x run's, divided by the growth in tokens. Ends with one
``key=value`` line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "src" / "lmforge" / "data" / "builtin" / "tinyshakespeare.txt"
PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)
ONE_STEP = [
    "logger=none", "trainer.max_steps=1", "trainer.limit_val_batches=0", "test_after_fit=false",
    "task.module.num_samples=0",
]  # fmt: skip


def measured(args: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run a command; return (wall seconds, peak RSS in MB, its output)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peak = int(done.stdout.rsplit("peak_rss_kb", 1)[1]) / 1024
    return seconds, peak, done.stdout + done.stderr


def bare_rate(tokenizer_json: Path, text_file: Path) -> float:
    """MB/s of ``encode_batch`` (ids taken out, as the store takes them) on the text, in a fresh process."""
    code = f"""
import time, itertools
from tokenizers import Tokenizer
from lmforge.data.tokenizers import _chunks
tok = Tokenizer.from_file({str(tokenizer_json)!r})
text = open({str(text_file)!r}, encoding="utf-8").read()
chunks = list(_chunks(text))
t = time.perf_counter()
n = 0
for i in range(0, len(chunks), 16):
    for e in tok.encode_batch(chunks[i:i + 16], add_special_tokens=False):
        n += len(e.ids)
print(len(text) / 1e6 / (time.perf_counter() - t))
"""
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 300])
    parser.add_argument("--tokenizers", nargs="+", default=["char", "bpe"])
    parser.add_argument("--no-code", action="store_true", help="leave out the task=code corpus")
    parser.add_argument("--warm-repeats", type=int, default=3, help="warm starts per corpus (the fastest is kept)")
    args = parser.parse_args()

    text = SHAKESPEARE.read_text(encoding="utf-8")
    rows, keys = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpora = []
        for size in args.sizes:
            folder = tmp / f"shakespeare-x{size}"
            folder.mkdir()
            with open(folder / "input.txt", "w", encoding="utf-8") as f:
                for _ in range(size):
                    f.write(text)
            corpora.append((f"shakespeare x{size}", ["task=text", f"task.source.files={folder}"]))
        if not args.no_code:
            corpora.append(("code (this Python)", ["task=code"]))
        corpora.insert(0, ("task=tinyshakespeare", ["task=tinyshakespeare", "task.data.train_stride=null"]))
        for tok in args.tokenizers:
            cache = tmp / f"cache-{tok}"
            for name, overrides in corpora:
                common = [
                    *overrides,
                    f"tokenizer={tok}",
                    f"paths.cache_dir={cache}",
                    f"paths.output_root={tmp / 'out'}",
                ]
                prep_s, prep_rss, out = measured(["lmforge-prepare", *common], tmp)
                built = re.search(r"train split: ([\d,]+) tokens .* from ([\d,]+) characters in ([\d.]+) s", out)
                tokens, chars, build_s = int(built[1].replace(",", "")), int(built[2].replace(",", "")), float(built[3])
                warm = [
                    measured([sys.executable, str(REPO / "train.py"), *common, *ONE_STEP], tmp)
                    for _ in range(args.warm_repeats)
                ]
                warm_s, train_rss, out = min(warm)
                rows.append(
                    dict(corpus=name, tokenizer=tok, mb=chars / 1e6, tokens=tokens, prep_s=prep_s, build_s=build_s,
                         rate=chars / 1e6 / build_s, prep_rss=prep_rss, warm_s=warm_s, train_rss=train_rss,
                         run_dir=Path(re.search(r"run dir: (\S+)", out)[1]))
                )  # fmt: skip
                print(json.dumps(rows[-1], default=str), flush=True)
            x10 = next((r for r in rows if r["tokenizer"] == tok and r["corpus"] == "shakespeare x10"), None)
            if x10:  # the same text, the same tokenizer (the one the x10 run trained and saved)
                keys[f"bare_{tok}"] = bare_rate(
                    x10["run_dir"] / "tokenizer.json", tmp / "shakespeare-x10" / "input.txt"
                )

    print()
    print("| corpus | tokenizer | text MB | tokens | prepare s | store build s | MB/s | vs bare encode_batch | "
          "prepare peak RSS MB | warm command to first step s | train peak RSS MB | RAM bytes per added token |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["tokenizer"] == row["tokenizer"] and r["corpus"] == "shakespeare x1")
        grown = row["tokens"] - base["tokens"] if row["corpus"].startswith(("shakespeare", "code")) else 0
        per_token = f"{(row['train_rss'] - base['train_rss']) * 2**20 / grown:.3f}" if grown > 0 else "-"
        bare = keys.get(f"bare_{row['tokenizer']}")
        versus = f"{row['rate'] / bare:.2f}" if bare and row["corpus"] == "shakespeare x10" else ""
        print(
            f"| {row['corpus']} | {row['tokenizer']} | {row['mb']:,.1f} | {row['tokens']:,} | {row['prep_s']:.1f} | "
            f"{row['build_s']:.1f} | {row['rate']:.2f} | {versus} | {row['prep_rss']:,.0f} | {row['warm_s']:.1f} | "
            f"{row['train_rss']:,.0f} | {per_token} |"
        )
    summary = {f"{k}_mb_s": f"{v:.2f}" for k, v in keys.items()}
    for tok in args.tokenizers:
        reference, *mine = [r for r in rows if r["tokenizer"] == tok]
        summary[f"{tok}_train_rss_growth_mb"] = f"{max(r['train_rss'] for r in mine) - mine[0]['train_rss']:.0f}"
        summary[f"{tok}_prep_rss_growth_mb"] = f"{max(r['prep_rss'] for r in mine) - mine[0]['prep_rss']:.0f}"
        summary[f"{tok}_warm_start_extra_s"] = f"{max(r['warm_s'] for r in mine) - reference['warm_s']:.2f}"
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
