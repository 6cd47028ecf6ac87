"""The backbone contract (lmforge.models.backbone): every model config builds a Backbone of a known kind, tasks
refuse the wrong kind in one sentence and freeze a pooler they do not read, and the fine-tuning hooks reach
the backbones through their one seam each."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torchmetrics import MeanMetric

from lmforge.config_dirs import CONF_DIR
from lmforge.errors import LmforgeError
from lmforge.models.backbone import KINDS, Backbone, Seq2SeqBackbone, backbone_kind
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.models.rnn import RNN
from lmforge.models.rnn_seq2seq import RNNSeq2Seq
from lmforge.models.t5 import T5
from lmforge.models.transformer import Transformer
from lmforge.models.tuning import PrefixableAttention
from lmforge.tasks.base import TaskModule
from lmforge.tasks.classification import ClassificationTask
from lmforge.tasks.language_modeling import LanguageModelingTask
from lmforge.tasks.question_answering import QuestionAnsweringTask
from lmforge.tasks.token_classification import TokenClassificationTask

OPTIMIZER = functools.partial(torch.optim.AdamW)
V = 40


def tiny(kind: str) -> Backbone:
    """A small backbone of each class, seeded."""
    torch.manual_seed(0)
    return {
        "gpt": lambda: GPT(V, n_layer=1, n_head=2, n_embd=16, n_positions=32),
        "bert": lambda: Bert(V, n_layer=1, n_head=2, hidden_size=16, intermediate_size=32, n_positions=32),
        "t5": lambda: T5(V, n_layer=1, n_head=2, d_model=16, d_kv=8, d_ff=32),
        "transformer": lambda: Transformer(V, n_layer=1, n_head=2, d_model=16, d_ff=32),
        "rnn": lambda: RNN(V, hidden_size=8, embedding_size=8),
        "rnn-seq2seq": lambda: RNNSeq2Seq(V, hidden_size=8, embedding_size=8),
    }[kind]()


MODEL_CONFIGS = sorted((CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=[p.stem for p in MODEL_CONFIGS])
def test_every_model_config_builds_a_backbone_whose_kind_reads_from_the_class(path):
    cls = get_class(OmegaConf.load(path)["_target_"])
    assert issubclass(cls, Backbone)
    assert cls.kind in KINDS and backbone_kind(cls) == cls.kind
    assert issubclass(cls, Seq2SeqBackbone) == (cls.kind == "seq2seq")


@pytest.mark.parametrize("name", ["gpt", "bert", "t5", "transformer", "rnn", "rnn-seq2seq"])
def test_every_backbone_has_the_declared_members(name):
    backbone = tiny(name)
    assert backbone.hidden_size > 0
    assert backbone.word_embeddings.num_embeddings == V
    assert (backbone.pooler is not None) == (name == "bert")
    assert backbone.prompt is None
    # Decoders and encoder-decoders decode a token at a time; encoders and RNNs have no cache.
    assert (backbone.new_cache() is not None) == (backbone.kind in ("decoder", "seq2seq"))
    assert backbone.supports_prompt == (name in ("gpt", "bert", "t5"))


def test_a_backbone_without_a_valid_kind_is_refused_where_it_is_defined():
    with pytest.raises(TypeError, match="kind must be one of encoder, decoder, seq2seq, rnn"):

        class Unnamed(Backbone):
            kind = "convolution"

    assert backbone_kind(torch.nn.Linear(2, 2)) is None


def test_a_task_refuses_a_backbone_of_the_wrong_kind_in_one_sentence():
    with pytest.raises(LmforgeError) as refused:
        LanguageModelingTask(tiny("bert"), OPTIMIZER)
    message = str(refused.value)
    assert message == "LanguageModelingTask needs a decoder backbone; model Bert is an encoder."
    with pytest.raises(LmforgeError, match="ClassificationTask needs an encoder or a decoder or an RNN backbone"):
        ClassificationTask(tiny("t5"), num_classes=2, optimizer=OPTIMIZER)


def pooler_trains(task: TaskModule) -> bool:
    return any(p.requires_grad for p in task.backbone.pooler.parameters())


def test_a_pooler_trains_only_for_the_task_that_reads_it():
    """A frozen pooler gets no gradient, so DDP does not need find_unused_parameters."""
    assert pooler_trains(ClassificationTask(tiny("bert"), 2, OPTIMIZER, pooling="cls"))
    unused = [
        ClassificationTask(tiny("bert"), 2, OPTIMIZER, pooling="mean"),
        TokenClassificationTask(tiny("bert"), 3, OPTIMIZER),
        QuestionAnsweringTask(tiny("bert"), OPTIMIZER, max_length=32),
    ]
    ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for task in unused:
        assert not pooler_trains(task), type(task).__name__
        out = task(ids, mask)
        sum(o.sum() for o in (out if isinstance(out, tuple) else [out])).backward()
        no_gradient = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
        assert not no_gradient, (type(task).__name__, no_gradient)


def test_log_epoch_scores_logs_the_loss_and_every_score_then_resets():
    logged = {}

    class Task(TaskModule):
        def log(self, name, value, prog_bar=False, **kwargs):
            logged[name] = (float(value), prog_bar)

        def log_dict(self, values, prog_bar=False, **kwargs):
            for name, value in values.items():
                self.log(name, value, prog_bar)

    task = Task(OPTIMIZER)
    loss, acc = MeanMetric(), MeanMetric()
    loss.update(torch.tensor([1.0, 3.0]))
    acc.update(torch.tensor(0.5))
    returned = task.log_epoch_scores("val", loss, {"accuracy": acc}, rename={"accuracy": "acc"})
    assert float(returned) == 2.0
    assert logged == {"val/loss": (2.0, True), "val/acc": (0.5, True)}
    assert not loss.update_called and not acc.update_called  # reset for the next epoch


# The self-attention layers of each backbone, as its model config names them for finetune=prefix.
SELF_ATTENTION = {
    "gpt": r".*\.attn",
    "bert": r".*attention\.self",
    "t5": r".*SelfAttention",
    "transformer": r".*self_attn",
}


@pytest.mark.parametrize("name", list(SELF_ATTENTION))
def test_prefix_tuning_reaches_the_self_attention_layers_alone(name):
    from lmforge.finetune import Prefix

    backbone = tiny(name)
    Prefix(length=2).apply(backbone, {"self_attention": SELF_ATTENTION[name]}, name)
    extended = [n for n, m in backbone.named_modules() if isinstance(m, PrefixableAttention) and m.prefix is not None]
    assert extended and all("cross" not in n and "EncDec" not in n for n in extended)
    assert {n for n, p in backbone.named_parameters() if p.requires_grad} == {
        f"{n}.prefix.{w}" for n in extended for w in ("keys", "values")
    }


def test_prompt_tuning_needs_a_backbone_that_reads_a_prompt():
    from lmforge.finetune import Prompt

    with pytest.raises(LmforgeError, match="finetune=prompt needs a Transformer backbone"):
        Prompt(length=2).apply(tiny("transformer"), None, "transformer")
    with pytest.raises(TypeError, match="RNN takes no soft prompt"):
        tiny("rnn").set_prompt(None)
    gpt = tiny("gpt")
    Prompt(length=3).apply(gpt, None, "gpt2")
    assert gpt.prompt.length == 3
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(2))
    assert gpt.hidden_states(ids).shape == (2, 5, gpt.hidden_size)  # the prompt's positions are left out


def test_one_ignore_label_for_data_and_tasks():
    from lmforge.data import labels, seq2seq, token_classification
    from lmforge.tasks import masked_lm

    assert labels.IGNORE == -100
    assert seq2seq.IGNORE is token_classification.IGNORE is masked_lm.IGNORE is labels.IGNORE
