"""lmforge-serve under load: 1, 4 and 16 concurrent clients against the same requests served one at a time.

    python benchmarks/serve.py                       # trains a short gpt2-mini run on Tiny Shakespeare first
    python benchmarks/serve.py --run <run dir> --requests 64 --max-tokens 64

Everything runs on localhost: a server in a subprocess (max_batch_size = the most clients), and
clients in threads that send streamed completions back to back. Each request is timed to its first
text (TTFT) and to its end; generated tokens come from the usage the server reports. Half of the
requests are greedy and half sampled with a seed, so that "outputs unchanged" compares real text.
The last rows are lmforge-generate for one prompt: in-process ``generate()`` (the same model, no
HTTP) and the command a user would run per prompt, start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def train_run(out: Path, steps: int) -> Path:
    """A short gpt2-mini run (6 x 384, the recipe's sizes restored) on Tiny Shakespeare characters."""
    args = ["experiment=shakespeare-char", "model=gpt2-mini", "model.n_layer=6", "model.n_head=6", "model.n_embd=384",
            "model.n_positions=256", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            "trainer.limit_val_batches=2", "logger=none", f"paths.output_root={out}"]  # fmt: skip
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training the benchmark's run failed:\n{done.stderr[-2000:]}")
    return next((out / "runs").glob("*/*"))


def prompts(n: int) -> list[str]:
    """``n`` opening lines of Tiny Shakespeare of different lengths."""
    text = (Path(os.environ["LMFORGE_DATA"]) / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if len(line) > 8]
    return [lines[(97 * i) % len(lines)][: 12 + (i * 7) % 60] for i in range(n)]


def one_request(url: str, model: str, prompt: str, i: int, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "seed": i,
            "temperature": 0.0 if i % 2 else 0.8, "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, text, tokens = time.perf_counter(), None, "", 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
                text += chunk["choices"][0]["text"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"text": text, "tokens": tokens, "latency": end - start, "ttft": (first or end) - start}


def load(url: str, model: str, texts: list[str], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """Every request, sent by ``clients`` threads back to back; the results in request order and the wall time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, model, texts[i], i, max_tokens), range(len(texts))))
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def row(name: str, results: list[dict], wall: float, base: dict | None, same: str) -> str:
    tokens = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    speed = tokens / wall
    ratio = f"{speed / base['speed']:.2f}x" if base else "1.00x"
    return (f"| {name} | {len(results)} | {len(results) / wall:.2f} | {speed:,.0f} | {ratio} | {percentile(lat, 50):.2f} | "
            f"{percentile(lat, 95):.2f} | {percentile(ttft, 50):.3f} | {percentile(ttft, 95):.3f} | {same} |")  # fmt: skip


def generate_rows(run: Path, prompt: str, max_tokens: int) -> list[str]:
    """lmforge-generate's own speed for one prompt: generate() in-process, and the whole command."""
    import torch

    from lmforge.compose.weights import load_run
    from lmforge.generation import generate

    saved = load_run(run)
    ids = torch.tensor([saved.tokenizer.encode(prompt, add_special_tokens=False).ids])
    generate(saved.backbone, ids, 8, temperature=0.0)  # warm-up
    start = time.perf_counter()
    out = generate(saved.backbone, ids, max_tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    made = out.shape[1] - ids.shape[1]
    start = time.perf_counter()
    subprocess.run([str(BIN / "lmforge-generate"), f"run={run}", f"prompt={prompt}", f"max_new_tokens={max_tokens}",
                    "greedy=true"], check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    command = time.perf_counter() - start
    return [f"| generate() in-process, 1 prompt | 1 | {1 / seconds:.2f} | {made / seconds:,.0f} | | {seconds:.2f} | | | | |",
            f"| lmforge-generate command, 1 prompt | 1 | {1 / command:.2f} | {max_tokens / command:,.0f} | | {command:.2f}"
            f" | | | | |"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a language-model run dir (default: train a short gpt2-mini run)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--train-steps", type=int, default=60)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmforge-serve-bench-"))
    run = Path(args.run) if args.run else train_run(work, args.train_steps)
    port = 8000 + os.getpid() % 1000
    server = subprocess.Popen([str(BIN / "lmforge-serve"), f"run={run}", f"port={port}",
                               f"max_batch_size={max(args.clients)}", "log_level=warning"],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        texts = prompts(args.requests)
        load(url, model, texts[:4], 4, 8)  # warm-up
        sequential, wall = load(url, model, texts, 1, args.max_tokens)
        base = {"speed": sum(r["tokens"] for r in sequential) / wall}
        lines = [row("sequential (1 client)", sequential, wall, None, "reference")]
        for clients in args.clients:
            results, wall = load(url, model, texts, clients, args.max_tokens)
            same = sum(r["text"] == s["text"] for r, s in zip(results, sequential))
            lines.append(row(f"{clients} concurrent clients", results, wall, base, f"{same}/{len(results)}"))
    finally:
        server.terminate()
        server.wait(60)
    lines += generate_rows(run, texts[0], args.max_tokens)
    print(f"lmforge-serve, {run.name}: {args.requests} requests of {args.max_tokens} tokens, streamed\n")
    print("| clients | requests | requests/s | generated tokens/s | vs sequential | p50 latency s | p95 latency s | "
          "p50 TTFT s | p95 TTFT s | outputs as sequential |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
