"""activation_checkpointing=true: every transformer backbone gives the same loss and gradients as without it,
dropout included, while keeping far fewer activations for the backward pass."""

import pytest
import torch

from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.models.layers import enable_activation_checkpointing
from lmforge.models.t5 import T5
from lmforge.models.transformer import Transformer

VOCAB = 40


def _gpt():
    return GPT(VOCAB, n_layer=4, n_head=2, n_embd=32, n_positions=16, dropout=0.2)


def _bert():
    return Bert(VOCAB, n_layer=4, n_head=2, hidden_size=32, intermediate_size=64, n_positions=16, dropout=0.2)


def _t5():
    return T5(VOCAB, n_layer=3, n_head=2, d_model=32, d_kv=16, d_ff=64, dropout=0.2)


def _transformer():
    return Transformer(VOCAB, n_layer=3, n_head=2, d_model=32, d_ff=64, dropout=0.2)


def _loss(model, ids):
    """A scalar that depends on every output of the backbone (its logits or hidden states)."""
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding takes the masked path of every attention layer
    out = model(ids, mask, ids[:, :-1]) if isinstance(model, (T5, Transformer)) else model(ids, mask)
    return out.float().pow(2).mean()


BACKBONES = {"gpt": _gpt, "bert": _bert, "t5": _t5, "transformer": _transformer}


def _loss_and_grads(build, checkpointing: bool, ids):
    torch.manual_seed(0)
    model = build().train()
    if checkpointing:
        assert enable_activation_checkpointing(model) >= 1
    torch.manual_seed(1)  # the same dropout masks in both runs
    loss = _loss(model, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(build, checkpointing: bool, ids) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (checkpointed blocks keep theirs out of sight)."""
    torch.manual_seed(0)
    model = build().train()
    if checkpointing:
        enable_activation_checkpointing(model)
    total = 0

    def pack(tensor):
        nonlocal total
        if not isinstance(tensor, torch.nn.Parameter):
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, ids)
    return total


@pytest.mark.parametrize("name", BACKBONES)
def test_checkpointed_backbone_has_the_same_loss_and_gradients(name):
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    plain_loss, plain = _loss_and_grads(BACKBONES[name], False, ids)
    ckpt_loss, ckpt = _loss_and_grads(BACKBONES[name], True, ids)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", BACKBONES)
def test_checkpointed_backbone_keeps_far_fewer_activations(name):
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    plain, ckpt = _saved_bytes(BACKBONES[name], False, ids), _saved_bytes(BACKBONES[name], True, ids)
    assert ckpt < 0.3 * plain, (ckpt, plain)


def test_checkpointing_is_off_without_gradients(monkeypatch):
    """Validation and generation never pay for the recompute: no checkpoint call in eval or under no_grad."""
    from lmforge.models import layers

    calls = []
    monkeypatch.setattr(layers, "checkpoint", lambda fn, *args, **kw: calls.append(fn) or fn(*args))
    model = _gpt()
    enable_activation_checkpointing(model)
    ids = torch.randint(1, VOCAB, (2, 12))
    model.eval()
    with torch.no_grad():
        a = model(ids)
    model.train()
    with torch.no_grad():
        model(ids)
    assert calls == []
    model.eval()
    model.activation_checkpointing = False
    with torch.no_grad():
        b = model(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    model.activation_checkpointing = True
    model(ids)
    assert len(calls) == 4  # one per block when training with gradients


def test_an_rnn_has_no_blocks_to_checkpoint():
    from lmforge.models.rnn import RNN

    assert enable_activation_checkpointing(RNN(VOCAB, hidden_size=8, embedding_size=8)) == 0


def test_checkpointed_lora_trains_its_adapters_as_without():
    """Frozen embeddings feed the first checkpointed block an input that needs no gradient."""
    from omegaconf import OmegaConf

    from conftest import entry_cfg
    from lmforge.finetune import LoRA

    targets = OmegaConf.to_container(entry_cfg("train", ["model=gpt2"]).model.targets)

    def lora_gpt():
        model = _gpt()
        LoRA(r=4, modules=["attention", "feedforward"]).apply(model, targets, "gpt2")
        with torch.no_grad():  # lora_B starts at zero; move it so every adapter weight gets a gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
        return model

    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    plain_loss, plain = _loss_and_grads(lora_gpt, False, ids)
    ckpt_loss, ckpt = _loss_and_grads(lora_gpt, True, ids)
    assert plain.keys() == ckpt.keys() and plain and all("lora_" in k for k in plain)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-6, atol=1e-7, msg=key)
