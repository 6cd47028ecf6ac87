"""Hugging Face checkpoints of the GPT-2, BERT and T5 families, into lmforge models and back out.

The backbones already use the public parameter names, so a family here is little more than
(1) how its ``config.json`` maps onto the backbone's constructor, (2) which prefix the
Hugging Face class puts before the backbone's names, (3) which tensors are stored transposed
or are aliases of another one, and (4) how each task head is named on the Hugging Face side.
Names on the lmforge side are those of a task's state dict: ``backbone.<name>`` and ``head.<name>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.models.hf_config_fields import checked_config

# The Hugging Face head each lmforge task exports to (and imports from): the task's ``head_kind``.
CAUSAL_LM, MASKED_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, SEQ2SEQ_LM, QUESTION_ANSWERING = (
    "causal-lm", "masked-lm", "sequence-classification", "token-classification", "seq2seq-lm", "question-answering",
)  # fmt: skip


_TASK_HEADS = {
    "LanguageModelingTask": CAUSAL_LM,
    "PreferenceTask": CAUSAL_LM,
    "MaskedLanguageModelingTask": MASKED_LM,
    "ClassificationTask": SEQUENCE_CLASSIFICATION,
    "TokenClassificationTask": TOKEN_CLASSIFICATION,
    "QuestionAnsweringTask": QUESTION_ANSWERING,
}


def head_kind(task: torch.nn.Module) -> str | None:
    """The Hugging Face head a task corresponds to (a decoder's seq2seq run is a causal LM: the prefix LM)."""
    name = type(task).__name__
    if name == "Seq2SeqTask":
        return CAUSAL_LM if task.backbone.kind == "decoder" else SEQ2SEQ_LM
    return _TASK_HEADS.get(name)


# Heads of Hugging Face classes that are not part of the backbone (BERT's next-sentence head has no lmforge task).
_OTHER_HEADS = ("cls.", "classifier.", "score.", "qa_outputs.")


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model family maps onto an lmforge backbone.

    Args:
        model_type: ``model_type`` in config.json.
        name: how messages name the family.
        backbone: the lmforge backbone class (the model config's ``_target_``).
        architectures: lmforge head kind -> Hugging Face class name (the export's ``architectures``).
        prefixes: Hugging Face class name -> the prefix it puts before backbone names.
        heads: head kind -> {lmforge name prefix: Hugging Face name prefix} for the task head.
        bare_prefix: the start of lmforge's names that a bare-backbone checkpoint (``GPT2Model``) leaves out.
        skipped: suffixes of buffers some checkpoints carry and lmforge computes itself.
        transposed: suffixes of weights Hugging Face stores as (in, out) (GPT-2's Conv1D).
        aliases: Hugging Face names that are other names of a tensor already mapped (tied weights).
        to_kwargs: config.json, checked and completed by :func:`checked_config` -> backbone constructor arguments.
        to_config: (backbone constructor arguments, vocabulary size) -> config.json entries.
    """

    model_type: str
    name: str
    backbone: str
    architectures: dict[str | None, str]
    prefixes: dict[str, str]
    heads: dict[str, dict[str, str]]
    to_kwargs: Callable[[dict], dict]
    to_config: Callable[[dict, int], dict]
    transposed: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    bare_prefix: str = ""


def backbone_kwargs(family: Family, config: dict) -> dict:
    """The backbone constructor arguments a Hugging Face config.json fixes (refusing what lmforge cannot compute)."""
    return family.to_kwargs(checked_config(family.model_type, family.name, config))


def _gpt2_kwargs(c: dict) -> dict:
    return dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], n_positions=c["n_positions"],
                n_inner=c["n_inner"], dropout=c["resid_pdrop"], bias=True, layer_norm_epsilon=c["layer_norm_epsilon"],
                scale_attn_weights=c["scale_attn_weights"],
                scale_attn_by_inverse_layer_idx=c["scale_attn_by_inverse_layer_idx"],
                vocab_size=c["vocab_size"])  # fmt: skip


def _gpt2_config(kw: dict, vocab_size: int) -> dict:
    # A bias-free GPT (model.bias=false) exports with zero biases, which compute the same.
    p = kw.get("dropout", 0.0)
    return dict(n_layer=kw["n_layer"], n_head=kw["n_head"], n_embd=kw["n_embd"], n_positions=kw["n_positions"],
                n_inner=kw.get("n_inner"), activation_function="gelu_new", resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
                layer_norm_epsilon=kw.get("layer_norm_epsilon", 1e-5),
                scale_attn_weights=kw.get("scale_attn_weights", True),
                scale_attn_by_inverse_layer_idx=kw.get("scale_attn_by_inverse_layer_idx", False),
                vocab_size=vocab_size, tie_word_embeddings=True)  # fmt: skip


def _bert_kwargs(c: dict) -> dict:
    return dict(n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"], hidden_size=c["hidden_size"],
                intermediate_size=c["intermediate_size"], n_positions=c["max_position_embeddings"],
                type_vocab_size=c["type_vocab_size"], dropout=c["hidden_dropout_prob"],
                layer_norm_eps=c["layer_norm_eps"], vocab_size=c["vocab_size"])  # fmt: skip


def _bert_config(kw: dict, vocab_size: int) -> dict:
    p = kw.get("dropout", 0.1)
    return dict(num_hidden_layers=kw["n_layer"], num_attention_heads=kw["n_head"], hidden_size=kw["hidden_size"],
                intermediate_size=kw["intermediate_size"], max_position_embeddings=kw["n_positions"],
                type_vocab_size=kw.get("type_vocab_size", 2), hidden_dropout_prob=p, attention_probs_dropout_prob=p,
                hidden_act="gelu", layer_norm_eps=kw.get("layer_norm_eps", 1e-12), position_embedding_type="absolute",
                vocab_size=vocab_size)  # fmt: skip


def _t5_kwargs(c: dict) -> dict:
    return dict(n_layer=c["num_layers"], n_decoder_layer=c["num_decoder_layers"] or c["num_layers"],
                n_head=c["num_heads"], d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"],
                relative_attention_num_buckets=c["relative_attention_num_buckets"],
                relative_attention_max_distance=c["relative_attention_max_distance"],
                dropout=c["dropout_rate"], layer_norm_epsilon=c["layer_norm_epsilon"],
                vocab_size=c["vocab_size"])  # fmt: skip


def _t5_config(kw: dict, vocab_size: int) -> dict:
    return dict(num_layers=kw["n_layer"], num_decoder_layers=kw.get("n_decoder_layer") or kw["n_layer"],
                num_heads=kw["n_head"], d_model=kw["d_model"], d_kv=kw["d_kv"], d_ff=kw["d_ff"],
                relative_attention_num_buckets=kw.get("relative_attention_num_buckets", 32),
                relative_attention_max_distance=kw.get("relative_attention_max_distance", 128),
                dropout_rate=kw.get("dropout", 0.1), layer_norm_epsilon=kw.get("layer_norm_epsilon", 1e-6),
                feed_forward_proj="relu", is_encoder_decoder=True, tie_word_embeddings=True,
                vocab_size=vocab_size)  # fmt: skip


FAMILIES = {
    "gpt2": Family(
        model_type="gpt2",
        name="GPT-2",
        backbone="lmforge.models.gpt.GPT",
        architectures={
            CAUSAL_LM: "GPT2LMHeadModel",
            SEQUENCE_CLASSIFICATION: "GPT2ForSequenceClassification",
            TOKEN_CLASSIFICATION: "GPT2ForTokenClassification",
            QUESTION_ANSWERING: "GPT2ForQuestionAnswering",
        },
        prefixes={"*": ""},
        bare_prefix="transformer.",
        heads={
            SEQUENCE_CLASSIFICATION: {"head.": "score."},
            TOKEN_CLASSIFICATION: {"head.": "classifier."},
            QUESTION_ANSWERING: {"head.": "qa_outputs."},
        },
        to_kwargs=_gpt2_kwargs,
        to_config=_gpt2_config,
        transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
        aliases=("lm_head.weight",),
        skipped=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers of older checkpoints
    ),
    "bert": Family(
        model_type="bert",
        name="BERT",
        backbone="lmforge.models.bert.Bert",
        architectures={
            MASKED_LM: "BertForMaskedLM",
            SEQUENCE_CLASSIFICATION: "BertForSequenceClassification",
            TOKEN_CLASSIFICATION: "BertForTokenClassification",
            QUESTION_ANSWERING: "BertForQuestionAnswering",
            None: "BertModel",
        },
        prefixes={"BertModel": "", "*": "bert."},
        heads={
            MASKED_LM: {
                "head.dense.": "cls.predictions.transform.dense.",
                "head.LayerNorm.": "cls.predictions.transform.LayerNorm.",
                "head.decoder.bias": "cls.predictions.bias",
            },
            SEQUENCE_CLASSIFICATION: {"head.": "classifier."},
            TOKEN_CLASSIFICATION: {"head.": "classifier."},
            QUESTION_ANSWERING: {"head.": "qa_outputs."},
        },
        to_kwargs=_bert_kwargs,
        to_config=_bert_config,
        aliases=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
        skipped=("embeddings.position_ids",),
    ),
    "t5": Family(
        model_type="t5",
        name="T5",
        backbone="lmforge.models.t5.T5",
        architectures={SEQ2SEQ_LM: "T5ForConditionalGeneration", None: "T5ForConditionalGeneration"},
        prefixes={"*": ""},
        heads={},
        to_kwargs=_t5_kwargs,
        to_config=_t5_config,
        aliases=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"),
    ),
}


def family_of_backbone(target: str) -> Family | None:
    """The family whose backbone class is ``target`` (a model config's ``_target_``), or None."""
    return next((f for f in FAMILIES.values() if f.backbone == target), None)


def family_of_config(config: dict, where: str) -> Family:
    """The family of a Hugging Face config.json; an unsupported ``model_type`` is one clear error."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise LmforgeError(f"{where} holds a {model_type!r} model; lmforge loads the {', '.join(FAMILIES)} families.")
    return FAMILIES[model_type]


def _old_layer_norm_name(name: str) -> str:
    """Early BERT checkpoints name LayerNorm parameters gamma/beta."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _backbone_prefix(family: Family, hf_state: dict[str, torch.Tensor]) -> str:
    """Which prefix (``transformer.``, ``bert.`` or none) this checkpoint's backbone names carry."""
    for prefix in sorted(set(family.prefixes.values()), key=len, reverse=True):
        if prefix and any(name.startswith(prefix) for name in hf_state):
            return prefix
    return ""


def import_state(family: Family, hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a Hugging Face state dict to lmforge task names (``backbone.*``, ``head.*``).

    Returns:
        the renamed tensors (every head kind the checkpoint has), and the Hugging Face names
        that have no lmforge counterpart (for example BERT's next-sentence head).
    """
    prefix = _backbone_prefix(family, hf_state)
    head_names = {hf: ours for head in family.heads.values() for ours, hf in head.items()}
    state, unused = {}, []
    for hf_name, tensor in hf_state.items():
        name = _old_layer_norm_name(hf_name)
        if name in family.aliases or name.endswith(family.skipped):
            continue
        head = next((hf for hf in head_names if name.startswith(hf)), None)
        if head is not None:
            state[head_names[head] + name[len(head) :]] = tensor
        elif name.startswith(prefix) and not name.startswith(_OTHER_HEADS):
            ours = name[len(prefix) :]
            if not ours.startswith(family.bare_prefix):
                ours = family.bare_prefix + ours
            state["backbone." + ours] = tensor.t() if ours.endswith(family.transposed) else tensor
        else:
            unused.append(hf_name)
    return state, unused


def export_state(family: Family, task_state: dict[str, torch.Tensor], head_kind: str | None) -> dict[str, torch.Tensor]:
    """Rename an lmforge task state dict (``backbone.*``, ``head.*``) to the Hugging Face class of ``head_kind``.

    Tied aliases are left out (Hugging Face ties them again on load); a head the class has no
    place for is an error rather than silently dropped.
    """
    architecture = family.architectures[head_kind]
    prefix = family.prefixes.get(architecture, family.prefixes["*"])
    head_map = family.heads.get(head_kind, {})
    out = {}
    for name, tensor in task_state.items():
        tensor = tensor.detach().contiguous()
        if name.startswith("backbone."):
            ours = name[len("backbone.") :]
            if architecture in ("BertForMaskedLM", "BertForTokenClassification") and ours.startswith("pooler."):
                continue  # these classes have no pooler
            if ours in family.aliases:
                continue
            out[prefix + ours] = tensor.t().contiguous() if ours.endswith(family.transposed) else tensor
            continue
        ours = next((o for o in head_map if name.startswith(o)), None)
        if ours is None:
            raise LmforgeError(f"{name} has no place in {architecture}; this run's head cannot be exported.")
        out[head_map[ours] + name[len(ours) :]] = tensor
    return out


def read_hf_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the weights (safetensors, else a ``.bin`` read with ``weights_only=True``) of a folder."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LmforgeError(f"{folder} is not a Hugging Face model folder (no config.json in it).")
    config = json.loads(config_file.read_text())
    state: dict[str, torch.Tensor] = {}
    shards = sorted(folder.glob("*.safetensors"))
    try:
        if shards:
            from safetensors.torch import load_file

            for shard in shards:
                state.update(load_file(shard))
        else:
            bins = sorted(folder.glob("pytorch_model*.bin"))
            if not bins:
                raise LmforgeError(f"{folder} has a config.json but no weights (*.safetensors or pytorch_model.bin).")
            for shard in bins:
                state.update(torch.load(shard, map_location="cpu", weights_only=True))
    except LmforgeError:
        raise
    except Exception as err:  # truncated or foreign files raise many types
        raise LmforgeError(f"The weights in {folder} cannot be read ({type(err).__name__}: {err}).") from err
    return config, state
