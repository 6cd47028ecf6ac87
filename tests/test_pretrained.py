"""Hugging Face checkpoints in: random-initialised transformers models saved with save_pretrained load
into the lmforge backbones (and heads) with the same logits on real sentences."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from torch import nn

from conftest import DATA_DIR, requires_data
from lmforge.compose.parts import build_backbone
from lmforge.data.tokenizers import gpt2_tokenizer, wordpiece_tokenizer
from lmforge.errors import LmforgeError
from lmforge.hub.pretrained import resolve_pretrained
from lmforge.models.hf_config_fields import field_rule
from lmforge.models.pretrained import FAMILIES, backbone_kwargs, import_state
from lmforge.tasks.masked_lm import MaskedLMHead

transformers = pytest.importorskip("transformers")
pytestmark = requires_data


def sst2_sentences(n: int = 12) -> list[str]:
    """The first SST-2 validation sentences (real text for the parity checks)."""
    with open(Path(DATA_DIR) / "glue/sst2/validation.tsv", encoding="utf-8") as f:
        return [row["sentence"] for _, row in zip(range(n), csv.DictReader(f, delimiter="\t"))]


def padded(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids (padding id 0) and their mask."""
    rows = [e.ids for e in tokenizer.encode_batch(texts)]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def gpt2_files() -> str:
    return str(Path(DATA_DIR) / "tokenizers/gpt2")


def bert_vocab() -> str:
    return str(Path(DATA_DIR) / "tokenizers/bert-base-uncased/vocab.txt")


def saved(model, folder: Path) -> Path:
    """``save_pretrained`` into ``folder`` (as a user's local checkpoint would be)."""
    model.save_pretrained(folder)
    return folder


def lmforge_model(cfg_factory, model: str, folder: Path, head: type[nn.Module] | None = None) -> nn.Module:
    """Build ``model=<model> model.pretrained=<folder>`` as a run would: a holder with the backbone (and head)."""
    cfg = cfg_factory([f"model={model}", f"model.pretrained={folder}"])
    weights = resolve_pretrained(cfg.model, cfg.paths.data_dir)
    with open_dict(cfg):
        cfg.model.update(weights.model_overrides())
    holder = nn.Module()
    holder.backbone = build_backbone(cfg.model, weights.config["vocab_size"]).eval()
    if head is not None:
        holder.head = head.for_backbone(holder.backbone).eval()
    message = weights.load_into(holder)
    holder.message = message
    return holder


def test_gpt2_checkpoint_gives_hf_logits(cfg_factory, tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = lmforge_model(cfg_factory, "gpt2", saved(hf, tmp_path / "gpt2"))
    assert "loaded 28 backbone and 0 head tensors; newly initialised: none; not used from the checkpoint: none" in (
        ours.message
    )
    ids, mask = padded(gpt2_tokenizer(local_dir=gpt2_files()), sst2_sentences())
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours.backbone(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_bert_masked_lm_checkpoint_gives_hf_hidden_states_and_logits(cfg_factory, tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                     intermediate_size=128, vocab_size=30522, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)  # fmt: skip
    hf = transformers.BertForMaskedLM(config).eval()
    ours = lmforge_model(cfg_factory, "bert-mini", saved(hf, tmp_path / "bert"), head=MaskedLMHead)
    assert "loaded 37 backbone and 5 head tensors" in ours.message
    assert "newly initialised: backbone.pooler (2)" in ours.message  # BertForMaskedLM has no pooler
    ids, mask = padded(wordpiece_tokenizer(vocab_file=bert_vocab()), sst2_sentences())
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = ours.backbone(ids, mask)
        logits = ours.head(hidden)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], expected.hidden_states[-1][real], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[real], expected.logits[real], atol=1e-4, rtol=0)


def test_t5_checkpoint_gives_hf_logits(cfg_factory, tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(num_layers=2, num_decoder_layers=2, num_heads=4, d_model=64, d_kv=16, d_ff=128,
                                   vocab_size=50257, dropout_rate=0.0, feed_forward_proj="relu",
                                   decoder_start_token_id=0)  # fmt: skip
    hf = transformers.T5ForConditionalGeneration(config).eval()
    ours = lmforge_model(cfg_factory, "t5-small", saved(hf, tmp_path / "t5"))
    ids, mask = padded(gpt2_tokenizer(local_dir=gpt2_files()), sst2_sentences(6))
    targets, _ = padded(gpt2_tokenizer(local_dir=gpt2_files()), sst2_sentences(12)[6:])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=targets).logits
        got = ours.backbone(ids, mask, targets)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_old_bert_names_and_unknown_heads_are_handled():
    state = {"bert.embeddings.LayerNorm.gamma": torch.ones(2), "bert.embeddings.LayerNorm.beta": torch.zeros(2),
             "cls.seq_relationship.weight": torch.ones(2, 2), "bert.embeddings.position_ids": torch.arange(2)}  # fmt: skip
    renamed, unused = import_state(FAMILIES["bert"], state)
    assert set(renamed) == {"backbone.embeddings.LayerNorm.weight", "backbone.embeddings.LayerNorm.bias"}
    assert unused == ["cls.seq_relationship.weight"]


def test_a_checkpoint_of_another_family_is_one_sentence(cfg_factory, tmp_path):
    config = transformers.BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
                                     intermediate_size=32, vocab_size=100)  # fmt: skip
    folder = saved(transformers.BertModel(config), tmp_path / "bert")
    cfg = cfg_factory(["model=gpt2", f"model.pretrained={folder}"])
    with pytest.raises(LmforgeError, match="holds a bert model, but model=gpt2 is a gpt2 backbone"):
        resolve_pretrained(cfg.model, cfg.paths.data_dir)


def test_unsupported_variants_and_missing_weights_are_one_sentence(cfg_factory, tmp_path):
    config = transformers.T5Config(num_layers=1, d_model=16, d_kv=4, d_ff=32, num_heads=4, vocab_size=100,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # fmt: skip
    folder = saved(transformers.T5ForConditionalGeneration(config), tmp_path / "t5v11")
    cfg = cfg_factory(["model=t5-small", f"model.pretrained={folder}"])
    with pytest.raises(LmforgeError, match="feed_forward_proj='gated-gelu'; lmforge's T5 supports 'relu'"):
        resolve_pretrained(cfg.model, cfg.paths.data_dir).model_overrides()
    (folder / "model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="has a config.json but no weights"):
        resolve_pretrained(cfg.model, cfg.paths.data_dir)


def test_auto_offline_trains_from_scratch_and_required_is_an_error(cfg_factory, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_factory(["model=gpt2"])
    assert cfg.model.pretrained == "auto"
    with caplog.at_level("INFO", logger="lmforge"):
        assert resolve_pretrained(cfg.model, cfg.paths.data_dir) is None
    assert "no pretrained weights" in caplog.text and "training from scratch" in caplog.text
    cfg = cfg_factory(["model=gpt2", "model.pretrained=required"])
    with pytest.raises(LmforgeError, match="model.pretrained=required, but gpt2 has no weights available"):
        resolve_pretrained(cfg.model, cfg.paths.data_dir)
    cfg = cfg_factory(["model=lstm", "+model.pretrained=auto"])
    with pytest.raises(LmforgeError, match="model lstm has no public checkpoint format"):
        resolve_pretrained(cfg.model, cfg.paths.data_dir)


def test_gpt2_tokenizer_gives_transformers_ids_on_sst2_validation():
    files = Path(gpt2_files())
    theirs = transformers.GPT2TokenizerFast(str(files / "vocab.json"), str(files / "merges.txt"))
    ours = gpt2_tokenizer(local_dir=gpt2_files())
    assert len(theirs) == ours.get_vocab_size() == 50257
    sentences = sst2_sentences(872)
    assert len(sentences) == 872
    for sentence in sentences:
        assert ours.encode(sentence).ids == theirs(sentence)["input_ids"], sentence


def test_a_hub_id_fetches_config_one_weights_format_and_tokenizer(cfg_factory, tmp_path, monkeypatch):
    """Online, model.pretrained=<hub id> asks the hub for config, safetensors (not also .bin) and tokenizer files."""
    import huggingface_hub

    import lmforge.hub.pretrained as pw

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257)
    folder = saved(transformers.GPT2LMHeadModel(config), tmp_path / "snapshot")
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "vocab.json", "merges.txt"]
    asked = {}

    class FakeApi:
        def list_repo_files(self, repo_id):
            return files

    def fake_snapshot(repo_id, allow_patterns):
        asked.update(repo=repo_id, patterns=allow_patterns)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(pw, "hub_reachable", lambda: True)
    cfg = cfg_factory(["model=gpt2", "model.pretrained=some-user/tiny-gpt2"])
    weights = resolve_pretrained(cfg.model, cfg.paths.data_dir)
    assert asked == {"repo": "some-user/tiny-gpt2",
                     "patterns": ["config.json", "model.safetensors", "vocab.json", "merges.txt"]}  # fmt: skip
    assert weights.model_overrides()["n_layer"] == 1 and weights.source == str(folder)


# Config fields: every field of transformers' configs is honoured, refused or inert (models/hf_config_fields.py CONFIG_FIELDS).

CONFIG_CLASSES = {"gpt2": "GPT2Config", "bert": "BertConfig", "t5": "T5Config"}


@pytest.mark.parametrize("model_type", CONFIG_CLASSES)
def test_every_transformers_config_field_is_classified(model_type):
    """A field the installed transformers has and CONFIG_FIELDS lacks fails here, named; the defaults the table
    fills in for fields a config.json leaves out are transformers' own."""
    config_class = getattr(transformers, CONFIG_CLASSES[model_type])
    fields = set(config_class().to_dict()) | set(transformers.PretrainedConfig().to_dict())
    unclassified = []
    for key in sorted(fields):
        try:
            field_rule(model_type, key)
        except KeyError:
            unclassified.append(key)
    assert not unclassified, (
        f"{config_class.__name__} fields missing from CONFIG_FIELDS in models/hf_config_fields.py: {unclassified}"
    )
    for key, parameter in inspect.signature(config_class.__init__).parameters.items():
        rule = field_rule(model_type, key) if key in fields else None
        if rule is not None and parameter.default is not inspect.Parameter.empty:
            assert rule.default == parameter.default, key


# name -> (transformers config class, model class, lmforge model config, tiny non-default-free settings).
TINY = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "gpt2",
             dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, initializer_range=0.2)),
    "bert": ("BertConfig", "BertModel", "bert-mini",
             dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64, vocab_size=100,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)),
    "t5": ("T5Config", "T5ForConditionalGeneration", "t5-small",
           dict(num_layers=2, num_heads=2, d_model=32, d_kv=16, d_ff=64, vocab_size=100, dropout_rate=0.0,
                decoder_start_token_id=0)),
}  # fmt: skip


def tiny_hf(model_type: str, **fields) -> nn.Module:
    """A random transformers model of the family, with ``fields`` on top of the TINY settings."""
    config_class, model_class, _, settings = TINY[model_type]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**settings | fields)).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 12) random ids, right-padded to lengths 12, 9 and 5."""
    ids = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(12)[None] < torch.tensor([12, 9, 5])[:, None]).long()
    return ids * mask, mask


def hf_output(model_type: str, hf: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What lmforge's backbone forward returns: GPT-2 and T5 logits (T5's decoder reads ``ids``), BERT's states."""
    with torch.no_grad():
        if model_type == "t5":
            return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits
        out = hf(input_ids=ids, attention_mask=mask)
        return out.logits if model_type == "gpt2" else out.last_hidden_state


@pytest.mark.parametrize(
    "model_type, fields",
    [
        ("gpt2", dict(layer_norm_epsilon=0.1)),
        ("gpt2", dict(scale_attn_weights=False)),
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
        ("gpt2", dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)),
        ("gpt2", dict(n_inner=48)),
        ("bert", dict(layer_norm_eps=0.1)),
        ("t5", dict(layer_norm_epsilon=0.1)),
        ("t5", dict(relative_attention_num_buckets=8, relative_attention_max_distance=16)),
    ],
    ids=str,
)
def test_honoured_fields_give_transformers_outputs(cfg_factory, tmp_path, model_type, fields):
    hf = tiny_hf(model_type, **fields)
    ids, mask = batch()
    expected = hf_output(model_type, hf, ids, mask)
    # The value matters to transformers: the same weights with the default compute something else.
    baseline = tiny_hf(model_type)
    if all(t.shape == baseline.state_dict()[n].shape for n, t in hf.state_dict().items()):
        baseline.load_state_dict(hf.state_dict())
        assert not torch.allclose(hf_output(model_type, baseline, ids, mask), expected, atol=1e-3)
    ours = lmforge_model(cfg_factory, TINY[model_type][2], saved(hf, tmp_path / model_type))
    assert "newly initialised: none; not used from the checkpoint: none" in ours.message
    with torch.no_grad():
        got = ours.backbone(ids, mask, ids) if model_type == "t5" else ours.backbone(ids, mask)
    real = mask.bool() if model_type != "t5" else slice(None)
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def with_fields(folder: Path, **fields) -> Path:
    """Change config.json entries of a saved checkpoint (as a hand-edited or other-tool checkpoint has them)."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))
    return folder


@pytest.mark.parametrize(
    "model_type, fields, message",
    [
        ("gpt2", dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=True; lmforge's GPT-2 supports False"),
        ("gpt2", dict(activation_function="relu"), "activation_function='relu'; lmforge's GPT-2 supports 'gelu_new'"),
        (
            "gpt2",
            dict(attn_pdrop=0.2),
            "attn_pdrop=0.2; lmforge's GPT-2 supports 0.0, the value of resid_pdrop (one dropout rate)",
        ),
        ("gpt2", dict(tie_word_embeddings=False), "tie_word_embeddings=False; lmforge's GPT-2 supports True"),
        ("gpt2", dict(add_cross_attention=True), "add_cross_attention=True; lmforge's GPT-2 supports False"),
        ("gpt2", dict(pruned_heads={"0": [1]}), "pruned_heads={'0': [1]}; lmforge's GPT-2 supports {}"),
        ("bert", dict(hidden_act="relu"), "hidden_act='relu'; lmforge's BERT supports 'gelu'"),
        (
            "bert",
            dict(position_embedding_type="relative_key"),
            "position_embedding_type='relative_key'; lmforge's BERT supports 'absolute'",
        ),
        ("bert", dict(is_decoder=True), "is_decoder=True; lmforge's BERT supports False"),
        (
            "bert",
            dict(attention_probs_dropout_prob=0.3),
            "attention_probs_dropout_prob=0.3; lmforge's BERT supports 0.0, the value of hidden_dropout_prob "
            "(one dropout rate)",
        ),
        ("t5", dict(scale_decoder_outputs=False), "scale_decoder_outputs=False; lmforge's T5 supports True"),
        ("t5", dict(dense_act_fn="gelu_new"), "dense_act_fn='gelu_new'; lmforge's T5 supports 'relu'"),
    ],
    ids=str,
)
def test_refused_values_are_one_sentence(cfg_factory, tmp_path, model_type, fields, message):
    folder = with_fields(saved(tiny_hf(model_type), tmp_path / model_type), **fields)
    cfg = cfg_factory([f"model={TINY[model_type][2]}", f"model.pretrained={folder}"])
    weights = resolve_pretrained(cfg.model, cfg.paths.data_dir)
    name = weights.family.name
    with pytest.raises(LmforgeError) as refused:
        weights.model_overrides()
    assert str(refused.value) == f"This {name} checkpoint has {message}."


@pytest.mark.parametrize("model_type", CONFIG_CLASSES)
def test_a_config_of_changed_fields_only_reads_as_the_full_one(model_type):
    """transformers 4 saved only the fields that differ from the class defaults: the table fills in the rest,
    and export writes every honoured field back."""
    config_class, _, _, settings = TINY[model_type]
    eps = {"gpt2": "layer_norm_epsilon", "bert": "layer_norm_eps", "t5": "layer_norm_epsilon"}[model_type]
    full = getattr(transformers, config_class)(**settings, **{eps: 0.1}).to_dict()
    defaults = getattr(transformers, config_class)().to_dict()
    changed = {k: v for k, v in full.items() if k == "model_type" or defaults.get(k) != v}
    family = FAMILIES[model_type]
    kwargs = backbone_kwargs(family, full)
    assert backbone_kwargs(family, changed) == kwargs and kwargs[eps] == 0.1
    assert (
        backbone_kwargs(family, family.to_config(kwargs, kwargs["vocab_size"]) | {"model_type": model_type}) == kwargs
    )


def test_an_unknown_config_field_is_logged(cfg_factory, tmp_path, caplog):
    folder = with_fields(saved(tiny_hf("gpt2"), tmp_path / "gpt2"), some_future_field=1)
    cfg = cfg_factory(["model=gpt2", f"model.pretrained={folder}"])
    with caplog.at_level("WARNING", logger="lmforge"):
        resolve_pretrained(cfg.model, cfg.paths.data_dir).model_overrides()
    assert f"{folder}: config.json fields lmforge does not know, ignored: some_future_field" in caplog.text


def test_a_masked_lm_head_takes_the_checkpoints_layer_norm_eps(cfg_factory, tmp_path):
    """transformers' masked-LM head uses layer_norm_eps too; lmforge's head takes the backbone's."""
    torch.manual_seed(0)
    config_class, _, _, settings = TINY["bert"]
    hf = transformers.BertForMaskedLM(getattr(transformers, config_class)(**settings, layer_norm_eps=0.1)).eval()
    ours = lmforge_model(cfg_factory, "bert-mini", saved(hf, tmp_path / "bert"), head=MaskedLMHead)
    assert ours.head.LayerNorm.eps == 0.1
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours.head(ours.backbone(ids)), hf(input_ids=ids).logits, atol=1e-4, rtol=0)
