"""The GPU path in one command: training speed and MFU, torch.compile, memory, the SDPA kernel, fp16,
DDP and FSDP with a resume, a GPU run against a CPU run, and generation speed.

    python benchmarks/gpu_check.py                      # one GPU: at most 8 minutes (the timeouts' sum)
    python benchmarks/gpu_check.py --cpu-smoke          # the same code paths at tiny sizes on the CPU, about 2 minutes
    python benchmarks/gpu_check.py --only train hf_gpt2 --timeout 300

Checks, each in its own subprocess (this script with ``--child NAME``) under a timeout; training goes
through ``train.py`` and is read back from the run's own record (``metrics.json``, ``csv/metrics.csv``):

- ``train``: gpt2 124M from scratch (``model=gpt2 model.pretrained=null``, dropout off) on Tiny Shakespeare
  at context 1024, ``trainer=gpu`` (bf16-mixed): tokens/s and MFU of the steady state (the run's logged
  windows of 10 steps, the first left out), peak CUDA memory, start-up.
- ``hf_gpt2``: ``transformers``' ``GPT2LMHeadModel`` of the same shape, batch and precision, the same number
  of steps of fused AdamW under ``torch.autocast`` (``benchmarks/throughput.py``'s loop); the table adds
  lmforge's speed-up over it.
- ``compile``: ``train`` with ``compile=true``; ``compile_s`` is what the first steps took beyond the steady
  rate (compilation, mostly).
- ``memory``: peak CUDA memory with ``activation_checkpointing=true``, and with the chunked loss
  (``task.module.loss_chunk_size=256``) on top, against ``train``'s.
- ``sdpa``: which ``scaled_dot_product_attention`` kernel the GPT's attention runs (forward and backward,
  bf16), without a mask and with a padding mask, read off ``torch.profiler``'s operator names.
- ``fp16``: ``trainer.precision=16-mixed`` (gradient scaling) for 50 steps; a non-finite loss stops the run.
- ``ddp``, ``fsdp``: ``trainer=ddp`` and ``trainer=fsdp`` on one device (world size 1); the FSDP run is then
  resumed (``resume=<run dir>``) to twice its steps from its checkpoint.
- ``multi30k``: ``experiment=multi30k-transformer trainer=gpu`` and the same on the CPU, side by side, 50
  steps each: their validation losses at step 50 must agree within 2%.
- ``generation``: greedy decoding with the KV cache of a gpt2-size GPT (random weights) against
  ``transformers``' ``generate`` holding the same weights, batch 1 and 16 (``benchmarks/generation.py``).

``--cpu-smoke`` runs the same at tiny sizes on the CPU (gpt2-tiny, context 64, fp32, ``trainer=cpu``, DDP over
gloo, which also resumes since Lightning's FSDP needs a GPU); CUDA-only checks are ``skipped (no CUDA)``.

Prints a Markdown table (check, status, numbers, seconds), the last lines of each failed check's stderr,
the targets on a GPU (MFU >= 45%, >= 1.2x GPT2LMHeadModel's tokens/s, flash attention without a mask),
and one line ``gpu_check passed=... failed=... skipped=... <numbers>``. Exits 1 when a check failed.
Everything runs offline: the GPT-2 tokenizer comes from ``$LMFORGE_DATA/tokenizers/gpt2`` (else
``tokenizer=char``), Multi30k from ``$LMFORGE_DATA/multi30k`` (else that check is skipped).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
MULTI30K_TOLERANCE = 0.02  # relative difference of the GPU and CPU validation losses
TARGET_MFU, TARGET_SPEEDUP = 0.45, 1.2
TAIL_LINES = 12


@dataclass(frozen=True)
class Mode:
    """The sizes the checks run at: one GPU, or tiny ones on the CPU (``--cpu-smoke``)."""

    name: str
    cuda: bool
    model: str  # conf/model/<model>.yaml
    context: int
    batch: int
    steps: int  # the speed runs (train, hf_gpt2, compile)
    short_steps: int  # memory, ddp and fsdp runs (a resume doubles them)
    fp16_steps: int
    multi30k_steps: int
    multi30k_val_batches: float  # trainer.limit_val_batches (1.0: the whole split)
    generation_size: str  # a size of benchmarks/generation.py
    generation_vocab: int
    new_tokens: int  # generated per prompt
    repeats: int  # timed generation calls per cell
    window: int  # steps per logged tokens/s and MFU window (callbacks.throughput.log_every_n_steps)

    @property
    def device(self) -> str:
        """torch's name of the device."""
        return "cuda" if self.cuda else "cpu"

    @property
    def precision(self) -> str:
        """Lightning precision of the runs: bf16 on a GPU, fp32 on a CPU (bf16 is slow without AVX-512 BF16)."""
        return "bf16-mixed" if self.cuda else "32-true"


GPU = Mode("gpu", True, "gpt2", 1024, 16, 40, 5, 50, 50, 1.0, "small", 50257, 128, 3, 10)
CPU_SMOKE = Mode("cpu-smoke", False, "gpt2-tiny", 64, 4, 6, 3, 0, 5, 1, "tiny", 4096, 16, 1, 2)


class CheckFailed(Exception):
    """What a check found broken; its message ends the check's stderr, which the report quotes."""


class Skipped(Exception):
    """A check that cannot run here (its message says why)."""


# ---------------------------------------------------------------------------------------------- helpers


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last non-empty lines of a process's output."""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def gpt2_tokenizer_files() -> bool:
    """Whether the GPT-2 vocabulary is in the local data mirror (no download is possible)."""
    data = os.environ.get("LMFORGE_DATA")
    return bool(data) and (Path(data) / "tokenizers" / "gpt2" / "vocab.json").is_file()


def tokenizer_name() -> str:
    """GPT-2's tokenizer when its files are here, else characters."""
    return "gpt2" if gpt2_tokenizer_files() else "char"


def model_shape(model: str) -> tuple[int, int, int]:
    """(n_layer, n_head, n_embd) of ``conf/model/<model>.yaml``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")
    return cfg.n_layer, cfg.n_head, cfg.n_embd


def lm_overrides(
    mode: Mode, steps: int, trainer: str | None = None, precision: str | None = None, log_every: int | None = None
) -> list[str]:
    """``train.py`` overrides of a language-modelling run of the mode's model: from scratch, dropout off,
    no validation, test or samples, CSV only, tokens/s logged every ``mode.window`` steps."""
    return [
        f"model={mode.model}", "model.pretrained=null", "model.dropout=0.0", f"tokenizer={tokenizer_name()}",
        "task=tinyshakespeare", f"task.data.block_size={mode.context}", f"task.data.batch_size={mode.batch}",
        "task.module.num_samples=0", f"trainer={trainer or ('gpu' if mode.cuda else 'cpu')}",
        f"trainer.precision={precision or mode.precision}", f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0", f"trainer.log_every_n_steps={log_every or mode.window}",
        f"callbacks.throughput.log_every_n_steps={mode.window}", "test_after_fit=false", "logger=none",
    ]  # fmt: skip


def start_train(out: Path, overrides: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``train.py`` writing its run dir and results file under ``out``."""
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"paths.output_root={out}"]
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def finish_train(proc: subprocess.Popen, out: Path) -> dict:
    """Wait for a ``train.py`` started by :func:`start_train`; its record (``metrics.json``) or CheckFailed."""
    stdout, stderr = proc.communicate()
    if proc.returncode:
        overrides = " ".join(a for a in proc.args[2:] if not a.startswith("paths."))
        raise CheckFailed(f"train.py {overrides} exited with {proc.returncode}:\n{tail(stderr or stdout)}")
    run_dir = json.loads((out / "results.jsonl").read_text().splitlines()[-1])["run_dir"]
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def train(out: Path, overrides: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``train.py`` to the end; its record."""
    return finish_train(start_train(out, overrides, env), out)


def logged(record: dict, key: str) -> list[tuple[int, float]]:
    """(step, value) of every value of ``key`` in the run's ``csv/metrics.csv``."""
    path = Path(record["run_dir"]) / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]


def steady(record: dict, key: str) -> float | None:
    """Median of the run's logged windows of ``key`` after the first (warm-up, compilation); None if none."""
    values = [v for _, v in logged(record, key)]
    return statistics.median(values[1:] if len(values) > 1 else values) if values else None


def speed(record: dict, mode: Mode, suffix: str = "") -> dict[str, float]:
    """Steady tokens/s and MFU, step time, peak memory and start-up of a speed run (None values left out)."""
    tokens_per_s = steady(record, "train/tokens_per_s") or record["tokens_per_s"]
    numbers = {
        "tokens_per_s": tokens_per_s,
        "mfu": steady(record, "train/mfu") or record.get("mfu"),
        "step_ms": 1000 * mode.batch * mode.context / tokens_per_s,
        "peak_mb": record["peak_memory_mb"],
        "startup_s": record["startup_s"],
    }
    return {k + suffix: v for k, v in numbers.items() if v is not None}


def resume(out: Path, record: dict, steps: int) -> dict:
    """Resume a run from its checkpoint to ``steps`` steps; CheckFailed unless it continued where it stopped."""
    again = train(out, [f"resume={record['run_dir']}", f"trainer.max_steps={steps}"])
    first_step = min((step for step, _ in logged(again, "train/loss")), default=None)
    if again["run_dir"] != record["run_dir"] or again["steps"] != steps or first_step != record["steps"]:
        raise CheckFailed(f"resume of {record['run_dir']} at step {record['steps']} ended at step {again['steps']}, "
                          f"its first logged step {first_step} (expected {steps} and {record['steps']})")  # fmt: skip
    return again


def sync(device: str) -> None:
    """Wait for the GPU's queued work (no-op on a CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- checks


def check_train(mode: Mode, out: Path) -> dict:
    """gpt2 124M from scratch in bf16-mixed at context 1024 through train.py: steady tokens/s, MFU, peak memory."""
    return {"numbers": speed(train(out, lm_overrides(mode, mode.steps)), mode)}


def check_hf_gpt2(mode: Mode, out: Path) -> dict:
    """transformers' GPT2LMHeadModel of the same shape, batch, steps and precision: steady tokens/s."""
    import torch
    from throughput import hf_gpt2, step_times

    layers, heads, width = model_shape(mode.model)
    vocab = vocab_size(out.parent)
    torch.manual_seed(0)
    model = hf_gpt2(layers, heads, width, vocab, mode.context).to(mode.device)
    data = torch.randint(0, vocab, (mode.steps, mode.batch, mode.context + 1), device=mode.device)
    times = step_times(model, [(d[:, :-1], d[:, 1:]) for d in data], "bf16" if mode.cuda else "fp32",
                       torch.device(mode.device))  # fmt: skip
    return {"numbers": {"hf_tokens_per_s": mode.batch * mode.context / statistics.median(times[mode.window :])}}


def vocab_size(work: Path) -> int:
    """Tokens of the speed runs' vocabulary: GPT-2's, or the characters of the train check's run."""
    if tokenizer_name() == "gpt2":
        return 50257
    from tokenizers import Tokenizer

    found = sorted(work.glob("train/runs/*/*/tokenizer.json"))
    if not found:
        raise CheckFailed("with tokenizer=char the vocabulary comes from the train check's run: run it first")
    return Tokenizer.from_file(str(found[-1])).get_vocab_size()


def check_compile(mode: Mode, out: Path) -> dict:
    """The train check with compile=true; compile_s: what the first steps took beyond the steady rate."""
    record = train(out, [*lm_overrides(mode, mode.steps), "compile=true"])
    numbers = speed(record, mode, "_compiled")
    numbers["compile_s"] = (
        record["step_ms"] * record["steps"] / 1000 - record["steps"] * numbers["step_ms_compiled"] / 1000
    )
    return {"numbers": numbers}


def check_memory(mode: Mode, out: Path) -> dict:
    """Peak CUDA memory with activation checkpointing, and with the chunked loss on top."""
    base = lm_overrides(mode, mode.short_steps)
    checkpointing = train(out, [*base, "activation_checkpointing=true"])
    chunked = train(out, [*base, "activation_checkpointing=true", "task.module.loss_chunk_size=256"])
    return {"numbers": {"peak_mb_checkpointing": checkpointing["peak_memory_mb"],
                        "peak_mb_chunked": chunked["peak_memory_mb"]}}  # fmt: skip


SDPA_KERNELS = {"cudnn": "cudnn_attention", "flash": "flash_attention", "efficient": "efficient_attention",
                "math": "attention_math"}  # fmt: skip


def sdpa_kernels(model, ids, mask, device: str) -> str:
    """The SDPA kernels (flash, efficient, cudnn, math) that a forward and backward pass ran, '+'-joined."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(ids, attention_mask=mask).float().mean()
        loss.backward()
        sync(device)
    names = {event.key for event in prof.key_averages()}
    return "+".join(kind for kind, marker in SDPA_KERNELS.items() if any(marker in n for n in names)) or "none"


def check_sdpa(mode: Mode, out: Path) -> dict:
    """Which SDPA kernel the GPT's attention runs without a mask and with a padding mask (bf16 on a GPU)."""
    import torch

    from lmforge.models.gpt import GPT

    layers, heads, width = model_shape(mode.model)
    torch.manual_seed(0)
    model = GPT(256, 1, heads, width, mode.context).to(mode.device).train()
    ids = torch.randint(0, 256, (2, mode.context), device=mode.device)
    mask = torch.ones_like(ids)
    mask[1, : mode.context // 4] = 0  # the second row left-padded
    numbers = {"sdpa_no_mask": sdpa_kernels(model, ids, None, mode.device),
               "sdpa_padding_mask": sdpa_kernels(model, ids, mask, mode.device)}  # fmt: skip
    if mode.cuda:
        return {"numbers": numbers}
    return {"numbers": numbers, "skipped": "no CUDA", "note": "the CPU's kernels"}


def check_fp16(mode: Mode, out: Path) -> dict:
    """50 steps of 16-mixed (gradient scaling) at a real learning rate; the run stops itself on a NaN/inf loss."""
    overrides = lm_overrides(mode, mode.fp16_steps, precision="16-mixed")
    record = train(out, [*overrides, "optimizer.lr=6e-4", "scheduler.warmup_steps=10"])
    loss = record["metrics"].get("train/loss", math.nan)
    if record["steps"] != mode.fp16_steps or not math.isfinite(loss):
        raise CheckFailed(f"16-mixed ended at step {record['steps']} with train/loss {loss}")
    return {"numbers": {"fp16_steps": record["steps"], "fp16_loss": loss}}


def distributed_run(mode: Mode, out: Path, strategy: str) -> dict:
    """A short run of ``trainer=<strategy>`` on one device (world size 1), a loss logged every step."""
    overrides = [*lm_overrides(mode, mode.short_steps, trainer=strategy, log_every=1), "trainer.devices=1"]
    if not mode.cuda:
        overrides.append("trainer.accelerator=cpu")  # DDP over gloo
    record = train(out, overrides)
    if record["world_size"] != 1 or record["steps"] != mode.short_steps:
        raise CheckFailed(f"trainer={strategy}: world size {record['world_size']}, {record['steps']} steps")
    return record


def check_ddp(mode: Mode, out: Path) -> dict:
    """trainer=ddp on one device; on a CPU, where FSDP cannot run, its checkpoint is resumed instead."""
    record = distributed_run(mode, out, "ddp")
    numbers = {"ddp_steps": record["steps"], "ddp_loss": record["metrics"]["train/loss"]}
    if not mode.cuda:
        numbers["ddp_resumed_steps"] = resume(out, record, 2 * mode.short_steps)["steps"]
    return {"numbers": numbers}


def check_fsdp(mode: Mode, out: Path) -> dict:
    """trainer=fsdp on one GPU, then resume=<its run dir> to twice the steps from its checkpoint."""
    record = distributed_run(mode, out, "fsdp")
    resumed = resume(out, record, 2 * mode.short_steps)
    return {"numbers": {"fsdp_steps": record["steps"], "fsdp_resumed_steps": resumed["steps"],
                        "fsdp_loss": resumed["metrics"]["train/loss"]}}  # fmt: skip


def check_multi30k(mode: Mode, out: Path) -> dict:
    """multi30k-transformer on the device and on the CPU side by side: validation loss at the same step."""
    data = Path(os.environ.get("LMFORGE_DATA") or "/nonexistent") / "multi30k"
    if not data.is_dir():
        raise Skipped("no multi30k in $LMFORGE_DATA")
    steps = mode.multi30k_steps
    overrides = ["experiment=multi30k-transformer", "logger=none", f"trainer.max_steps={steps}",
                 f"trainer.val_check_interval={steps}", f"trainer.limit_val_batches={mode.multi30k_val_batches}",
                 "test_after_fit=false", "task.module.val_generate_limit=0", "task.monitor=val/loss",
                 "task.monitor_mode=min"]  # fmt: skip
    device = start_train(out / "device", [*overrides, f"trainer={'gpu' if mode.cuda else 'cpu'}"])
    cpu = start_train(out / "cpu", [*overrides, "trainer=cpu"], env={"CUDA_VISIBLE_DEVICES": ""})
    losses = [
        finish_train(proc, out / name)["metrics"]["val/loss"] for name, proc in (("device", device), ("cpu", cpu))
    ]
    difference = abs(losses[0] - losses[1]) / losses[1]
    if difference > MULTI30K_TOLERANCE:
        raise CheckFailed(f"validation loss at step {steps}: {losses[0]:.4f} on {mode.device}, {losses[1]:.4f} on "
                          f"the CPU: {difference:.1%} apart (tolerance {MULTI30K_TOLERANCE:.0%})")  # fmt: skip
    return {"numbers": {"multi30k_val_loss": losses[0], "multi30k_val_loss_cpu": losses[1],
                        "multi30k_rel_diff": difference}}  # fmt: skip


def check_generation(mode: Mode, out: Path) -> dict:
    """Greedy decoding with the KV cache against transformers' generate (same weights), batch 1 and 16."""
    import torch
    from generation import PROMPT_LEN, agreement, build_gpt, measure, runners

    ours, theirs = (m.to(mode.device) for m in build_gpt(mode.generation_size, mode.generation_vocab))
    numbers: dict[str, float | str] = {}
    equal = True
    for batch in (1, 16):
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(1, mode.generation_vocab, (batch, PROMPT_LEN), generator=g).to(mode.device)
        calls = runners(ours, theirs, prompt, None, mode.new_tokens, "greedy")
        seconds, outputs = measure({name: synced(calls[name], mode.device) for name in ("cache", "hf")}, mode.repeats)
        rate = {name: batch * mode.new_tokens / s for name, s in seconds.items()}
        numbers |= {f"gen_b{batch}_tokens_per_s": rate["cache"], f"gen_b{batch}_hf_tokens_per_s": rate["hf"],
                    f"gen_b{batch}_vs_hf": rate["cache"] / rate["hf"]}  # fmt: skip
        equal &= agreement(outputs["cache"], outputs["hf"]) == "yes"
    numbers["gen_tokens_equal"] = str(equal).lower()
    return {"numbers": numbers}


def synced(call: Callable, device: str) -> Callable:
    """``call`` that returns only once the GPU has finished its work (so that it can be timed)."""

    def run():
        """Call, then wait for the GPU."""
        result = call()
        sync(device)
        return result

    return run


@dataclass(frozen=True)
class Check:
    """One row of the table: what runs in the child process, its timeouts, and why a CPU cannot run it."""

    name: str
    run: Callable[[Mode, Path], dict]
    gpu_timeout: float  # seconds; the GPU defaults sum to under 8 minutes
    cpu_timeout: float
    cpu_skip: str | None = None  # reason, for the checks that need CUDA


CHECKS = {c.name: c for c in [
    Check("train", check_train, 40, 120),
    Check("hf_gpt2", check_hf_gpt2, 25, 60),
    Check("compile", check_compile, 110, 180),
    Check("memory", check_memory, 45, 120, cpu_skip="peak CUDA memory"),
    Check("sdpa", check_sdpa, 15, 60),
    Check("fp16", check_fp16, 30, 120, cpu_skip="Lightning runs 16-mixed as bf16 on a CPU"),
    Check("ddp", check_ddp, 30, 120),
    Check("fsdp", check_fsdp, 55, 120, cpu_skip="Lightning's FSDP needs a GPU; ddp resumes instead"),
    Check("multi30k", check_multi30k, 75, 120),
    Check("generation", check_generation, 35, 60),
]}  # fmt: skip


def run_child(name: str, mode: Mode, work: Path) -> None:
    """Run one check in this process and write its outcome to ``<work>/<name>/result.json``."""
    sys.path.insert(0, str(HERE))  # throughput.py, generation.py
    out = work / name
    try:
        outcome = CHECKS[name].run(mode, out)
    except Skipped as reason:
        outcome = {"numbers": {}, "skipped": "no data", "note": str(reason)}
    except CheckFailed as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(1)
    (out / "result.json").write_text(json.dumps(outcome))


# ----------------------------------------------------------------------------------------------- parent


@dataclass
class Row:
    """A check's line of the table."""

    name: str
    status: str  # ok, FAIL, skipped (reason)
    seconds: float = 0.0
    numbers: dict[str, float | str] = field(default_factory=dict)
    note: str = ""  # why it was skipped, beside its numbers
    error: str = ""  # why it failed: the last lines of its stderr


def child_env(mode: Mode, work: Path) -> dict[str, str]:
    """The children's environment: offline, unbuffered, one token and tokenizer cache for all their runs. The
    CPU smoke test sees no GPU and runs one thread per process (its runs are small, some run side by side, and
    OpenMP threads that outnumber the free cores spin against each other)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "LMFORGE_CACHE": str(work / "cache")}  # fmt: skip
    if not mode.cuda:
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env, "CUDA_VISIBLE_DEVICES": ""}
    return env


def run_check(check: Check, mode: Mode, work: Path, timeout: float | None) -> Row:
    """Run one check in a child process (its own process group, killed whole on timeout) and make its row."""
    if check.cpu_skip and not mode.cuda:
        return Row(check.name, "skipped (no CUDA)", note=check.cpu_skip)
    timeout = timeout or (check.gpu_timeout if mode.cuda else check.cpu_timeout)
    out = work / check.name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        check.name,
        "--work",
        str(work),
        *([] if mode.cuda else ["--cpu-smoke"]),
    ]
    start = time.perf_counter()
    with open(out / "stdout.log", "w") as stdout, open(out / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=child_env(mode, work), stdout=stdout, stderr=stderr, start_new_session=True
        )
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        with suppress(ProcessLookupError):  # the child, and any train.py it left running (a failed check's)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    seconds = time.perf_counter() - start
    errors = tail((out / "stderr.log").read_text())
    if code is None:
        return Row(check.name, "FAIL", seconds, error=f"timed out after {timeout:.0f} s\n{errors}".strip())
    if code != 0 or not (out / "result.json").is_file():
        return Row(check.name, "FAIL", seconds, error=errors or f"exit code {code}")
    result = json.loads((out / "result.json").read_text())
    status = f"skipped ({result['skipped']})" if result.get("skipped") else "ok"
    return Row(check.name, status, seconds, result["numbers"], result.get("note", ""))


def add_comparisons(rows: dict[str, Row]) -> None:
    """Numbers that compare two checks: lmforge's speed-up over GPT2LMHeadModel, memory against no checkpointing."""
    train, hf, memory = (rows[name].numbers if name in rows else {} for name in ("train", "hf_gpt2", "memory"))
    if "tokens_per_s" in train and "hf_tokens_per_s" in hf:
        hf["speedup_vs_hf"] = train["tokens_per_s"] / hf["hf_tokens_per_s"]
    for setting in ("checkpointing", "chunked"):
        if f"peak_mb_{setting}" in memory and "peak_mb" in train:
            memory[f"{setting}_memory_ratio"] = memory[f"peak_mb_{setting}"] / train["peak_mb"]


def targets(numbers: dict[str, float | str]) -> list[tuple[str, bool]]:
    """The GPU targets that could be judged: (what, met)."""
    judged = []
    mfu = max((numbers[k] for k in ("mfu", "mfu_compiled") if k in numbers), default=None)
    if mfu is not None:
        judged.append((f"MFU {mfu:.1%} >= {TARGET_MFU:.0%} (best of compile=false/true)", mfu >= TARGET_MFU))
    if "speedup_vs_hf" in numbers:
        ratio = numbers["speedup_vs_hf"]
        judged.append((f"{ratio:.2f}x GPT2LMHeadModel's tokens/s >= {TARGET_SPEEDUP}x", ratio >= TARGET_SPEEDUP))
    if "sdpa_no_mask" in numbers:
        kernel = numbers["sdpa_no_mask"]
        judged.append((f"flash attention without a mask ({kernel})", kernel == "flash"))
    return judged


def fmt(value: float | str) -> str:
    """A number as the table and the summary line show it (no spaces)."""
    if isinstance(value, str):
        return value.replace(" ", "_")
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}"


def print_report(rows: list[Row], mode: Mode, seconds: float) -> int:
    """The table, the failures, the targets and the summary line; returns the number of failed checks."""
    print("\n| check | status | numbers | seconds |\n|---|---|---|---|")
    for row in rows:
        numbers = " ".join([f"{k}={fmt(v)}" for k, v in row.numbers.items()] + ([f"({row.note})"] if row.note else []))
        print(f"| {row.name} | {row.status} | {numbers} | {row.seconds:.1f} |")
    for row in rows:
        if row.error:
            print(f"\nFAIL {row.name}:\n" + "\n".join("    " + ln for ln in row.error.splitlines()))
    numbers = {k: v for row in rows for k, v in row.numbers.items()}
    judged = targets(numbers) if mode.cuda else []
    if judged:
        print("\ntargets: " + "; ".join(f"{what}: {'met' if met else 'MISSED'}" for what, met in judged))
    counts = {s: sum(r.status.startswith(s) for r in rows) for s in ("ok", "FAIL", "skipped")}
    summary = {"passed": counts["ok"], "failed": counts["FAIL"], "skipped": counts["skipped"], "mode": mode.name,
               "seconds": seconds, **({"targets_missed": sum(not met for _, met in judged)} if judged else {}),
               **numbers}  # fmt: skip
    print("\ngpu_check " + " ".join(f"{k}={fmt(v)}" for k, v in summary.items()))
    return counts["FAIL"]


def device_name(mode: Mode) -> str:
    """torch's version and the device: the GPU's name (asked in a subprocess, so that this process holds no
    CUDA context; '' without a GPU), or the CPU's model."""
    if mode.cuda:
        ask = (
            "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
        )
        version, _, gpu = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True).stdout.partition(
            " "
        )
        return f"torch {version}  {gpu.strip()}" if gpu.strip() else ""
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    return f"torch {torch.__version__}  CPU {model} x{os.cpu_count()}"


def main() -> None:
    """Run the chosen checks one after another and report them (or, with ``--child``, run one check)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU; CUDA-only checks skip")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), metavar="CHECK", help=f"of {', '.join(CHECKS)}")
    parser.add_argument("--timeout", type=float, help="seconds per check, instead of each check's default")
    parser.add_argument("--work", type=Path, help="keep run dirs and logs here (default: a temporary folder)")
    parser.add_argument("--child", choices=list(CHECKS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    mode = CPU_SMOKE if args.cpu_smoke else GPU
    if args.child:
        run_child(args.child, mode, args.work)
        return
    device = device_name(mode)
    if not device:
        sys.exit("gpu_check: no CUDA device; --cpu-smoke runs the same checks at tiny sizes on the CPU")
    print(f"{time.strftime('%Y-%m-%d')}  {device}  mode {mode.name}: {mode.model}, context {mode.context}, "
          f"batch {mode.batch}, {mode.precision}, tokenizer {tokenizer_name()}", flush=True)  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        rows = []
        for name in args.only or CHECKS:
            rows.append(run_check(CHECKS[name], mode, work, args.timeout))
            print(f"{name}: {rows[-1].status} ({rows[-1].seconds:.1f} s)", file=sys.stderr, flush=True)
    add_comparisons({row.name: row for row in rows})
    failed = print_report(rows, mode, time.perf_counter() - start)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
