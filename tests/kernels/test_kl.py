"""kl_penalty against its float64 reference, forward and gradient, through every backend."""

import pytest
import torch

import kernels as K
from tests._numerics import INPUT_DTYPES, assert_close, randn

SHAPES = [(4, 64), (3, 37), (1, 1), (7, 129)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("max_kl", [None, 0.5])
def test_kl_penalty_matches_float64(backend, device, shape, dtype, estimator, max_kl):
    lp = randn(*shape, dtype=dtype, device=device, seed=1, scale=1.5)
    ref = randn(*shape, dtype=dtype, device=device, seed=2, scale=1.5)
    dout = randn(*shape, dtype=torch.float32, device=device, seed=3)

    lp_ours = lp.clone().requires_grad_(True)
    out = K.kl_penalty(lp_ours, ref, estimator, max_kl=max_kl)
    out.backward(dout)

    lp64 = lp.double().requires_grad_(True)
    gold = K.kl_penalty_ref(lp64, ref.double(), estimator, max_kl)
    gold.backward(dout.double())

    assert out.dtype == torch.float32
    assert_close(out, gold, torch.float32, "kl")
    assert lp_ours.grad.dtype == dtype
    assert_close(lp_ours.grad, lp64.grad, dtype, "dlogprobs")


def test_kl_penalty_extreme_log_ratios_stay_finite(backend, device):
    lp = torch.tensor([[-80.0, 0.0, -1e-3, -30.0]], device=device)
    ref = torch.tensor([[-0.1, -80.0, -1e-3, -5.0]], device=device)
    kl = K.kl_penalty(lp, ref, "k3")
    assert torch.isfinite(kl).all()
    assert_close(kl, K.kl_penalty_ref(lp.double(), ref.double(), "k3"), torch.float32, "kl")


def test_kl_penalty_aliases_and_gradcheck():
    lp = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 5, dtype=torch.float64)
    for est in ("k1", "k2", "k3", "abs"):
        assert torch.autograd.gradcheck(lambda x: K.kl_penalty_ref(x, ref, est), (lp,))
    assert torch.equal(K.kl_penalty(lp, ref, "low_var_kl"), K.kl_penalty(lp, ref, "k3"))
    assert torch.equal(K.kl_penalty(lp, ref, "mse"), K.kl_penalty(lp, ref, "k2"))


def test_kl_penalty_bad_input():
    lp = torch.randn(2, 3)
    with pytest.raises(ValueError, match="kl_estimator"):
        K.kl_penalty(lp, lp, "k4")
    with pytest.raises(ValueError, match=r"ref_logprobs must have the shape of logprobs \(2, 3\), got \(2, 4\)"):
        K.kl_penalty(lp, torch.randn(2, 4))
    with pytest.raises(TypeError, match="logprobs must have dtype"):
        K.kl_penalty(lp.long(), lp)
    with pytest.raises(ValueError, match="max_kl"):
        K.kl_penalty(lp, lp, max_kl=-1.0)
