"""What lmforge-serve serves: a run directory or a Hugging Face folder, opened into one kind of service.

The kind follows from what was trained: a language model generates (completions and chat), a
seq2seq run transforms its input (completions and chat, the prompt being the source), and a
classifier, tagger or question-answering run labels, tags or answers. A Hugging Face folder
serves by its family: GPT-2 and T5 generate, BERT embeds (``/v1/embeddings``). A run tuned on
conversations (``task=sft``) chats with its own template.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer
from torch import nn

from lmforge.data.chat import run_chat_template
from lmforge.data.tokenizers import EOS, pad_token_id
from lmforge.errors import LmforgeError
from lmforge.generation import generate
from lmforge.serve.batcher import BatchWorker
from lmforge.serve.engine import GenerationEngine

GENERATE, CLASSIFY, TAG, ANSWER, EMBED = "generate", "classify", "tag", "answer", "embed"
ROUTES = {
    GENERATE: ("/v1/completions", "/v1/chat/completions"),
    CLASSIFY: ("/v1/classify",),
    TAG: ("/v1/tag",),
    ANSWER: ("/v1/answer",),
    EMBED: ("/v1/embeddings",),
}
_TASK_KINDS = {"ClassificationTask": CLASSIFY, "TokenClassificationTask": TAG, "QuestionAnsweringTask": ANSWER}

# A chat for a model without a template of its own: one "role: content" line per message, then
# "assistant:", and generation stops where the model starts the user's next line.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PLAIN_CHAT_STOP = ("\nuser:",)
_DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


@dataclass
class ServedModel:
    """A model opened for serving.

    Args:
        id: the name clients give as ``model``.
        kind: what it does (GENERATE, CLASSIFY, TAG, ANSWER or EMBED): which routes answer.
        what: how messages describe it.
        tokenizer: its tokenizer.
        created: when it was trained (seconds since the epoch), for ``/v1/models``.
        engine: a decoder's continuous batching; None otherwise.
        worker: the dynamic batching of everything else; its items and keys depend on the kind.
        context: tokens a prompt and its completion may take together (None: no limit).
        seq2seq: completions transform the prompt (the output does not continue it).
    """

    id: str
    kind: str
    what: str
    tokenizer: Tokenizer
    created: int
    engine: GenerationEngine | None = None
    worker: BatchWorker | None = None
    context: int | None = None
    seq2seq: bool = False
    chat_template: str = PLAIN_CHAT_TEMPLATE
    chat_stop: tuple[str, ...] = PLAIN_CHAT_STOP

    def start(self) -> None:
        """Start the batching thread."""
        (self.engine or self.worker).start()

    def close(self) -> None:
        """Finish what is running and stop the batching thread."""
        (self.engine or self.worker).close()


def open_served(cfg: DictConfig) -> ServedModel:
    """Open ``run=`` or ``model.pretrained=`` for serving, on ``device`` in ``precision``."""
    if cfg.get("run"):
        served = _open_run(cfg)
    elif cfg.model.get("pretrained"):
        served = _open_folder(cfg)
    else:
        raise LmforgeError("Say what to serve: lmforge-serve run=<run dir> or model.pretrained=<Hugging Face folder>.")
    if cfg.get("model_name"):
        served.id = str(cfg.model_name)
    return served


def _device_and_dtype(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    name = str(cfg.device)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    precision = str(cfg.precision)
    if precision not in _DTYPES:
        raise LmforgeError(f"precision={precision} is not one lmforge-serve runs in; use 32, bf16 or 16.")
    return device, _DTYPES[precision]


def _open_run(cfg: DictConfig) -> ServedModel:
    from lmforge.compose.parts import make_task
    from lmforge.compose.weights import load_run
    from lmforge.inference import GENERATING_TASKS
    from lmforge.rundirs.checkpoints import load_task_state

    run = load_run(cfg.run, cfg.checkpoint)
    device, dtype = _device_and_dtype(cfg)
    task_class = run.cfg.task.module._target_.rsplit(".", 1)[-1]
    what = f"a {run.cfg.task.name} run of {run.cfg.model.name}"
    common = dict(id=run.run_dir.name, what=what, tokenizer=run.tokenizer, created=int(run.checkpoint.stat().st_mtime))
    if task_class in GENERATING_TASKS and run.backbone.kind == "decoder":
        served = _generator(run.backbone.to(device, dtype), run.tokenizer, run.tokenizer.token_to_id(EOS), cfg, common)
        template = run_chat_template(run.cfg)
        if template is not None:  # tuned on conversations: its own template, whose replies end with EOS
            served.chat_template, served.chat_stop = template.source, ()
        return served
    task = make_task(run.cfg, run.backbone, run.tokenizer, run.saved.get("data_arguments") or {})
    if task_class == "Seq2SeqTask":
        task.to(device, dtype).eval()
        prefix = run.cfg.task.data.get("source_prefix", "")
        return _seq2seq(functools.partial(task.generate_texts, source_prefix=prefix), task.backbone, cfg, common)
    if task_class in _TASK_KINDS:
        load_task_state(task, run.saved)
        task.to(device, dtype).eval()
        return _labeller(_TASK_KINDS[task_class], task, cfg, common)
    if task_class == "MaskedLanguageModelingTask":
        return _embedder(run.backbone.to(device, dtype), cfg, common)
    raise LmforgeError(f"{run.run_dir} is {what}, which lmforge-serve has no endpoint for.")


def _open_folder(cfg: DictConfig) -> ServedModel:
    from lmforge.hub.pretrained import folder_tokenizer
    from lmforge.models.pretrained import backbone_kwargs, family_of_config, import_state, read_hf_folder

    folder = Path(str(cfg.model.pretrained)).expanduser().resolve()
    if not folder.is_dir():
        raise LmforgeError(f"model.pretrained={cfg.model.pretrained} is not a folder.")
    config, hf_state = read_hf_folder(folder)
    family = family_of_config(config, str(folder))
    tokenizer = folder_tokenizer(folder)
    if tokenizer is None:
        raise LmforgeError(f"{folder} has no tokenizer (tokenizer.json, vocab.txt, or vocab.json with merges.txt).")
    from hydra.utils import get_class

    backbone = get_class(family.backbone)(**backbone_kwargs(family, config))
    state, _ = import_state(family, hf_state)
    backbone.load_state_dict({n.removeprefix("backbone."): t for n, t in state.items() if n.startswith("backbone.")},
                             strict=False)  # fmt: skip
    device, dtype = _device_and_dtype(cfg)
    backbone.to(device, dtype).eval()
    common = dict(id=folder.name, what=f"the {family.name} model in {folder}", tokenizer=tokenizer,
                  created=int((folder / "config.json").stat().st_mtime))  # fmt: skip
    if backbone.kind == "decoder":
        return _generator(backbone, tokenizer, config.get("eos_token_id"), cfg, common)
    if backbone.kind == "seq2seq":
        texts = functools.partial(_folder_seq2seq, backbone, tokenizer, config)
        return _seq2seq(texts, backbone, cfg, common)
    return _embedder(backbone, cfg, common)


def _generator(backbone: nn.Module, tokenizer: Tokenizer, eos: int | None, cfg: DictConfig, common) -> ServedModel:
    engine = GenerationEngine(backbone.eval(), eos, cfg.max_batch_size)
    return ServedModel(kind=GENERATE, engine=engine, context=backbone.n_positions, **common)


def _seq2seq(generate_texts: Callable, backbone: nn.Module, cfg: DictConfig, common) -> ServedModel:
    def run(options: tuple, sources: list[str]) -> list[str]:
        options = dict(options)
        options.pop("unbatched", None)
        if "seed" in options:  # sampled: from a generator seeded for this one choice
            options["generator"] = torch.Generator().manual_seed(options.pop("seed"))
        return generate_texts(sources, **options)

    worker = BatchWorker(run, cfg.max_batch_size, cfg.batch_wait_ms / 1000)
    return ServedModel(kind=GENERATE, worker=worker, context=backbone.n_positions, seq2seq=True, **common)


def _labeller(kind: str, task: nn.Module, cfg: DictConfig, common) -> ServedModel:
    worker = BatchWorker(lambda _, inputs: task.predict_texts(inputs, common["tokenizer"]), cfg.max_batch_size,
                         cfg.batch_wait_ms / 1000)  # fmt: skip
    return ServedModel(kind=kind, worker=worker, **common)


def _embedder(backbone: nn.Module, cfg: DictConfig, common) -> ServedModel:
    worker = BatchWorker(functools.partial(_embed, backbone.eval(), common["tokenizer"]), cfg.max_batch_size,
                         cfg.batch_wait_ms / 1000)  # fmt: skip
    return ServedModel(kind=EMBED, worker=worker, context=backbone.n_positions, **common)


def _embed(backbone: nn.Module, tokenizer: Tokenizer, _key, texts: list[str]) -> list[list[float]]:
    """Unit-length mean-pooled hidden states of each text (up to the model's longest sequence)."""
    from lmforge.tasks.classification import pool

    limit = backbone.n_positions or 512
    rows = [e.ids[:limit] for e in tokenizer.encode_batch(texts)]
    ids, mask = _right_padded(rows, pad_token_id(tokenizer))
    device = next(backbone.parameters()).device
    pooled = pool(backbone.hidden_states(ids.to(device), mask.to(device)).float(), mask.to(device), "mean")
    return torch.nn.functional.normalize(pooled, dim=-1).cpu().tolist()


def _folder_seq2seq(
    backbone: nn.Module, tokenizer: Tokenizer, config: dict, sources: list[str], **options
) -> list[str]:
    """A Hugging Face encoder-decoder's outputs for ``sources`` (its tokenizer adds the end token)."""
    eos, pad = config.get("eos_token_id", 1), config.get("pad_token_id", 0)
    ids, mask = _right_padded([e.ids for e in tokenizer.encode_batch(sources)], pad)
    device = next(backbone.parameters()).device
    options = {"temperature": 0.0, **options}
    out = generate(backbone, ids.to(device), attention_mask=mask.to(device), eos_token_id=eos, pad_token_id=pad,
                   decoder_start_token_id=config.get("decoder_start_token_id", pad), **options).tolist()  # fmt: skip
    return [tokenizer.decode(row[: row.index(eos)] if eos in row else row).strip() for row in out]


def _right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask
