"""pairwise_reward_loss against a float64 gold written here from the Bradley-Terry formula (TRL ``RewardTrainer``,
OpenRLHF ``PairWiseLoss``), through every backend: loss and the gradients of both rewards."""

import pytest
import torch
import torch.nn.functional as F

from kernels.reward_loss import pairwise_reward_loss, pairwise_reward_loss_ref
from tests._numerics import INPUT_DTYPES, TOLS, assert_close, randn

SIZES = [1, 7, 64, 1000]  # 1000 > the kernel's 256-pair block: the single program loops
MARGINS = ["none", "float", "tensor"]


def gold_loss(rc, rr, margin, center):
    """float64 TRL RewardTrainer loss (independent of kernels/)."""
    m = 0.0 if margin is None else margin
    loss = -F.logsigmoid(rc - rr - m).mean()
    if center is not None:
        loss = loss + center * torch.mean((rc + rr) ** 2)
    return loss


def gold_terms(rc, rr, margin, center):
    """The per-pair terms whose mean is the loss, for the cancellation-aware bound below."""
    m = 0.0 if margin is None else margin
    terms = -F.logsigmoid(rc - rr - m)
    return terms if center is None else terms + center * (rc + rr) ** 2


def make_margin(kind, B, device, seed):
    if kind == "none":
        return None
    if kind == "float":
        return 0.5
    return randn(B, dtype=torch.float32, device=device, seed=seed).abs()  # Llama 2: margin >= 0 per pair


def check_against_gold(rc, rr, margin, center, dout=0.6):
    ours = [rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)]
    loss = pairwise_reward_loss(*ours, margin=margin, center_rewards_coefficient=center)
    loss.backward(torch.tensor(dout, device=loss.device))

    gold = [rc.double().requires_grad_(True), rr.double().requires_grad_(True)]
    m64 = margin.detach().double() if isinstance(margin, torch.Tensor) else margin
    (gold_loss(*gold, m64, center) * dout).backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    terms = gold_terms(rc.double(), rr.double(), m64, center)
    tol = TOLS[torch.float32]
    err = abs(loss.item() - terms.mean().item())
    bound = tol.atol + tol.rtol * terms.abs().mean().item()  # terms are >= 0 here: the plain relative bound
    assert err <= bound, f"loss: got {loss.item():.9g}, expected {terms.mean().item():.9g}"
    for name, x, g in zip(("dchosen", "drejected"), ours, gold):
        assert x.grad.dtype == x.dtype
        assert_close(x.grad, g.grad, x.dtype, name)
    return loss


@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("margin_kind", MARGINS)
@pytest.mark.parametrize("center", [None, 0.01])
def test_pairwise_reward_loss_matches_float64(backend, device, B, dtype, margin_kind, center):
    rc = randn(B, dtype=dtype, device=device, seed=B, scale=2.0)
    rr = randn(B, dtype=dtype, device=device, seed=B + 1, scale=2.0)
    check_against_gold(rc, rr, make_margin(margin_kind, B, device, seed=B + 2), center)


def test_pairwise_reward_loss_margin_tensor_dtypes(backend, device):
    """A bf16 or float64 margin with float32 rewards: the margin is read in its dtype and rounded to float32."""
    rc = randn(9, dtype=torch.float32, device=device, seed=1)
    rr = randn(9, dtype=torch.float32, device=device, seed=2)
    for mdtype in (torch.bfloat16, torch.float64):
        margin = randn(9, dtype=mdtype, device=device, seed=3).abs().requires_grad_(True)
        check_against_gold(rc, rr, margin, None)
        assert margin.grad is None  # no gradient flows to the margin


def test_pairwise_reward_loss_extreme_rewards_stay_finite(backend, device):
    # reward gaps of +-200: -logsigmoid(200) underflows to 0 (not log(0)), -logsigmoid(-200) = 200
    rc = torch.tensor([100.0, -100.0, 0.0, 150.0], device=device)
    rr = torch.tensor([-100.0, 100.0, 0.0, -50.0], device=device)
    for margin in (None, 1.0):
        loss = check_against_gold(rc, rr, margin, None)
        assert torch.isfinite(loss)
    assert torch.isfinite(check_against_gold(rc, rr, None, 0.01))


def test_pairwise_reward_loss_reference_gradcheck():
    rc = torch.randn(5, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(5, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(5, dtype=torch.float64)
    for m, c in ((None, None), (0.3, None), (margin, 0.01)):
        assert torch.autograd.gradcheck(lambda a, b: pairwise_reward_loss_ref(a, b, m, c), (rc, rr), fast_mode=True)
        loss64 = pairwise_reward_loss(rc, rr, margin=m, center_rewards_coefficient=c)  # float64: the reference
        assert loss64.dtype == torch.float64
        assert torch.allclose(loss64, gold_loss(rc, rr, m, c), rtol=1e-12, atol=0)
    # OpenRLHF's LogExpLoss form is the same function
    assert torch.allclose(pairwise_reward_loss_ref(rc, rr), torch.log1p(torch.exp(rr - rc)).mean(), rtol=1e-12)


def test_pairwise_reward_loss_bad_input():
    x = torch.randn(4)
    with pytest.raises(ValueError, match=r"rejected_rewards must have the shape of chosen_rewards \(4,\), got \(3,\)"):
        pairwise_reward_loss(x, torch.randn(3))
    with pytest.raises(ValueError, match=r"chosen_rewards must have 1 dimensions, got shape \(4, 1\)"):
        pairwise_reward_loss(x[:, None], x)
    with pytest.raises(ValueError, match=r"margin must have the shape of chosen_rewards \(4,\), got \(4, 1\)"):
        pairwise_reward_loss(x, x, margin=torch.zeros(4, 1))
    with pytest.raises(TypeError, match="margin must have dtype"):
        pairwise_reward_loss(x, x, margin=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="margin must be None, a number or a"):
        pairwise_reward_loss(x, x, margin="0.5")
    with pytest.raises(ValueError, match="at least one pair"):
        pairwise_reward_loss(torch.randn(0), torch.randn(0))
    with pytest.raises(ValueError, match="center_rewards_coefficient must be >= 0"):
        pairwise_reward_loss(x, x, center_rewards_coefficient=-0.01)
    with pytest.raises(TypeError, match="rejected_rewards must have dtype"):
        pairwise_reward_loss(x, x.int())
