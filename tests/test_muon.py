"""optimizer=muon: Muon for the hidden matrices, AdamW for the rest, one optimizer for Lightning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY, crashed_run, make_cfg
from lmforge.compose.parts import build_backbone
from lmforge.errors import LmforgeError
from lmforge.models.gpt import GPT
from lmforge.tasks.muon import MuonAdamW, _newton_schulz_float32, _orthogonalize_in_float32, split_parameters
from lmforge.tasks.schedules import cosine_with_warmup
from lmforge.training import run_training

MUON = [*TINY, "optimizer=muon", "optimizer.lr=0.02", "optimizer.adamw_lr=3e-3", "optimizer.weight_decay=0.01"]


class Task(nn.Module):
    """A backbone and a head of the task's own, as the task modules hold them."""

    def __init__(self, backbone: nn.Module, classes: int = 3):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.hidden_size, classes)


def gpt(bias: bool = True) -> GPT:
    return GPT(66, n_layer=2, n_head=2, n_embd=32, n_positions=16, bias=bias)


def test_gpt_split_by_name_puts_each_parameter_in_exactly_one_group():
    task = Task(gpt())
    groups = split_parameters(task)
    names = [n for group in groups.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in task.named_parameters()) and len(names) == len(set(names))
    hidden = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    assert groups["muon"] == [f"backbone.transformer.h.{i}.{n}" for i in range(2) for n in hidden]
    # The token embedding is the tied head (lm_head.weight is the same tensor, named once).
    assert groups["adamw_decay"] == [
        "backbone.transformer.wte.weight",
        "backbone.transformer.wpe.weight",
        "head.weight",
    ]
    assert all(n.endswith(".bias") or ".ln_" in n for n in groups["adamw_no_decay"] if n != "head.bias")


def test_an_untied_head_and_frozen_parameters_stay_out_of_muon():
    model = gpt()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    model.transformer.h[0].requires_grad_(False)
    groups = split_parameters(model)
    assert "lm_head.weight" in groups["adamw_decay"]
    assert not any(n.startswith("transformer.h.0.") for group in groups.values() for n in group)
    assert groups["muon"] == [f"transformer.h.1.{n}" for n in
                              ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")]  # fmt: skip


def backbone(name: str, tmp_path: Path) -> nn.Module:
    return build_backbone(make_cfg([f"model={name}"], tmp_path).model, vocab_size=100)


@pytest.mark.parametrize("name", ["bert-tiny", "t5-tiny", "transformer", "lstm-attention"])
def test_other_backbones_give_muon_their_linear_matrices_only(name, tmp_path):
    model = backbone(name, tmp_path)
    groups = split_parameters(model)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = dict(model.named_parameters())
    assert groups["muon"] and all(id(params[n]) in linear and params[n].dim() == 2 for n in groups["muon"])
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    assert all(f"{e}.weight" in groups["adamw_decay"] for e in embeddings if f"{e}.weight" in params)


def test_a_model_without_hidden_matrices_is_refused_in_one_sentence(tmp_path):
    # An LSTM's weights are its gates side by side; they, and the task's head, train with AdamW.
    with pytest.raises(LmforgeError, match=r"optimizer=muon found no hidden weight matrix .* RNN; use optimizer=adamw"):
        MuonAdamW.parameter_groups(Task(backbone("lstm", tmp_path)))


def test_one_step_is_torch_muon_plus_torch_adamw_and_a_schedule_scales_both():
    torch.manual_seed(0)
    ours, theirs = gpt(), gpt()
    theirs.load_state_dict(ours.state_dict())
    opt = MuonAdamW(MuonAdamW.parameter_groups(ours), lr=0.02, adamw_lr=3e-3, weight_decay=0.1, fused=False)
    groups = MuonAdamW.parameter_groups(theirs)
    muon = torch.optim.Muon(groups[0]["params"], lr=0.02, weight_decay=0.1)
    adamw = torch.optim.AdamW(groups[1:], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    schedules = [cosine_with_warmup(o, total_steps=10, warmup_steps=2) for o in (opt, muon, adamw)]
    x = torch.randint(0, 66, (4, 16))
    for model in (ours, theirs):
        model(x).logsumexp(-1).mean().backward()
    opt.step()
    with _orthogonalize_in_float32():
        muon.step()
        adamw.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    for schedule in schedules:
        schedule.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * 2 / 3, 3e-3 * 2 / 3, 3e-3 * 2 / 3])
    assert [g["lr"] for inner in opt.inner for g in inner.param_groups] == [g["lr"] for g in opt.param_groups]


def test_float32_orthogonalization_matches_torchs_bfloat16_one():
    from torch.optim._muon import _zeropower_via_newtonschulz

    grad = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    args = ((3.4445, -4.775, 2.0315), 5, 1e-7)
    ours, torchs = _newton_schulz_float32(grad, *args), _zeropower_via_newtonschulz(grad, *args).float()
    assert ours.dtype == torch.float32 and ours.shape == grad.shape
    torch.testing.assert_close(ours, torchs, atol=0.03, rtol=0.05)
    # Near-orthogonal: the singular values land around 1 (0.7-1.2 for this quintic), not at the gradient's.
    assert torch.linalg.svdvals(ours).min() > 0.5 and torch.linalg.svdvals(ours).max() < 1.3


def test_state_dict_round_trip_restores_both_optimizers():
    model = gpt()
    opt = MuonAdamW(MuonAdamW.parameter_groups(model))
    model(torch.randint(0, 66, (2, 16))).sum().backward()
    opt.step()
    again = MuonAdamW(MuonAdamW.parameter_groups(model))
    again.load_state_dict(opt.state_dict())
    assert again.inner[0].param_groups[0] is again.param_groups[0] and again.inner[1].state is again.state
    for p in model.parameters():
        for key, value in opt.state[p].items():
            torch.testing.assert_close(again.state[p][key], value)


def test_a_few_steps_on_tiny_shakespeare_lower_the_loss(cfg_factory):
    steps = ["trainer.max_steps=30", "trainer.val_check_interval=30", "scheduler.warmup_steps=5"]
    record = run_training(cfg_factory([*MUON, *steps]))
    # ln(66) = 4.19 at the start; the baby recipe's AdamW is at 3.73 after these 30 steps.
    assert record["metrics"]["val/loss"] < 3.4


def test_crash_then_resume_ends_where_an_uninterrupted_run_ends(cfg_factory):
    split = [*MUON, "trainer.max_steps=8", "trainer.val_check_interval=4", "model.dropout=0.1"]
    straight = run_training(cfg_factory(split))
    run_dir = crashed_run(cfg_factory, split)
    saved = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and len(saved["optimizer_states"][0]["state"]) > 0
    resumed = run_training(cfg_factory([f"resume={run_dir}"]))
    assert resumed["steps"] == 8
    for key in ("train/loss", "val/loss"):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], abs=1e-5), key
