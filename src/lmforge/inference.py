"""What ``lmforge-generate``, ``lmforge-evaluate`` and ``lmforge-predict`` do with a run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lmforge import tracking
from lmforge.compose.parts import build_data, build_task, make_task
from lmforge.compose.weights import load_run
from lmforge.console import setup_console
from lmforge.data.chat import run_chat_template
from lmforge.data.tokenizers import EOS
from lmforge.errors import LmforgeError
from lmforge.experiments.instruct import score_replies
from lmforge.generation import generate
from lmforge.models.backbone import backbone_kind
from lmforge.rundirs.checkpoints import load_task_state
from lmforge.rundirs.config import saved_config

log = logging.getLogger("lmforge")

# The tasks whose model is a decoder's language-model head: their runs generate text (and chat).
GENERATING_TASKS = ("LanguageModelingTask", "PreferenceTask")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def generate_from_run(cfg: DictConfig) -> list[str]:
    """Continue ``cfg.prompt`` with a language model, or translate/summarise ``cfg.text`` with a seq2seq run.

    Prints and returns the generated texts.
    """
    setup_console()
    if OmegaConf.is_missing(cfg, "run"):
        raise LmforgeError('Say which run to use: lmforge-generate run=<run dir> prompt="ROMEO:"')
    run = load_run(cfg.run, cfg.checkpoint)
    task_class = run.cfg.task.module._target_.rsplit(".", 1)[-1]
    if task_class == "Seq2SeqTask":
        texts = _generate_seq2seq(run, cfg)
    elif backbone_kind(run.backbone) != "decoder":
        raise LmforgeError(
            f"The model of {run.run_dir} ({run.cfg.model.name}) is not a decoder; it cannot generate text."
        )
    elif task_class not in GENERATING_TASKS:  # a decoder trained to classify or tag has no trained LM head
        raise LmforgeError(
            f"{run.run_dir} is a {run.cfg.task.name} run, not a language model, so it cannot generate text "
            f"(lmforge-predict labels texts with it)."
        )
    elif cfg.get("chat"):
        return _chat(run, cfg)
    else:
        texts = _continue_prompt(run, cfg)
    for i, text in enumerate(texts):
        if i:
            print("-" * 40)
        print(text)
    return texts


def _sampling_options(cfg: DictConfig) -> dict[str, Any]:
    """The decoding options of conf/generate.yaml, as :func:`lmforge.generation.generate` arguments."""
    return dict(
        temperature=0.0 if cfg.greedy else cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        num_beams=cfg.num_beams or 1,
        length_penalty=cfg.length_penalty,
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=cfg.get("no_repeat_ngram_size") or 0,
        use_cache=cfg.use_cache,
    )


def _continue_prompt(run, cfg: DictConfig) -> list[str]:
    """``num_samples`` continuations of the prompt by a language model."""
    device = _device(cfg.device)
    model = run.backbone.to(device)
    prompt = run.tokenizer.encode(cfg.prompt, add_special_tokens=False).ids
    if not prompt:
        raise LmforgeError("The prompt is empty after tokenization; give some text, e.g. prompt='\\n'.")
    input_ids = torch.tensor([prompt] * cfg.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(model, input_ids, cfg.max_new_tokens, eos_token_id=run.tokenizer.token_to_id(EOS),
                   generator=generator, **_sampling_options(cfg))  # fmt: skip
    return [run.tokenizer.decode(row.tolist()) for row in out]


def _chat(run, cfg: DictConfig) -> list[str]:
    """A conversation in the terminal (``chat=true``): a line from you, a reply from the run, until an empty line.

    With ``prompt=`` given, one reply to it and no questions asked (scripts, tests). Returns the replies.
    """
    from lmforge.chat_session import ChatSession

    template = run_chat_template(run.cfg)
    if template is None:
        raise LmforgeError(f"{run.run_dir} was not tuned on conversations (task=sft), so it has no chat template; "
                           f"chat=true needs such a run.")  # fmt: skip
    options = _sampling_options(cfg)
    session = ChatSession(run.backbone.to(_device(cfg.device)), run.tokenizer, template, run.tokenizer.token_to_id(EOS),
                          cfg.max_new_tokens, options["temperature"], options["top_k"], options["top_p"], cfg.seed)  # fmt: skip
    messages = [{"role": "system", "content": str(cfg.system)}] if cfg.get("system") else []
    replies = []
    given = cfg.get("prompt") if cfg.get("prompt") not in (None, "\n") else None
    while True:
        text = str(given) if given is not None else _ask()
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        replies.append(session.reply(messages))
        messages.append({"role": "assistant", "content": replies[-1]})
        print(f"assistant> {replies[-1]}", flush=True)
        if given is not None:
            break
    return replies


def _ask() -> str:
    """The next line typed at the ``you>`` prompt ('' at the end of input or for /exit)."""
    try:
        text = input("you> ")
    except EOFError:
        return ""
    return "" if text.strip() in ("/exit", "/quit") else text


def _generate_seq2seq(run, cfg: DictConfig) -> list[str]:
    """The output of a seq2seq run (translation, summary) for each of ``text=`` (one text or a list).

    Beam search with the run's ``num_beams`` (and ``no_repeat_ngram_size``) unless ``num_beams=`` or
    sampling options say otherwise.
    """
    if cfg.get("text") is None:
        raise LmforgeError(
            f'{run.run_dir} is a {run.cfg.task.name} run: say what to transform, e.g. text="A man is riding a bike."'
        )
    sources = [cfg.text] if isinstance(cfg.text, str) else [str(t) for t in cfg.text]
    task = make_task(run.cfg, run.backbone, run.tokenizer, {})
    options = _sampling_options(cfg)
    options["num_beams"] = 1 if cfg.sample else (cfg.num_beams or task.num_beams)
    if cfg.get("no_repeat_ngram_size") is None:  # the run's own setting
        options.pop("no_repeat_ngram_size")
    if not cfg.sample:
        options["temperature"] = 0.0
    task.to(_device(cfg.device)).eval()
    torch.manual_seed(cfg.seed)
    return task.generate_texts(sources, run.cfg.task.data.get("source_prefix", ""), max_new_tokens=cfg.max_new_tokens,
                               **options)  # fmt: skip


def evaluate_run(cfg: DictConfig) -> dict[str, Any]:
    """Score a run's checkpoint on a split of its task (or of ``task=``) and write ``eval-<split>.json``,
    and a JSON line per example to ``eval-<split>-predictions.jsonl`` (see :mod:`lmforge.predictions`)."""
    setup_console()
    if OmegaConf.is_missing(cfg, "run"):
        raise LmforgeError("Say which run to evaluate: lmforge-evaluate run=<run dir> [split=test]")
    run = load_run(cfg.run, cfg.checkpoint)
    saved = run.cfg
    with open_dict(saved):
        if cfg.get("task"):
            saved.task = cfg.task
        if cfg.data_dir:
            saved.paths.data_dir = cfg.data_dir
    _, datamodule = build_data(saved, run.tokenizer, required=(cfg.split,) if cfg.split else ())
    split = cfg.split or ("test" if datamodule.has_test_split else "validation")
    if split not in ("test", "validation"):
        raise LmforgeError(f"split={split} is not one lmforge-evaluate scores; use split=test or split=validation.")
    no_samples = {"num_samples": 0} if "num_samples" in saved.task.module else {}
    task = build_task(saved, run.backbone, run.tokenizer, datamodule, **no_samples)
    load_task_state(task, run.saved)  # the head too, not only the backbone
    suffix = f"-{saved.task.name}" if saved.task.name != saved_config(run.run_dir).task.name else ""
    # The steps of the scored split write a line per example (lmforge.predictions), beside the record.
    task.predictions_file, task.predictions_split = f"eval-{split}{suffix}-predictions.jsonl", split
    limit = cfg.limit_batches if cfg.limit_batches is not None else 1.0
    trainer = pl.Trainer(
        default_root_dir=run.run_dir,  # where the task writes its reports (the confusion matrix)
        accelerator="gpu" if _device(cfg.device).type == "cuda" else "cpu",
        devices=1,
        precision=cfg.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_test_batches=limit,
        limit_val_batches=limit,
    )
    runner = trainer.test if split == "test" else trainer.validate
    metrics = {k: round(float(v), 6) for k, v in runner(task, datamodule=datamodule, verbose=False)[0].items()}
    # A run tuned on the instruction mixture: each task's replies scored by that task's metric.
    replies = run.run_dir / f"eval-{split}{suffix}-replies.jsonl"
    max_new_tokens = cfg.get("max_new_tokens") or 64
    metrics.update(score_replies(run.backbone, run.tokenizer, run.cfg, datamodule, split, max_new_tokens, replies))
    record = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "task": saved.task.name,
        "split": split,
        "metrics": metrics,
        "predictions": str(run.run_dir / task.predictions_file),
    }
    out = run.run_dir / f"eval-{split}{suffix}.json"
    tracking.write_json(out, record)
    log.info(
        "%s on %s (%s): %s",
        saved.task.name,
        split,
        run.checkpoint.name,
        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
    )
    log.info("written: %s", out)
    return record


def _read_inputs(cfg: DictConfig, fields: tuple[str, ...] = ("text",)) -> list:
    """What to label: ``text=`` (one or a list) or ``file=`` (a line each, or JSON lines with a ``text`` field).

    A task that reads several fields (question answering: ``question``, ``context``) takes them from
    the command line (``question=... context=...``) or from each JSON line, and gets dicts.
    """
    if fields != ("text",):
        if all(cfg.get(name) is not None for name in fields):
            return [{name: str(cfg[name]) for name in fields}]
        if not cfg.get("file"):
            raise LmforgeError(f"Give {' and '.join(f'{n}=' for n in fields)}, or file=<jsonl> with those fields.")
    elif cfg.get("text") is not None:
        return [cfg.text] if isinstance(cfg.text, str) else [str(t) for t in cfg.text]
    path = Path(cfg.file).expanduser()
    if not path.is_file():
        raise LmforgeError(f"file={cfg.file}: no such file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if fields == ("text",) and path.suffix not in (".jsonl", ".json"):
        return lines
    wanted = fields if fields != ("text",) else (cfg.text_field,)
    try:
        records = [json.loads(line) for line in lines]
        if fields == ("text",):
            return [str(record[cfg.text_field]) for record in records]
        return [{name: str(record[name]) for name in fields} for record in records]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        names = f"a '{wanted[0]}' field" if len(wanted) == 1 else " and ".join(f"'{n}'" for n in wanted) + " fields"
        raise LmforgeError(f"{path} is not JSON lines with {names} on every line ({err}).") from err


def predict_from_run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Label texts with a run's model and print one JSON line per text (also written to ``output=``)."""
    setup_console()
    if OmegaConf.is_missing(cfg, "run") or all(cfg.get(k) is None for k in ("text", "file", "question")):
        raise LmforgeError('Say which run and what to label: lmforge-predict run=<run dir> text="a gorgeous film"')
    run = load_run(cfg.run, cfg.checkpoint)
    checkpoint = run.saved
    task = make_task(run.cfg, run.backbone, run.tokenizer, checkpoint.get("data_arguments") or {})
    if not hasattr(task, "predict_texts") and run_chat_template(run.cfg) is not None:
        return _write_predictions(cfg, _replies(run, cfg, _read_inputs(cfg)))
    if not hasattr(task, "predict_texts"):
        raise LmforgeError(
            f"The task of {run.run_dir} ({run.cfg.task.name}) does not label texts; "
            f"lmforge-predict serves classification, tagging, question answering and task=sft runs "
            f"(lmforge-generate samples from language models)."
        )
    load_task_state(task, checkpoint)
    task.to(_device(cfg.device)).eval()
    texts = _read_inputs(cfg, getattr(task, "predict_fields", ("text",)))
    results = []
    for start in range(0, len(texts), cfg.batch_size):
        results.extend(task.predict_texts(texts[start : start + cfg.batch_size], run.tokenizer))
    return _write_predictions(cfg, results)


def _replies(run, cfg: DictConfig, prompts: list[str]) -> list[dict[str, Any]]:
    """A task=sft run's greedy reply to each prompt, each a conversation of its own."""
    from lmforge.chat_session import ChatSession

    session = ChatSession(run.backbone.to(_device(cfg.device)), run.tokenizer, run_chat_template(run.cfg),
                          run.tokenizer.token_to_id(EOS), cfg.max_new_tokens, temperature=0)  # fmt: skip
    return [{"prompt": p, "reply": session.reply([{"role": "user", "content": p}])} for p in prompts]


def _write_predictions(cfg: DictConfig, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Print one JSON line per result, and write them to ``output=`` when given."""
    lines = [json.dumps(result, ensure_ascii=False) for result in results]
    print("\n".join(lines))
    if cfg.get("output"):
        Path(cfg.output).expanduser().write_text("\n".join(lines) + "\n", encoding="utf-8")
        log.info("written: %s", cfg.output)
    return results
