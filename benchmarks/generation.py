"""Generation speed of lmforge against Hugging Face ``generate``: per strategy and batch size, with and without cache.

    pip install -e '.[bench]' && python benchmarks/generation.py [--size tiny|mini|small] [--batches 1 16]
        [--new-tokens 32] [--repeats 5] [--profile greedy:16]

Builds lmforge's T5 (v1) with random weights and a ``transformers.T5ForConditionalGeneration``
of the same configuration holding the same weights (our state dict loaded into it), both fp32
in eval mode on the CPU, on one thread. Random source batches (fixed seed, 20 tokens, the
rows of a batch right-padded to different lengths) are decoded with greedy search, sampling
(temperature 0.8, top-k 50) and beam search (4 beams), with no end-of-sequence token, so
every row of both libraries generates exactly ``--new-tokens`` tokens from decoder start id 0.
Ours runs with and without its cache, Hugging Face with its cache. One warm-up call, then
``--repeats`` calls of each implementation interleaved; the median is reported as generated
tokens per second (batch x new tokens / seconds). Outputs are compared token by token with
Hugging Face's (sampling too: both draw from the same seed, so they agree while the logits
do), and ours with cache against ours without; a greedy or beam row that differs from HF's
is explained with the log-probability gap at the first differing step and the log-probability our
model gives both outputs. A last row compares lmforge's GPT (decoder only, weights copied
into ``GPT2LMHeadModel``) greedy over 128 new tokens, with and without KV cache.

Prints one table and ends with a line of ``key=value`` pairs. ``--profile STRATEGY:BATCH``
then prints the top operators of ``torch.profiler`` for ours and Hugging Face on that cell.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lmforge.generation import generate  # noqa: E402
from lmforge.models.gpt import GPT  # noqa: E402
from lmforge.models.t5 import HF_ALIASES, T5  # noqa: E402

# name: T5 (layers per stack, heads, d_model, d_kv, d_ff, vocab) and GPT (layers, heads, width)
SIZES = {
    "tiny": ((2, 4, 128, 32, 512, 4096), (4, 4, 128)),
    "mini": ((4, 4, 256, 64, 1024, 8192), (6, 6, 384)),
    "small": ((6, 8, 512, 64, 2048, 32128), (12, 12, 768)),
}
SOURCE_LEN = 20
PROMPT_LEN = 16  # GPT row
GPT_NEW_TOKENS = 128
PAD = START = 0
# strategy: (lmforge keyword arguments, transformers keyword arguments)
STRATEGIES = {
    "greedy": (dict(temperature=0.0), dict(do_sample=False, num_beams=1)),
    "sample": (dict(temperature=0.8, top_k=50), dict(do_sample=True, temperature=0.8, top_k=50, top_p=1.0)),
    "beam4": (dict(num_beams=4), dict(do_sample=False, num_beams=4, length_penalty=1.0)),
}
DETERMINISTIC = ("greedy", "beam4")


def build_t5(size: str):
    """lmforge T5 with random weights and HF's T5ForConditionalGeneration holding the same weights."""
    from transformers import T5Config, T5ForConditionalGeneration

    layers, heads, d_model, d_kv, d_ff, vocab = SIZES[size][0]
    torch.manual_seed(0)
    ours = T5(vocab, n_layer=layers, n_head=heads, d_model=d_model, d_kv=d_kv, d_ff=d_ff, dropout=0.0).eval()
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                      num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                      feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=PAD,
                      decoder_start_token_id=START, eos_token_id=None)  # fmt: skip
    theirs = T5ForConditionalGeneration(config).eval()
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= set(HF_ALIASES), result
    for tied in (theirs.encoder.embed_tokens, theirs.decoder.embed_tokens, theirs.lm_head):
        assert torch.equal(tied.weight, ours.shared.weight)
    return ours, theirs


def build_gpt(size: str, vocab: int):
    """lmforge GPT with random weights and HF's GPT2LMHeadModel holding them (Conv1D weights transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, heads, width = SIZES[size][1]
    n_positions = PROMPT_LEN + GPT_NEW_TOKENS
    torch.manual_seed(0)
    ours = GPT(vocab, layers, heads, width, n_positions, dropout=0.0).eval()
    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                        layer_norm_epsilon=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=PAD)  # fmt: skip
    theirs = GPT2LMHeadModel(config).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: v.t() if k.endswith(conv1d) else v for k, v in ours.state_dict().items()}
    result = theirs.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(k.endswith("attn.bias") for k in result.missing_keys), result
    assert torch.equal(theirs.lm_head.weight, ours.lm_head.weight)
    return ours, theirs


def sources(batch: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 20) random source ids, rows after the first right-padded to 14-20 tokens, and their mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, SOURCE_LEN), generator=g)
    lengths = torch.randint(SOURCE_LEN - 6, SOURCE_LEN + 1, (batch,), generator=g)
    lengths[0] = SOURCE_LEN
    mask = (torch.arange(SOURCE_LEN)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def runners(ours, theirs, ids, mask, new_tokens: int, strategy: str) -> dict:
    """name -> zero-argument call returning (B, new_tokens) generated tokens."""
    from transformers import GenerationConfig

    our_args, hf_args = STRATEGIES[strategy]
    seq2seq = getattr(ours, "kind", "decoder") == "seq2seq"
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                              pad_token_id=PAD, use_cache=True, num_return_sequences=1, **hf_args)  # fmt: skip
    if seq2seq:
        config.decoder_start_token_id = START
    keep = 1 if seq2seq else ids.shape[1]  # HF returns the decoder start token (seq2seq) or the prompt

    def ours_call(use_cache: bool):
        def call():
            generator = torch.Generator().manual_seed(1234)
            out = generate(ours, ids, new_tokens, eos_token_id=None, generator=generator, use_cache=use_cache,
                           attention_mask=mask, decoder_start_token_id=START if seq2seq else None,
                           pad_token_id=PAD, **our_args)  # fmt: skip
            return out if seq2seq else out[:, ids.shape[1] :]

        return call

    def hf_call():
        torch.manual_seed(1234)
        with torch.no_grad():
            return theirs.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, keep:]

    return {"cache": ours_call(True), "no_cache": ours_call(False), "hf": hf_call}


def measure(calls: dict, repeats: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds per call of each runner (one warm-up, then ``repeats`` interleaved rounds), and its output."""
    outputs = {name: call() for name, call in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def log_probs(model, ids, mask, tokens: torch.Tensor) -> torch.Tensor:
    """(B, n) log-probabilities our model gives ``tokens``, teacher-forced (prompt ``ids`` for a decoder)."""
    with torch.no_grad():
        if getattr(model, "kind", "decoder") == "seq2seq":
            inputs = torch.cat([torch.full_like(tokens[:, :1], START), tokens[:, :-1]], dim=1)
            logits = model(ids, mask, inputs)
        else:
            full = torch.cat([ids, tokens], dim=1)
            full_mask = None if mask is None else torch.cat([mask, torch.ones_like(tokens)], dim=1)
            logits = model(full, attention_mask=full_mask)[:, ids.shape[1] - 1 : -1]
    return logits.float().log_softmax(-1)


def explain(model, ids, mask, ours: torch.Tensor, theirs: torch.Tensor) -> list[str]:
    """One line per row where the two outputs differ: first differing step, our log-prob gap there, totals."""
    lines = []
    for b in torch.nonzero((ours != theirs).any(1)).flatten().tolist():
        step = int(torch.nonzero(ours[b] != theirs[b])[0])
        pair = torch.stack([ours[b], theirs[b]])
        rows = slice(b, b + 1)
        lp = log_probs(model, ids[rows].expand(2, -1), None if mask is None else mask[rows].expand(2, -1), pair)
        at_step = lp[0, step]  # same prefix for both up to ``step``
        gap = float(at_step[ours[b, step]] - at_step[theirs[b, step]])
        totals = lp.gather(2, pair[:, :, None]).squeeze(2).sum(1)
        lines.append(f"row {b}: first differs at step {step} (ours {int(ours[b, step])}, HF {int(theirs[b, step])}), "
                     f"log-prob gap there {gap:+.2e}; sequence log-prob ours {float(totals[0]):.4f} "
                     f"HF {float(totals[1]):.4f}")  # fmt: skip
    return lines


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    """'yes' or 'k/B rows differ'."""
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    differ = int((a != b).any(1).sum())
    return "yes" if differ == 0 else f"{differ}/{a.shape[0]} differ"


def profile(ours, theirs, ids, mask, new_tokens: int, strategy: str) -> None:
    """Top operators by self CPU time for one call of ours (cache) and one of HF."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    calls = runners(ours, theirs, ids, mask, new_tokens, strategy)
    for name in ("cache", "hf"):
        calls[name]()  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            calls[name]()
            wall = time.perf_counter() - start
        ops = prof.key_averages()
        total_op = sum(e.self_cpu_time_total for e in ops) / 1e6
        print(f"\n--- profile {strategy} batch {ids.shape[0]}: {'lmforge' if name == 'cache' else 'transformers'}, "
              f"wall {wall * 1e3:.1f} ms (profiled), operators {total_op * 1e3:.1f} ms, "
              f"{sum(e.count for e in ops)} op calls")  # fmt: skip
        print(ops.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))


def main() -> None:
    """Measure every strategy and batch size, print the table and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="mini")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell after one warm-up (median)")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--no-gpt", action="store_true", help="skip the decoder-only row")
    parser.add_argument("--profile", metavar="STRATEGY:BATCH", help="then profile ours and HF on this cell")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")  # fmt: skip
    print(f"{time.strftime('%Y-%m-%d')}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"CPU {cpu}, {torch.get_num_threads()} thread, fp32")  # fmt: skip

    ours, theirs = build_t5(args.size)
    layers, heads, d_model, d_kv, d_ff, vocab = SIZES[args.size][0]
    ids, mask = sources(2, vocab)
    with torch.no_grad():
        target = torch.randint(1, vocab, (2, 8), generator=torch.Generator().manual_seed(2))
        diff = ours(ids, mask, target) - theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    print(f"T5 {args.size}: {layers}+{layers} layers, d_model {d_model}, {heads} heads x {d_kv}, d_ff {d_ff}, "
          f"vocab {vocab}; same weights in both, max |logit difference| {diff.abs().max():.1e}")  # fmt: skip
    print(f"sources: {SOURCE_LEN} tokens, right-padded to 14-20; {args.new_tokens} new tokens, no EOS; "
          f"median of {args.repeats} calls after a warm-up\n")  # fmt: skip

    header = (f"{'model':<9} {'strategy':<8} {'batch':>5} {'ours tok/s':>11} {'no cache':>9} {'HF tok/s':>9} "
              f"{'ours/HF':>8} {'cache x':>8}  {'= HF':<12} {'cache = no cache'}")  # fmt: skip
    print(header)
    print("-" * len(header))
    summary: dict[str, float] = {}
    notes: list[str] = []
    all_equal = sample_equal = True
    for strategy in args.strategies:
        for batch in args.batches:
            ids, mask = sources(batch, vocab)
            calls = runners(ours, theirs, ids, mask, args.new_tokens, strategy)
            seconds, outputs = measure(calls, args.repeats)
            rate = {name: batch * args.new_tokens / s for name, s in seconds.items()}
            ratio = rate["cache"] / rate["hf"]
            summary[f"{strategy}_b{batch}_ratio"] = ratio
            if strategy in DETERMINISTIC:
                same_hf = agreement(outputs["cache"], outputs["hf"])
                all_equal &= same_hf == "yes"
                if same_hf != "yes":
                    notes += [f"T5 {strategy} batch {batch}: " + line
                              for line in explain(ours, ids, mask, outputs["cache"], outputs["hf"])]  # fmt: skip
            else:  # same seed, same RNG stream (torch.manual_seed vs a Generator): equal draws if logits agree
                same_hf = agreement(outputs["cache"], outputs["hf"])
                sample_equal &= same_hf == "yes"
                same_hf += " (seed)"
            same_cache = agreement(outputs["cache"], outputs["no_cache"])
            print(f"{'T5 ' + args.size:<9} {strategy:<8} {batch:>5} {rate['cache']:>11,.1f} {rate['no_cache']:>9,.1f} "
                  f"{rate['hf']:>9,.1f} {ratio:>7.2f}x {rate['cache'] / rate['no_cache']:>7.2f}x  {same_hf:<12} "
                  f"{same_cache}")  # fmt: skip

    if not args.no_gpt:
        g_layers, g_heads, width = SIZES[args.size][1]
        gpt, hf_gpt = build_gpt(args.size, vocab)
        prompt = torch.randint(1, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
        calls = runners(gpt, hf_gpt, prompt, None, GPT_NEW_TOKENS, "greedy")
        seconds, outputs = measure(calls, max(1, args.repeats // 2))
        rate = {name: GPT_NEW_TOKENS / s for name, s in seconds.items()}
        same_hf = agreement(outputs["cache"], outputs["hf"])
        all_equal &= same_hf == "yes"
        if same_hf != "yes":
            notes += ["GPT greedy: " + line
                      for line in explain(gpt, prompt, None, outputs["cache"], outputs["hf"])]  # fmt: skip
        summary["gpt_greedy_ratio"] = rate["cache"] / rate["hf"]
        summary["cache_speedup"] = rate["cache"] / rate["no_cache"]
        print(
            f"{'GPT ' + str(g_layers) + 'x' + str(width):<9} {'greedy':<8} {1:>5} {rate['cache']:>11,.1f} "
            f"{rate['no_cache']:>9,.1f} {rate['hf']:>9,.1f} {summary['gpt_greedy_ratio']:>7.2f}x "
            f"{summary['cache_speedup']:>7.2f}x  {same_hf:<12} {agreement(outputs['cache'], outputs['no_cache'])}"
        )
        print(f"(GPT row: {PROMPT_LEN}-token prompt, {GPT_NEW_TOKENS} new tokens, vocab {vocab}, "
              f"weights copied into GPT2LMHeadModel)")  # fmt: skip
    print(
        "\ntok/s: generated tokens per second (batch x new tokens / median seconds); 'ours' uses the cache;"
        "\n'cache x': ours with cache / ours without; '= HF': tokens equal to transformers' (sampling: same seed)."
        "\ntokens_equal covers greedy and beam search; sampling can only match when both draw alike."
    )
    for note in notes:
        print("mismatch:", note)

    if args.profile:
        strategy, batch = args.profile.split(":")
        ids, mask = sources(int(batch), vocab)
        profile(ours, theirs, ids, mask, args.new_tokens, strategy)

    pairs = {k: f"{v:.2f}" for k, v in summary.items()}
    pairs["tokens_equal"] = str(all_equal).lower()
    if "sample" in args.strategies:
        pairs["sample_tokens_equal"] = str(sample_equal).lower()
    print("\ngeneration: " + " ".join(f"{k}={v}" for k, v in pairs.items()))


if __name__ == "__main__":
    main()
