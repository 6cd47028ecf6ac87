"""GPT backbone: the real GPT-2 size, causality, masking, weight tying."""

import pytest
import torch

from lmforge.models.gpt import GPT


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=50, n_layer=2, n_head=2, n_embd=16, n_positions=32, **kw)


def test_gpt2_small_has_the_public_checkpoint_parameter_count():
    # GPT-2 small: 124,439,808 parameters (output head tied to the token embedding).
    model = GPT(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, n_positions=1024, bias=True)
    assert model.num_parameters() == 124_439_808
    names = {n for n, _ in model.named_parameters()}
    assert {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.11.mlp.c_proj.bias",
        "transformer.ln_f.weight",
    } <= names


def test_output_head_is_tied_to_token_embedding():
    model = tiny_gpt()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_future_tokens_do_not_change_past_logits():
    model = tiny_gpt().eval()
    ids = torch.randint(0, 50, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_full_attention_mask_equals_no_mask_and_padding_is_ignored():
    model = tiny_gpt().eval()
    ids = torch.randint(0, 50, (2, 10))
    torch.testing.assert_close(model(ids, torch.ones_like(ids)), model(ids))
    # Right padding: the real tokens' logits do not depend on what the pad positions hold.
    mask = torch.ones_like(ids)
    mask[:, 7:] = 0
    other = ids.clone()
    other[:, 7:] = 0
    torch.testing.assert_close(model(ids, mask)[:, :7], model(other, mask)[:, :7])


def test_fixed_seed_logits_match_stored_values():
    # Guards the initialisation and the block wiring against silent changes.
    model = tiny_gpt().eval()
    ids = torch.arange(10).view(1, 10)
    logits = model(ids)
    assert logits.shape == (1, 10, 50)
    expected = torch.tensor([0.0526180, 0.1057091, -0.0996902, 0.0839485])
    torch.testing.assert_close(logits[0, -1, :4], expected, atol=1e-5, rtol=1e-4)


def test_flops_per_token_matches_a_count_of_every_matrix_product():
    """The MFU estimate against torch's FLOP counter over a real forward and backward (attention as plain
    matrix products, which the counter sees); biases and norms are the only difference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for layers, width, vocab, context in [(4, 128, 65, 64), (2, 256, 1000, 256)]:
        model = GPT(vocab, layers, 4, width, context)
        ids = torch.randint(0, vocab, (2, context))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        estimate = model.flops_per_token(context) * ids.numel()
        assert estimate == pytest.approx(counter.get_total_flops(), rel=0.015)
