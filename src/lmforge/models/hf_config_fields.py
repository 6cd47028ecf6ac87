"""Which fields of a Hugging Face ``config.json`` lmforge honours, refuses unless they hold a value it computes
the same way, or may ignore because they cannot change what the backbone computes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Field:
    """A config.json field that changes what the backbone computes from its weights.

    Args:
        default: Hugging Face's value where config.json leaves the field out (transformers 4 saved
            only the fields that differ from it).
        supported: None where lmforge honours the field (the family's ``to_kwargs`` passes it to the
            backbone); else the values lmforge computes as Hugging Face does, or a function of the
            whole config that gives them. Any other value is refused.
        says: what a refusal names as supported; ``{0!r}`` is the first supported value.
    """

    default: Any
    supported: tuple | Callable[[dict], tuple] | None = None
    says: str = "{0!r}"


def _only(*values: Any) -> Field:
    """A field lmforge computes one way: the values in ``values`` (the first is Hugging Face's default)."""
    return Field(values[0], values)


def _inert(*names: str) -> dict[str, None]:
    return dict.fromkeys(names)


# Every field of transformers' GPT2Config, BertConfig and T5Config (and of their PretrainedConfig base,
# including fields older versions wrote): a Field without ``supported`` is honoured, a Field with it is
# refused unless its value is supported, None cannot change the computation. A family's entry overrides
# the one in "*". tests/test_pretrained.py fails on any field of the installed transformers missing here.
CONFIG_FIELDS: dict[str, dict[str, Field | None]] = {
    "*": {
        # Bookkeeping: which class and library wrote the file, and in which dtype (lmforge picks its own).
        **_inert("_name_or_path", "architectures", "model_type", "transformers_version", "_commit_hash", "dtype",
                 "torch_dtype", "use_bfloat16"),
        # What forward() returns or keeps, and how it is run: the same sums either way.
        **_inert("use_cache", "output_past", "return_dict", "output_attentions", "output_hidden_states",
                 "torchscript", "chunk_size_feed_forward", "gradient_checkpointing", "_attn_implementation",
                 "_attn_implementation_autoset", "tf_legacy_loss"),
        # Token ids, labels and task names: the tokenizer's and the lmforge task's business, not the backbone's.
        **_inert("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
                 "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "tokenizer_class",
                 "prefix", "task_specific_params"),
        # Generation settings: how tokens are chosen from the logits, never the logits themselves.
        **_inert("max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
                 "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
                 "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
                 "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
                 "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
                 "suppress_tokens", "begin_suppress_tokens"),
        # Only read by EncoderDecoderModel, or by BERT and GPT-2 (which refuse them below).
        **_inert("is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
                 "tie_encoder_decoder"),
        "pruned_heads": _only({}),  # pruned heads have other shapes
    },
    "gpt2": {
        **{k: Field(v) for k, v in dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                        n_inner=None, resid_pdrop=0.1, layer_norm_epsilon=1e-5,
                                        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False).items()},
        # lmforge's MLP is GELU with the tanh approximation, which both names compute.
        "activation_function": _only("gelu_new", "gelu_pytorch_tanh"),
        # One dropout rate for embeddings, attention weights and residuals.
        "embd_pdrop": Field(0.1, lambda c: (c["resid_pdrop"],), "{0!r}, the value of resid_pdrop (one dropout rate)"),
        "attn_pdrop": Field(0.1, lambda c: (c["resid_pdrop"],), "{0!r}, the value of resid_pdrop (one dropout rate)"),
        # An fp32 upcast of the attention scores (the same logits in fp32, others in half precision).
        "reorder_and_upcast_attn": _only(False),
        "add_cross_attention": _only(False),  # lmforge's GPT has no cross-attention layers
        "tie_word_embeddings": _only(True),  # the output head is the token embedding table
        # Initialisation, the context length of very old files, and GPT2DoubleHeadsModel's multiple-choice head.
        **_inert("initializer_range", "n_ctx", "summary_type", "summary_use_proj", "summary_activation",
                 "summary_proj_to_labels", "summary_first_dropout"),
    },
    "bert": {
        **{k: Field(v) for k, v in dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                        num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                                        type_vocab_size=2, hidden_dropout_prob=0.1, layer_norm_eps=1e-12).items()},
        "hidden_act": _only("gelu"),  # exact GELU, in the blocks and in the masked-LM head
        "attention_probs_dropout_prob": Field(
            0.1, lambda c: (c["hidden_dropout_prob"],), "{0!r}, the value of hidden_dropout_prob (one dropout rate)"
        ),
        "position_embedding_type": _only("absolute"),  # learned absolute positions, no relative scores
        "is_decoder": _only(False),  # a decoder BERT attends causally
        "add_cross_attention": _only(False),
        "tie_word_embeddings": _only(True),  # the masked-LM head's decoder is the token embedding table
        # Initialisation, and the dropout of Hugging Face's classification heads (lmforge's tasks bring their own).
        **_inert("initializer_range", "classifier_dropout"),
    },
    "t5": {
        **{k: Field(v) for k, v in dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                        num_decoder_layers=None, num_heads=8, relative_attention_num_buckets=32,
                                        relative_attention_max_distance=128, dropout_rate=0.1,
                                        layer_norm_epsilon=1e-6).items()},
        # T5 v1: a ReLU feed-forward network and a tied output head fed states scaled by d_model ** -0.5
        # (v1.1 and flan-t5 use gated GELU, an untied head and no scaling).
        "feed_forward_proj": _only("relu"),
        "dense_act_fn": _only("relu"),
        "is_gated_act": _only(False),
        "tie_word_embeddings": _only(True),
        "scale_decoder_outputs": _only(True),
        # Initialisation, Hugging Face's classification head, and a length limit of old files (T5 has no position table).
        **_inert("initializer_factor", "classifier_dropout", "n_positions"),
    },
}  # fmt: skip


def field_rule(model_type: str, key: str) -> Field | None:
    """How lmforge treats config.json field ``key`` of a family (KeyError when nobody classified it)."""
    table = CONFIG_FIELDS[model_type]
    return table[key] if key in table else CONFIG_FIELDS["*"][key]


def unclassified_fields(model_type: str, config: dict) -> list[str]:
    """Fields of a config.json that CONFIG_FIELDS does not know (a later transformers may have added them)."""
    return sorted(set(config) - set(CONFIG_FIELDS["*"]) - set(CONFIG_FIELDS[model_type]))


def checked_config(model_type: str, family_name: str, config: dict) -> dict:
    """config.json with Hugging Face's defaults filled in, once every value lmforge computes differently is refused."""
    rules = {**CONFIG_FIELDS["*"], **CONFIG_FIELDS[model_type]}
    full = {key: rule.default for key, rule in rules.items() if rule is not None} | config
    for key, rule in rules.items():
        if rule is None or rule.supported is None:
            continue
        supported = rule.supported(full) if callable(rule.supported) else rule.supported
        if full[key] not in supported:
            raise LmforgeError(
                f"This {family_name} checkpoint has {key}={full[key]!r}; "
                f"lmforge's {family_name} supports {rule.says.format(*supported)}."
            )
    return full
