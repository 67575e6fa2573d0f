"""engine.algorithms.optim: AdamW with float32 master weights for bf16/fp16 parameters, the learning-rate schedule."""

import copy
import math

import pytest
import torch

from engine.config import OptimConfig
from engine.algorithms.optim import MasterWeightAdamW, lr_factor, make_optimizer, make_scheduler


def tiny_net(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def test_low_precision_parameters_get_master_weights_and_fp32_ones_do_not():
    assert isinstance(make_optimizer(tiny_net(torch.bfloat16), OptimConfig()), MasterWeightAdamW)
    assert isinstance(make_optimizer(tiny_net(torch.float16), OptimConfig()), MasterWeightAdamW)
    assert type(make_optimizer(tiny_net(torch.float32), OptimConfig())) is torch.optim.AdamW
    assert type(make_optimizer(tiny_net(torch.bfloat16), OptimConfig(master_weights=False))) is torch.optim.AdamW


def test_updates_below_half_a_bf16_ulp_accumulate_in_the_master():
    # w = 1.0 (bf16 ulp 2**-7); AdamW moves it by lr = 1e-3 per step, a quarter of half an ulp: plain bf16 AdamW never
    # changes it, the master walks down and the parameter follows once the master crosses a rounding boundary
    cfg = OptimConfig(lr=1e-3, weight_decay=0.0)
    runs = {}
    for master in (False, True):
        w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        opt = make_optimizer(torch.nn.ParameterList([w]), OptimConfig(**{**cfg.__dict__, "master_weights": master}))
        for _ in range(10):
            w.grad = torch.ones_like(w)
            opt.step()
            opt.zero_grad()
        runs[master] = (w.detach().clone(), opt)
    assert torch.equal(runs[False][0], torch.ones(4, dtype=torch.bfloat16))  # every update lost
    master_value = runs[True][1]._masters[0]
    assert master_value.dtype == torch.float32
    assert torch.allclose(master_value, torch.full((4,), 1 - 10 * 1e-3), atol=1e-5)
    assert torch.equal(runs[True][0], master_value.to(torch.bfloat16))


def test_masters_follow_the_float32_adamw_trajectory_exactly():
    # same float32 gradients into a bf16 model (masters) and an fp32 copy of its weights (plain AdamW): the masters
    # are the fp32 run's parameters bit for bit, the bf16 parameters their rounding
    low = tiny_net(torch.bfloat16)
    high = tiny_net(torch.float32)
    with torch.no_grad():
        for a, b in zip(high.parameters(), low.parameters()):
            a.copy_(b.float())
    cfg = OptimConfig(lr=3e-3, weight_decay=0.01)
    opt_low, opt_high = make_optimizer(low, cfg), make_optimizer(high, cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(high.parameters(), low.parameters()):
            grad = torch.randn(a.shape, generator=g).to(torch.bfloat16)  # representable in both dtypes
            a.grad, b.grad = grad.float(), grad
        opt_high.step()
        opt_low.step()
        opt_high.zero_grad()
        opt_low.zero_grad()
    master_of = {id(p): m for p, m in zip(opt_low._model_params, opt_low._masters)}
    for a, b in zip(high.parameters(), low.parameters()):
        assert torch.equal(master_of[id(b)], a.detach())
        assert torch.equal(b.detach(), a.detach().to(torch.bfloat16))
        assert b.grad is None


def test_state_dict_round_trip_continues_identically():
    def run(steps, opt, net, g):
        for _ in range(steps):
            for p in net.parameters():
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
            opt.zero_grad()

    cfg = OptimConfig(lr=1e-2)
    net_a = tiny_net(torch.bfloat16)
    opt_a = make_optimizer(net_a, cfg)
    run(3, opt_a, net_a, torch.Generator().manual_seed(2))
    saved_state = copy.deepcopy(opt_a.state_dict())  # state_dict() holds live references to the moments
    saved_weights = {k: v.clone() for k, v in net_a.state_dict().items()}
    run(3, opt_a, net_a, torch.Generator().manual_seed(3))

    net_b = tiny_net(torch.bfloat16, seed=7)  # other initial weights: everything comes from the checkpoint
    net_b.load_state_dict(saved_weights)
    opt_b = make_optimizer(net_b, cfg)
    opt_b.load_state_dict(saved_state)
    run(3, opt_b, net_b, torch.Generator().manual_seed(3))
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b)
    for ma, mb in zip(opt_a._masters, opt_b._masters):
        assert torch.equal(ma, mb)


def test_the_schedule_drives_the_master_optimizer():
    net = tiny_net(torch.bfloat16)
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    opt = make_optimizer(net, cfg)
    sched = make_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    expected = [1e-3 * lr_factor(s, total_steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
                for s in range(10)]
    assert lrs == pytest.approx(expected)
    assert math.isclose(lrs[0], 5e-4)
