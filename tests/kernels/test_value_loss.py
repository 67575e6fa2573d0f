"""value_loss against the float64 reference, a hand-computed case, micro-batch invariance (fully masked rows
included), the seq-mean denominators, NaN/inf at masked positions and bad input."""

import pytest
import torch

from kernels.loss_agg import LOSS_AGG_MODES
from kernels.value_loss import value_loss, value_loss_ref
from tests._numerics import INPUT_DTYPES, assert_close, randn, random_mask, seq_agg_expected

SHAPES = [(4, 64), (5, 37), (1, 1), (2, 300)]


def make_inputs(B, T, dtype, device, seed=0):
    old = randn(B, T, dtype=dtype, device=device, seed=seed)
    v = (old.double() + randn(B, T, dtype=torch.float64, device=device, seed=seed + 1, scale=0.8)).to(dtype)
    ret = randn(B, T, dtype=dtype, device=device, seed=seed + 2, scale=1.5)
    mask = random_mask(B, T, device, seed + 3, full_rows=(0,), empty_rows=(B - 1,) if B > 2 else ())
    return v, old, ret, mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("clip", [0.5, 0.2, None])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])  # all modes: test_ppo_loss.py
def test_value_loss_matches_float64(backend, device, shape, dtype, clip, mode):
    v, old, ret, mask = make_inputs(*shape, dtype, device)
    x = v.clone().requires_grad_(True)
    loss, metrics = value_loss(x, old, ret, mask, cliprange_value=clip, loss_agg_mode=mode)
    loss.backward()
    x64 = v.double().requires_grad_(True)
    gold, gold_metrics = value_loss_ref(x64, old.double(), ret.double(), mask, cliprange_value=clip,
                                        loss_agg_mode=mode)
    gold.backward()
    assert loss.dtype == torch.float32
    assert_close(loss, gold, torch.float32, "loss", scale=5)  # fp32 sums over up to 600 tokens
    for name, value in metrics.items():
        assert_close(value, gold_metrics[name], torch.float32, name, scale=5)
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, "dvalues")


def test_value_loss_hand_computed(backend, device):
    # token 0: v = 2, old = 0, R = 0, clip 0.5 -> v_clip = 0.5: max(4, 0.25) = 4 -> 0.5 * 4 = 2, grad (v - R) = 2
    # token 1: v = 0.1, old = 0, R = 1 -> v_clip = v: 0.5 * 0.81 = 0.405, grad -0.9; token-mean over 2 tokens.
    v = torch.tensor([[2.0, 0.1]], device=device, requires_grad=True)
    zeros = torch.zeros(1, 2, device=device)
    loss, metrics = value_loss(v, zeros, torch.tensor([[0.0, 1.0]], device=device), torch.ones(1, 2, device=device))
    loss.backward()
    assert loss.item() == pytest.approx((2.0 + 0.405) / 2, abs=1e-6)
    assert v.grad.tolist()[0] == pytest.approx([1.0, -0.45], abs=1e-6)
    assert metrics["vf_clipfrac"].item() == 0.0
    assert metrics["vpred_mean"].item() == pytest.approx(1.05)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_value_loss_micro_batch_split_sums_to_full_batch(backend, device, mode):
    v, old, ret, mask = make_inputs(6, 17, torch.float32, device, seed=5)  # row 5 fully masked
    mask[1] = False
    globals_ = dict(global_num_tokens=int(mask.sum()), global_num_seqs=int(mask.any(-1).sum()), loss_scale_factor=17)
    full_x = v.clone().requires_grad_(True)
    full, _ = value_loss(full_x, old, ret, mask, loss_agg_mode=mode, **globals_)
    full.backward()
    local, _ = value_loss(v, old, ret, mask, loss_agg_mode=mode)
    assert_close(full.detach(), local, torch.float32, "loss with global = local denominators")
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 6)):
        x = v[rows].clone().requires_grad_(True)
        part, _ = value_loss(x, old[rows], ret[rows], mask[rows], loss_agg_mode=mode, **globals_)
        part.backward()
        total = total + part.detach()
        grads.append(x.grad)
    assert_close(total, full.detach(), torch.float32, "loss")
    assert_close(torch.cat(grads), full_x.grad, torch.float32, "grads")


def test_value_loss_bad_input():
    v, m = torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"returns must have the shape of values \(2, 3\), got \(3, 2\)"):
        value_loss(v, v, v.t(), m)
    with pytest.raises(ValueError, match="cliprange_value must be > 0, got 0"):
        value_loss(v, v, v, m, cliprange_value=0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        value_loss(v, v, v, m, loss_agg_mode="mean")
    with pytest.raises(TypeError, match="response_mask must have dtype"):
        value_loss(v, v, v, m.to(torch.complex64))
    with pytest.raises(ValueError, match="cliprange_value must be finite, got nan"):
        value_loss(v, v, v, m, cliprange_value=float("nan"))
    with pytest.raises(ValueError, match="response_mask must be bool or hold only 0 and 1, got nan"):
        value_loss(v, v, v, torch.tensor([[1.0, float("nan"), 0.0], [1.0, 1.0, 1.0]]))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_value_loss_seq_mean_excludes_fully_masked_rows(backend, device, mode):
    # unclipped: l = 0.5 (v - R)^2 per token; the anchors' aggregation (veRL agg_loss) written out per row
    B, T = 4, 6
    v, _, ret, _ = make_inputs(B, T, torch.float32, device, seed=8)
    mask = random_mask(B, T, device, seed=9, full_rows=(0,), empty_rows=(2,))
    rows = [(0.5 * (v[i][mask[i]].double() - ret[i][mask[i]].double()) ** 2) for i in range(B) if mask[i].any()]
    expected = seq_agg_expected(rows, mode, T)
    loss, _ = value_loss(v, v, ret, mask, cliprange_value=None, loss_agg_mode=mode)
    assert_close(loss, expected, torch.float32, mode)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [0.5, None])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_value_loss_masked_non_finite_never_leaks(backend, device, shape, clip, mode):
    B, T = shape
    v, old, ret, mask = make_inputs(B, T, torch.float32, device, seed=10)
    if B > 1:
        mask[1, T // 2:] = False
    x_clean = v.clone().requires_grad_(True)
    x_bad = v.masked_fill(~mask, float("nan")).requires_grad_(True)
    gold, gold_metrics = value_loss(x_clean, old, ret, mask, cliprange_value=clip, loss_agg_mode=mode)
    loss, metrics = value_loss(x_bad, old.masked_fill(~mask, float("inf")), ret.masked_fill(~mask, -float("inf")),
                               mask, cliprange_value=clip, loss_agg_mode=mode)
    gold.backward()
    loss.backward()
    assert torch.isfinite(loss)
    assert_close(loss, gold.detach(), torch.float32, "loss")
    for name, value in metrics.items():
        assert_close(value, gold_metrics[name], torch.float32, name)
    assert torch.isfinite(x_bad.grad).all() and torch.all(x_bad.grad[~mask] == 0)
    assert_close(x_bad.grad, x_clean.grad, torch.float32, "dvalues")
