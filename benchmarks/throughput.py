"""Training and generation speed of lmforge's GPT against Hugging Face's GPT-2, and pipeline overhead.

    pip install -e '.[bench]' && python benchmarks/throughput.py [--quick]

Prints three tables and ends with one line of ``key=value`` pairs:

1. Training step (forward + backward + fused AdamW) of lmforge ``GPT`` and
   ``transformers.GPT2LMHeadModel`` with the same configuration (random init), on the same
   batches, fp32 and bf16 autocast, at three sizes; repeats interleaved, medians reported.
   On a CPU without AVX-512 BF16, bf16 is only measured at the smallest size (it is 15-30x
   slower than fp32 there). On a GPU, gpt2 124M runs at context 1024, and a column gives the
   model FLOPs utilisation (``GPT.flops_per_token`` against the GPU's dense peak).
2. The full ``train.py`` pipeline (W&B offline, CSV, checkpoints, progress bar) against a bare
   PyTorch loop over the same model and DataLoader: per-step overhead in %, and the start-up
   time from the command to the first training step.
3. Greedy generation of 256 new tokens: lmforge without and with its KV cache, and
   ``transformers``' ``generate``.
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
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lmforge.callbacks import peak_flops  # noqa: E402
from lmforge.generation import generate  # noqa: E402
from lmforge.models.gpt import GPT  # noqa: E402

# name: (n_layer, n_head, n_embd, vocab, context, batch)
SIZES = {
    "baby 4x128": (4, 4, 128, 65, 64, 12),
    "gpt2-mini 6x384": (6, 6, 384, 65, 256, 4),
    "gpt2 124M": (12, 12, 768, 50257, 128, 2),
}
# On a GPU, gpt2 124M at its full context (the size the MFU target is set for).
GPU_SIZES = {**SIZES, "gpt2 124M": (12, 12, 768, 50257, 1024, 8)}


def hf_gpt2(n_layer, n_head, n_embd, vocab, n_positions):
    """GPT2LMHeadModel of the same shape, dropout off, SDPA attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1)  # fmt: skip
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def logits_of(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def full_logits_loss(model, x, y) -> torch.Tensor:
    """Next-token cross-entropy over the whole batch's logits, in fp32."""
    return F.cross_entropy(logits_of(model, x).float().flatten(0, 1), y.flatten())


def timed_step(model, opt, x, y, precision: str, device: torch.device, loss_of=full_logits_loss) -> float:
    """Seconds of one training step: forward and loss (under bf16 autocast if asked), backward, optimizer."""
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = loss_of(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_times(model, batches, precision: str, device: torch.device) -> list[float]:
    """Seconds per optimizer step over the given batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return [timed_step(model, opt, x, y, precision, device) for x, y in batches]


def table_training(device, repeats, steps, quick) -> tuple[dict[str, float], dict[str, float]]:
    """Table 1; returns the speed-ups (HF step time / lmforge step time) by precision, and lmforge's model
    FLOPs utilisation of gpt2 124M by precision where the device's peak is known (GPUs)."""
    cpu_bf16 = device.type == "cuda" or "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    print(
        f"\n1. Training step, lmforge GPT vs transformers GPT2LMHeadModel ({device}, median of {repeats} x {steps} steps)"
    )
    sizes = GPU_SIZES if device.type == "cuda" else SIZES
    peaks = {p: peak_flops(device, "bf16-mixed" if p == "bf16" else "32-true") for p in ("fp32", "bf16")}
    mfu_column = f" {'MFU':>6}" if any(peaks.values()) else ""
    print(
        f"{'size':<18} {'precision':<9} {'lmforge ms':>11} {'HF ms':>9} {'speed-up':>9} {'lmforge tok/s':>14}{mfu_column}"
    )
    speedups: dict[str, list[float]] = {"fp32": [], "bf16": []}
    mfu: dict[str, float] = {}
    for i, (name, (layers, heads, width, vocab, ctx, batch)) in enumerate(sizes.items()):
        if quick and i > 0:
            break
        torch.manual_seed(0)
        ours = GPT(vocab, layers, heads, width, ctx, bias=True).to(device)
        theirs = hf_gpt2(layers, heads, width, vocab, ctx).to(device)
        data = torch.randint(0, vocab, (steps + 2, batch, ctx + 1), device=device)
        batches = [(d[:, :-1], d[:, 1:]) for d in data]
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not cpu_bf16 and i > 0:
                continue
            ours_t, theirs_t = [], []
            for _ in range(repeats):  # interleaved, first two steps of each block are warm-up
                ours_t += step_times(ours, batches, precision, device)[2:]
                theirs_t += step_times(theirs, batches, precision, device)[2:]
            a, b = statistics.median(ours_t), statistics.median(theirs_t)
            speedups[precision].append(b / a)
            line = f"{name:<18} {precision:<9} {a * 1e3:11.1f} {b * 1e3:9.1f} {b / a:8.2f}x {batch * ctx / a:14,.0f}"
            if peaks[precision]:
                utilisation = ours.flops_per_token(ctx) * batch * ctx / a / peaks[precision]
                line += f" {utilisation:6.1%}"
                if name == "gpt2 124M":
                    mfu[precision] = utilisation
            print(line)
    return {k: statistics.median(v) for k, v in speedups.items() if v}, mfu


class StepTimer:
    """Lightning callback factory: wall time from the start of step ``first`` to the end of the last step."""

    def __new__(cls, first: int = 20):
        import pytorch_lightning as pl

        class _Timer(pl.Callback):
            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step == first:
                    self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, *args):
                self.end, self.steps = time.perf_counter(), trainer.global_step - first

            def on_train_end(self, trainer, *args):
                Path(os.environ["LMFORGE_BENCH_OUT"]).write_text(
                    json.dumps({"per_step": (self.end - self.start) / self.steps})
                )

        return _Timer()


def bare_loop(dm, vocab: int, steps: int) -> float:
    """Seconds per step of a plain PyTorch loop: same model, data, optimizer and clipping as the recipe."""
    torch.manual_seed(0)
    model = GPT(vocab, 4, 4, 128, 64, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    start = None
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i == 20:
            start = time.perf_counter()
        if i == steps:
            break
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()  # the pipeline reads the loss too
    return (time.perf_counter() - start) / (steps - 20)


def table_pipeline(steps: int) -> tuple[float, float | None]:
    """Table 2; returns (overhead %, start-up seconds)."""
    from lmforge.data.language_modeling import LanguageModelingDataModule
    from lmforge.data.sources import TextCorpus
    from lmforge.data.tokenizers import char_tokenizer

    texts = TextCorpus(name="tinyshakespeare", builtin="tinyshakespeare").load(None)
    tok = char_tokenizer(texts["train"])
    dm = LanguageModelingDataModule(texts, tok, block_size=64, batch_size=12, train_stride=1, seed=1)
    bare = [bare_loop(dm, tok.get_vocab_size(), steps)]  # before and after the pipeline: the machine drifts
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timer.json"
        cmd = [sys.executable, str(REPO / "train.py"), "experiment=shakespeare-char", f"trainer.max_steps={steps}",
               "trainer.limit_val_batches=0", "task.module.num_samples=0", f"paths.output_root={tmp}",
               "+callbacks.timer._target_=throughput.StepTimer"]  # fmt: skip
        env = {**os.environ, "LMFORGE_BENCH_OUT": str(out), "PYTHONPATH": str(Path(__file__).parent)}
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        pipeline = json.loads(out.read_text())["per_step"]
        record = json.loads((Path(tmp) / "results.jsonl").read_text().splitlines()[-1])
    bare.append(bare_loop(dm, tok.get_vocab_size(), steps))
    bare_mean = statistics.mean(bare)
    overhead = (pipeline / bare_mean - 1) * 100
    print(f"\n2. Pipeline overhead, experiment=shakespeare-char, {steps} steps, no validation (CPU)")
    print(f"{'':<34} {'ms/step':>8}")
    print(f"{'bare PyTorch loop (before, after)':<34} {bare[0] * 1e3:8.2f} {bare[1] * 1e3:8.2f}")
    print(f"{'train.py (W&B offline, CSV, ckpt)':<34} {pipeline * 1e3:8.2f}")
    print(f"overhead: {overhead:+.1f}%   start-up, command to first training step: {record['startup_s']} s")
    return overhead, record["startup_s"]


def table_generation(device, new_tokens: int) -> float:
    """Table 3; returns the KV-cache speed-up."""
    layers, heads, width, vocab = 6, 6, 384, 50257
    torch.manual_seed(0)
    ours = GPT(vocab, layers, heads, width, 1024).to(device).eval()
    theirs = hf_gpt2(layers, heads, width, vocab, 1024).to(device).eval()
    prompt = torch.randint(0, vocab, (1, 16), device=device)

    def timed(fn):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        return new_tokens / (time.perf_counter() - start)

    plain = timed(lambda: generate(ours, prompt, new_tokens, temperature=0, use_cache=False))
    cached = timed(lambda: generate(ours, prompt, new_tokens, temperature=0, use_cache=True))
    hf = timed(lambda: theirs.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                        pad_token_id=0))  # fmt: skip
    print(f"\n3. Greedy generation, 6x384 GPT, 16-token prompt, {new_tokens} new tokens ({device})")
    print(f"{'':<28} {'tokens/s':>9}")
    for name, rate in (("lmforge, no cache", plain), ("lmforge, KV cache", cached), ("transformers generate", hf)):
        print(f"{name:<28} {rate:9.1f}")
    return cached / plain


def main() -> None:
    """Run the three tables and print the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest size only, fewer steps")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    print(f"{time.strftime('%Y-%m-%d')}  torch {torch.__version__}  CPU {cpu} x{os.cpu_count()}  GPU {gpu}")
    speedups, mfu = table_training(device, args.repeats, 6 if args.quick else 8, args.quick)
    overhead, startup = table_pipeline(120 if args.quick else 320)
    kv = table_generation(device, 64 if args.quick else 256)
    pairs = {
        "speedup_vs_hf_fp32": f"{speedups.get('fp32', float('nan')):.2f}",
        "speedup_vs_hf_bf16": f"{speedups.get('bf16', float('nan')):.2f}",
        "pipeline_overhead_pct": f"{overhead:.1f}",
        "kv_cache_speedup": f"{kv:.2f}",
        "startup_s": startup,
        **{f"mfu_gpt2_124m_{precision}": f"{value:.3f}" for precision, value in mfu.items()},
    }
    print("\n" + " ".join(f"{k}={v}" for k, v in pairs.items()))


if __name__ == "__main__":
    main()
