"""``lmforge-export``: a run directory as a Hugging Face model folder that ``transformers`` loads.

The folder holds config.json, model.safetensors, the run's tokenizer (tokenizer.json with a
tokenizer_config.json for ``AutoTokenizer``) and a model card (README.md) with the run's
metrics and config. The task decides the Hugging Face class: a language model exports to
``GPT2LMHeadModel``, a classifier to ``*ForSequenceClassification``, a tagger to
``*ForTokenClassification``, a masked LM to ``BertForMaskedLM``, a translator to
``T5ForConditionalGeneration``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lmforge.compose.parts import MODEL_DESCRIPTION_KEYS, build_finetune, make_task
from lmforge.compose.weights import load_run
from lmforge.data.chat import run_chat_template
from lmforge.data.tokenizers import EOS, eos_token_id, pad_token_id
from lmforge.errors import LmforgeError
from lmforge.models.pretrained import (
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    Family,
    export_state,
    family_of_backbone,
    head_kind,
)
from lmforge.rundirs.checkpoints import load_task_state
from lmforge.rundirs.config import saved_config

log = logging.getLogger("lmforge")


def _check_exportable(task: nn.Module, kind: str | None, family: Family) -> None:
    """Fail in one sentence where the Hugging Face class would compute something else than the run's task."""
    if kind not in family.architectures:
        raise LmforgeError(
            f"A {type(task).__name__} on a {family.model_type} backbone has no Hugging Face class to export to."
        )
    if kind == SEQUENCE_CLASSIFICATION:
        wanted = "cls" if family.model_type == "bert" else "last"
        if task.pooling != wanted:
            raise LmforgeError(
                f"This classifier pools with '{task.pooling}'; {family.architectures[kind]} reads the "
                f"{'[CLS] pooler' if wanted == 'cls' else 'last token'}, so only pooling={wanted} runs export."
            )
    if getattr(task.backbone, "copy_head", None) is not None:
        raise LmforgeError(
            f"This run copies source tokens (model.copy=true), which {family.architectures[kind]} cannot do."
        )
    if kind == TOKEN_CLASSIFICATION and (task.crf is not None or task.spelling is not None):
        raise LmforgeError(
            "This tagger has a CRF or character/casing features, which AutoModelForTokenClassification lacks."
        )


def _zero_biases(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Zero biases for the bias-free linear and norm layers of a backbone (GPT-2 always has biases).

    A layer without a bias computes exactly what the same layer with a zero bias does.
    """
    zeros = {}
    for name, module in backbone.named_modules():
        bias_free = isinstance(module, (nn.Linear, nn.LayerNorm)) and getattr(module, "bias", None) is None
        if bias_free and name != "lm_head":
            zeros[f"backbone.{name}.bias"] = torch.zeros(module.weight.shape[0])
    return zeros


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage with an earlier one (tied weights; safetensors refuses them)."""
    seen, out = set(), {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def hf_config(family: Family, kind: str | None, model_cfg: DictConfig, task: nn.Module, tokenizer) -> dict[str, Any]:
    """config.json for the exported model: architecture, head labels and special token ids."""
    kwargs = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items()
              if k not in MODEL_DESCRIPTION_KEYS and not k.startswith("_")}  # fmt: skip
    vocab_size = task.backbone.state_dict()[_embedding_name(family)].shape[0]
    config = {"model_type": family.model_type, "architectures": [family.architectures[kind]]}
    config.update(family.to_config(kwargs, vocab_size))
    config["pad_token_id"] = pad_token_id(tokenizer)
    if family.model_type == "gpt2":  # a character-level model may have no end-of-text token
        config["eos_token_id"] = config["bos_token_id"] = tokenizer.token_to_id(EOS)
    if family.model_type == "t5":
        # lmforge's seq2seq decoders start from the end-of-sequence id
        config["eos_token_id"] = config["decoder_start_token_id"] = eos_token_id(tokenizer)
    names = getattr(task, "label_names", None) or getattr(task, "tag_names", None)
    if kind in (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION):
        names = list(names or range(task.head.out_features))
        config["id2label"] = {str(i): str(n) for i, n in enumerate(names)}
        config["label2id"] = {str(n): i for i, n in enumerate(names)}
    return config


def _embedding_name(family: Family) -> str:
    return {"gpt2": "transformer.wte.weight", "bert": "embeddings.word_embeddings.weight", "t5": "shared.weight"}[
        family.model_type
    ]


def _write_tokenizer(tokenizer, out: Path, max_length: int | None, segments: bool, chat_template: str | None) -> None:
    """tokenizer.json plus a tokenizer_config.json naming its special tokens, for ``AutoTokenizer``.

    Args:
        segments: the model reads segment ids (BERT): the tokenizer returns them for text pairs.
        chat_template: the run's chat template (task=sft), for ``apply_chat_template``.
    """
    tokenizer.save(str(out / "tokenizer.json"))
    specials = {}
    for key, candidates in {
        "pad_token": ("[PAD]", "<pad>", EOS),
        "unk_token": ("[UNK]", "<unk>"),
        "eos_token": (EOS, "</s>"),
        "bos_token": (EOS,),
        "cls_token": ("[CLS]",),
        "sep_token": ("[SEP]",),
        "mask_token": ("[MASK]",),
    }.items():
        token = next((t for t in candidates if tokenizer.token_to_id(t) is not None), None)
        if token is not None:
            specials[key] = token
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    if max_length:
        config["model_max_length"] = max_length
    if segments:  # transformers 5 leaves token_type_ids out unless told, and BERT would read zeros
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _model_card(run_dir: Path, architecture: str, cfg: DictConfig, checkpoint: Path) -> str:
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()).get("metrics", {}) if metrics_file.is_file() else {}
    scores = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if k.startswith(("val/", "test/", "best_")))
    auto = {"GPT2LMHeadModel": "AutoModelForCausalLM", "BertForMaskedLM": "AutoModelForMaskedLM",
            "T5ForConditionalGeneration": "AutoModelForSeq2SeqLM"}.get(architecture)  # fmt: skip
    auto = auto or ("AutoModelForSequenceClassification" if "Sequence" in architecture else
                    "AutoModelForTokenClassification" if "Token" in architecture else
                    "AutoModelForQuestionAnswering" if "Question" in architecture else "AutoModel")  # fmt: skip
    return f"""# {cfg.model.name} trained on {cfg.task.name} with lmforge

Exported from the lmforge run `{run_dir.name}` (checkpoint `{checkpoint.name}`) as a `{architecture}`.

```python
from transformers import AutoTokenizer, {auto}
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
model = {auto}.from_pretrained("<this folder>")
```

## Metrics

| metric | value |
|---|---|
{scores or "| (none recorded) | |"}

## Training config

```yaml
{OmegaConf.to_yaml(cfg).strip()}
```
"""


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str = "best") -> Path:
    """Write a run's model as a Hugging Face folder at ``out``; return the folder."""
    from safetensors.torch import save_file

    run = load_run(run_dir, checkpoint)
    family = family_of_backbone(run.cfg.model._target_)
    if family is None:
        raise LmforgeError(
            f"Model {run.cfg.model.name} has no Hugging Face equivalent; runs of the GPT-2, BERT and T5 "
            f"families export (model=gpt2*, bert-*, t5-*)."
        )
    saved = run.saved
    task = make_task(run.cfg, run.backbone, run.tokenizer, saved.get("data_arguments") or {})
    load_task_state(task, saved)
    kind = head_kind(task)
    _check_exportable(task, kind, family)
    method = build_finetune(run.cfg)
    if not method.mergeable:
        raise LmforgeError(f"finetune={method.name} adds layers that {family.architectures[kind]} does not have.")
    method.merge(task.backbone)  # LoRA and IA3 fold into the base weights
    state = {n: t for n, t in task.state_dict().items() if n.startswith(("backbone.", "head."))}
    if family.model_type == "gpt2":
        state.update(_zero_biases(task.backbone))
    hf_state = export_state(family, _unique_tensors(state), kind)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(family, kind, run.cfg.model, task, run.tokenizer)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    template = run_chat_template(run.cfg)
    _write_tokenizer(run.tokenizer, out, run.cfg.model.get("n_positions"), segments=family.model_type == "bert",
                     chat_template=template.source if template else None)  # fmt: skip
    cfg = saved_config(run.run_dir)
    (out / "README.md").write_text(_model_card(run.run_dir, config["architectures"][0], cfg, run.checkpoint))
    log.info("exported %s (%s) to %s", run.run_dir.name, config["architectures"][0], out)
    return out
