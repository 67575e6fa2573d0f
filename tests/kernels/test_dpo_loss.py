"""dpo_loss against a float64 gold written here from the published formulas (TRL ``DPOTrainer.dpo_loss``), through
every backend: loss, the four metrics and the gradients of all four inputs."""

import pytest
import torch
import torch.nn.functional as F

from kernels.dpo_loss import DPO_METRICS, dpo_loss, dpo_loss_ref
from tests._numerics import INPUT_DTYPES, TOLS, assert_close, randn

SIZES = [1, 7, 64, 1000]  # 1000 > the kernel's 256-pair block: the single program loops
# (loss_type, label_smoothing): plain DPO, cDPO, robust DPO, IPO (no smoothing for IPO)
VARIANTS = [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("ipo", 0.0)]


def gold_losses(pc, pr, rc, rr, beta, loss_type, eps):
    """Per-pair float64 losses, straight from the papers / TRL (independent of kernels/)."""
    logits = (pc - pr) - (rc - rr)  # TRL: pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    if loss_type == "robust":
        return (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    return (logits - 1 / (2 * beta)) ** 2


def assert_mean_close(actual, terms, name):
    """A float32 mean of B terms, judged against the mean of the float64 terms. The bound scales with mean |term|
    rather than |mean|: terms of both signs (robust losses, reward margins) cancel, and the float32 rounding of each
    term is relative to the term itself."""
    tol = TOLS[torch.float32]
    expected = terms.mean()
    err = (actual.double().cpu() - expected.cpu()).abs().item()
    bound = tol.atol + tol.rtol * terms.abs().mean().item()
    assert err <= bound, (f"{name}: got {actual.item():.9g}, expected {expected.item():.9g} "
                          f"(err {err:.3g} > {bound:.3g})")


def make_logps(B, dtype, device, seed):
    """Realistic summed sequence log-probs: reference around -50..-150 nats, policy within a few nats of it."""
    rc = -50.0 - 20.0 * randn(B, dtype=torch.float64, device="cpu", seed=seed).abs()
    rr = -50.0 - 20.0 * randn(B, dtype=torch.float64, device="cpu", seed=seed + 1).abs()
    pc = rc + 2.0 * randn(B, dtype=torch.float64, device="cpu", seed=seed + 2)
    pr = rr + 2.0 * randn(B, dtype=torch.float64, device="cpu", seed=seed + 3)
    return [x.to(dtype).to(device) for x in (pc, pr, rc, rr)]


def check_against_gold(inputs, beta, loss_type, eps, dout=1.7):
    ours = [x.clone().requires_grad_(True) for x in inputs]
    loss, metrics = dpo_loss(*ours, beta=beta, loss_type=loss_type, label_smoothing=eps)
    loss.backward(torch.tensor(dout, device=loss.device))

    gold = [x.double().requires_grad_(True) for x in inputs]
    terms = gold_losses(*gold, beta, loss_type, eps)
    (terms.mean() * dout).backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_mean_close(loss, terms.detach(), "loss")
    names = ("dpolicy_chosen", "dpolicy_rejected", "dref_chosen", "dref_rejected")
    for name, x, g in zip(names, ours, gold):
        assert x.grad.dtype == x.dtype
        assert_close(x.grad, g.grad, x.dtype, name)

    pc, pr, rc, rr = (x.detach() for x in gold)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    gold_metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected,
                    "rewards/accuracies": (chosen > rejected).double(), "rewards/margins": chosen - rejected}
    assert tuple(metrics) == DPO_METRICS
    for name in DPO_METRICS:
        m = metrics[name]
        assert m.dtype == torch.float32 and m.dim() == 0 and not m.requires_grad, name
        assert_mean_close(m, gold_metrics[name], name)
    return loss, metrics


@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("loss_type,eps", VARIANTS)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_float64(backend, device, B, dtype, loss_type, eps, beta):
    check_against_gold(make_logps(B, dtype, device, seed=B), beta, loss_type, eps)


@pytest.mark.parametrize("loss_type,eps", VARIANTS + [("robust", 0.3)])
def test_dpo_loss_extreme_margins_stay_finite(backend, device, loss_type, eps):
    # implicit-reward differences of +-200 nats: |u| = beta * 400 = 200, where a naive log(sigmoid(u)) gives -inf
    pc = torch.tensor([-10.0, -210.0, -10.0, -5.0, -300.0], device=device)
    rc = torch.tensor([-210.0, -10.0, -10.0, -205.0, -100.0], device=device)
    pr = torch.tensor([-300.0, -100.0, -50.0, -205.0, -5.0], device=device)
    rr = torch.tensor([-100.0, -300.0, -50.0, -5.0, -205.0], device=device)
    loss, metrics = check_against_gold([pc, pr, rc, rr], 0.5, loss_type, eps)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(m) for m in metrics.values())


def test_dpo_loss_policy_only_gradients(backend, device):
    """Trainers pass detached reference log-probs: no gradient is computed for them, the policy's are unchanged."""
    pc, pr, rc, rr = make_logps(9, torch.bfloat16, device, seed=3)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.2)
    loss.backward()
    assert rc.grad is None and rr.grad is None
    full = [x.detach().clone().requires_grad_(True) for x in (pc, pr, rc, rr)]
    dpo_loss(*full, beta=0.2)[0].backward()
    assert torch.equal(pc.grad, full[0].grad) and torch.equal(pr.grad, full[1].grad)
    # no input requires grad: a plain forward
    loss, _ = dpo_loss(pc.detach(), pr.detach(), rc, rr)
    assert not loss.requires_grad


def test_dpo_loss_mixed_input_dtypes(backend, device):
    pc, pr, _, _ = make_logps(13, torch.bfloat16, device, seed=5)
    _, _, rc, rr = make_logps(13, torch.float32, device, seed=5)
    check_against_gold([pc, pr, rc, rr], 0.1, "sigmoid", 0.1)


def test_dpo_loss_backends_agree_and_reference_gradcheck(device):
    inputs = make_logps(4, torch.float64, "cpu", seed=11)
    for loss_type, eps in VARIANTS + [("robust", 0.0)]:
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        assert torch.autograd.gradcheck(
            lambda *xs: dpo_loss_ref(*xs, 0.3, loss_type, eps)[0], leaves, fast_mode=True), loss_type
        # float64 inputs always take the reference, whatever the backend
        loss64, _ = dpo_loss(*inputs, beta=0.3, loss_type=loss_type, label_smoothing=eps)
        assert loss64.dtype == torch.float64
        assert torch.allclose(loss64, gold_losses(*inputs, 0.3, loss_type, eps).mean(), rtol=1e-12, atol=0)
    # robust with eps = 0 is plain DPO
    a, _ = dpo_loss_ref(*inputs, 0.3, "robust", 0.0)
    b, _ = dpo_loss_ref(*inputs, 0.3, "sigmoid", 0.0)
    assert torch.allclose(a, b, rtol=1e-14, atol=0)


def test_dpo_loss_bad_input():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="beta must be > 0, got 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, beta=-0.1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\), got 0.5"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing must be >= 0"):
        dpo_loss(x, x, x, x, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing must be 0 with loss_type='ipo'"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"ref_rejected_logps must have the shape of policy_chosen_logps \(4,\), "
                                         r"got \(5,\)"):
        dpo_loss(x, x, x, torch.randn(5))
    with pytest.raises(ValueError, match=r"policy_rejected_logps must have 1 dimensions, got shape \(4, 1\)"):
        dpo_loss(x, x[:, None], x, x)
    with pytest.raises(ValueError, match="at least one pair"):
        e = torch.randn(0)
        dpo_loss(e, e, e, e)
    with pytest.raises(TypeError, match="ref_chosen_logps must have dtype"):
        dpo_loss(x, x, x.long(), x)
    with pytest.raises(TypeError, match="policy_chosen_logps must be a torch.Tensor"):
        dpo_loss([1.0], x, x, x)
    with pytest.raises(TypeError, match="beta must be a number"):
        dpo_loss(x, x, x, x, beta="0.1")
