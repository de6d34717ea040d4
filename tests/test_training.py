"""training.py's optimizers: which parameters Muon takes, Muon's momentum warmup, and MuonAdamW against
torch.optim.Muon and torch.optim.AdamW stepped by hand - one schedule for both, a GradScaler overflow skipping
both, and a state that survives a weights_only checkpoint."""
import copy

import pytest
import torch

from checkpoints import load_checkpoint, save_checkpoint
from common import UserError
from model import GPT
from training import MuonAdamW, build_optimizer, muon_momentum_at, muon_split, optimizer_step, set_lr

BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else(tiny_config):
    model = GPT(tiny_config)
    name_of = {id(p): n for n, p in model.named_parameters()}
    muon, adamw = muon_split(model)
    expected_muon = {f"transformer.h.{i}.{m}" for i in range(tiny_config.n_layer) for m in BLOCK_MATRICES}
    assert {name_of[id(p)] for p in muon} == expected_muon
    assert {id(p) for p in muon}.isdisjoint(id(p) for p in adamw)
    assert {id(p) for p in muon} | {id(p) for p in adamw} == {id(p) for p in model.parameters()}  # each exactly once
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    # the token embedding is the head's weight (tied) and stays with AdamW, as do the position embedding,
    # every LayerNorm gain and every bias
    assert model.lm_head.weight is model.transformer.wte.weight
    assert any(p is model.lm_head.weight for p in adamw) and any(p is model.transformer.wpe.weight for p in adamw)
    assert all(p.ndim == 1 for p in adamw if p is not model.lm_head.weight and p is not model.transformer.wpe.weight)

    optimizer = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                                muon_lr=0.02, muon_momentum=0.9, muon_weight_decay=0.01)
    assert isinstance(optimizer.muon, torch.optim.Muon) and isinstance(optimizer.adamw, torch.optim.AdamW)
    (group,) = optimizer.muon.param_groups
    assert group["lr"] == 0.02 and group["momentum"] == 0.9 and group["weight_decay"] == 0.01 and group["nesterov"]
    decay, no_decay = optimizer.adamw.param_groups
    assert {id(p) for p in decay["params"]} == {id(model.lm_head.weight), id(model.transformer.wpe.weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.9, 0.95)
    assert isinstance(build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu"), torch.optim.AdamW)


def test_muon_momentum_rises_linearly_then_holds():
    assert muon_momentum_at(0, 0.85, 0.95, 300) == 0.85
    assert muon_momentum_at(150, 0.85, 0.95, 300) == pytest.approx(0.90)
    assert muon_momentum_at(300, 0.85, 0.95, 300) == 0.95
    assert muon_momentum_at(10_000, 0.85, 0.95, 300) == 0.95
    assert muon_momentum_at(0, 0.85, 0.95, 0) == 0.95


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def test_the_pair_steps_as_torchs_muon_and_adamw_by_hand_under_one_schedule(tiny_config):
    torch.manual_seed(0)
    ours = GPT(tiny_config)
    ref = copy.deepcopy(ours)
    optimizer = build_optimizer(ours, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu", muon_lr=0.02, muon_momentum=0.95,
                                muon_weight_decay=0.01)
    ref_muon_params, ref_rest = muon_split(ref)
    ref_muon = torch.optim.Muon(ref_muon_params, lr=0.02, weight_decay=0.01, momentum=0.95, adjust_lr_fn="original")
    ref_adamw = torch.optim.AdamW([{"params": [p for p in ref_rest if p.ndim >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in ref_rest if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95))
    for step, scale in enumerate((1.0, 0.5, 0.1)):  # the schedule's multiplier of both peak learning rates
        _grads(ours, step)
        _grads(ref, step)
        set_lr(optimizer, 1e-3 * scale)
        assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.02 * scale)
        assert all(g["lr"] == pytest.approx(1e-3 * scale) for g in optimizer.adamw.param_groups)
        optimizer.step()
        for group in ref_muon.param_groups:
            group["lr"] = 0.02 * scale
        for group in ref_adamw.param_groups:
            group["lr"] = 1e-3 * scale
        ref_muon.step()
        ref_adamw.step()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    optimizer.zero_grad()
    assert all(p.grad is None for p in ours.parameters())


def test_a_gradscaler_overflow_skips_both_optimizers(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    optimizer = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu")
    muon_params = optimizer.muon.param_groups[0]["params"]
    adamw_params = [p for group in optimizer.adamw.param_groups for p in group["params"]]
    x = torch.randint(0, 50257, (2, 16))

    def scaled_step(init_scale: float):
        """(skipped, which Muon parameters moved, which AdamW parameters moved) of one GradScaler step."""
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        before = {id(p): p.detach().clone() for p in model.parameters()}
        optimizer.zero_grad()
        scaler.scale(model(x, x)[1]).backward()
        skipped = optimizer_step(model, optimizer, scaler, lr=1e-3, grad_clip=1.0, loss=1.0, step=0)[1]
        moved = lambda params: [not torch.equal(before[id(p)], p) for p in params]  # noqa: E731
        return skipped, moved(muon_params), moved(adamw_params)

    skipped, muon_moved, adamw_moved = scaled_step(2.0**126)  # a loss of ~10.8 times 2^126 overflows float32
    assert skipped and not any(muon_moved) and not any(adamw_moved)
    skipped, muon_moved, adamw_moved = scaled_step(2.0**10)
    assert not skipped and all(muon_moved) and any(adamw_moved)


def test_the_pairs_state_survives_a_checkpoint_and_refuses_adamws(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    optimizer = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu")
    _grads(model, 0)
    set_lr(optimizer, 5e-4)
    optimizer.set_momentum(0.9)
    optimizer.step()
    save_checkpoint(tmp_path / "ck.pt", stage="pretrain", model=model, optimizer=optimizer)
    ckpt = load_checkpoint(tmp_path / "ck.pt")  # weights_only=True
    fresh = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu")
    fresh.load_state_dict(ckpt["optimizer"])
    assert fresh.muon.param_groups[0]["momentum"] == 0.9 and fresh.muon.param_groups[0]["lr"] == pytest.approx(1e-2)
    for p in fresh.muon.param_groups[0]["params"]:
        assert torch.equal(fresh.muon.state[p]["momentum_buffer"], optimizer.muon.state[p]["momentum_buffer"])
    for p in fresh.adamw.param_groups[0]["params"]:
        assert torch.equal(fresh.adamw.state[p]["exp_avg_sq"], optimizer.adamw.state[p]["exp_avg_sq"])
    adamw_state = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu").state_dict()
    with pytest.raises(UserError, match="resume it with --optimizer adamw"):
        fresh.load_state_dict(adamw_state)
    assert isinstance(fresh, MuonAdamW)
