"""T5 backbone: parity with Hugging Face's T5, cached decoding, padding, and a tiny training run."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.t5 import HF_ALIASES, T5, relative_position_bucket

SIZES = dict(n_layer=2, n_decoder_layer=3, n_head=4, d_model=32, d_kv=8, d_ff=64)
VOCAB = 50


def tiny(**overrides) -> T5:
    """A small T5 (dropout off unless overridden), in eval mode."""
    torch.manual_seed(0)
    args = dict(
        SIZES, vocab_size=VOCAB, relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout=0.0
    )
    args.update(overrides)
    return T5(**args).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source ids (the second row right-padded with id 0), their mask, and target ids."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    src[1, 5:] = 0
    tgt = torch.randint(1, VOCAB, (2, 7), generator=g)
    return src, mask, tgt


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=SIZES["d_model"],
        d_kv=SIZES["d_kv"],
        d_ff=SIZES["d_ff"],
        num_layers=SIZES["n_layer"],
        num_decoder_layers=SIZES["n_decoder_layer"],
        num_heads=SIZES["n_head"],
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    torch.manual_seed(2)
    return transformers.T5ForConditionalGeneration(config).eval()


def test_loads_hf_weights_and_matches_logits(hf_model):
    ours = tiny()
    state = {k: v for k, v in hf_model.state_dict().items() if k not in HF_ALIASES}
    ours.load_state_dict(state, strict=True)
    assert torch.equal(ours.lm_head.weight, hf_model.shared.weight)
    src, mask, tgt = batch()
    with torch.no_grad():
        expected = hf_model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = ours(src, mask, tgt)
    assert got.shape == (2, 7, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_parameter_names_are_hf_names(hf_model):
    ours = {name: p.shape for name, p in tiny().state_dict().items()}
    theirs = {name: p.shape for name, p in hf_model.state_dict().items()}
    assert ours == {name: shape for name, shape in theirs.items() if name not in HF_ALIASES}
    for name in (
        "shared.weight",
        "lm_head.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.1.layer.1.DenseReluDense.wo.weight",
        "decoder.block.2.layer.1.EncDecAttention.q.weight",
        "decoder.block.2.layer.2.DenseReluDense.wi.weight",
        "encoder.final_layer_norm.weight",
        "decoder.final_layer_norm.weight",
    ):
        assert name in ours
    # Only the first block of each stack owns a position bias.
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in ours


def test_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    offsets = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 16)):
            expected = T5Attention._relative_position_bucket(offsets, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(offsets, bidirectional, buckets, distance), expected)


def test_cached_decoding_matches_full_decoding():
    model = tiny()
    src, mask, tgt = batch()
    with torch.no_grad():
        memory = model.encode(src, mask)
        full = model.decode(tgt, memory, mask)
        cache = model.new_cache()
        # A two-token prefix, then one token at a time.
        steps = [model.decode(tgt[:, :2], memory, mask, cache=cache)]
        steps += [model.decode(tgt[:, t : t + 1], memory, mask, cache=cache) for t in range(2, tgt.shape[1])]
    assert cache.length == tgt.shape[1]
    assert all(kv is not None for kv in cache.cross)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_padded_batch_matches_each_sentence_alone():
    model = tiny()
    src, mask, tgt = batch()
    with torch.no_grad():
        together = model(src, mask, tgt)
        first = model(src[:1], None, tgt[:1])
        second = model(src[1:, :5], None, tgt[1:])
    torch.testing.assert_close(together[0], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], second[0], atol=1e-5, rtol=1e-5)


def test_learns_a_copy_task():
    torch.set_num_threads(1)
    model = tiny(dropout=0.1).train()
    g = torch.Generator().manual_seed(3)
    src = torch.randint(2, VOCAB, (16, 6), generator=g)
    decoder_input = torch.cat([torch.zeros(16, 1, dtype=torch.long), src[:, :-1]], dim=1)  # 0 starts decoding
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(src, torch.ones_like(src), decoder_input)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), src.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad.abs().sum() > 0
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("t5-small", (6, 6, 8, 512, 64, 2048)),
        ("t5-mini", (4, 4, 4, 256, 64, 1024)),
        ("t5-tiny", (2, 2, 4, 128, 32, 512)),
    ],
)
def test_configs(name, shape):
    from hydra import compose, initialize_config_dir

    from lmforge.config_dirs import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    model = cfg.model
    assert model._target_ == "lmforge.models.t5.T5" and cfg.tokenizer.name == "bpe"
    assert (model.n_layer, model.n_decoder_layer, model.n_head, model.d_model, model.d_kv, model.d_ff) == shape
    assert (model.relative_attention_num_buckets, model.relative_attention_max_distance) == (32, 128)
