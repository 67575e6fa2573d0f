"""silu_and_mul (SwiGLU) against its float64 reference, forward and gradients, through every backend; the halves of
a fused gate/up projection read in place; extreme gates; bad input."""

import pytest
import torch
import torch.nn.functional as F

import kernels as K
from tests._numerics import INPUT_DTYPES, assert_close, assert_within_twice_eager_error, randn

# aligned, odd/prime, 1-sized, Qwen2.5-0.5B's intermediate size (4864), 3-d, no rows
SHAPES = [(4, 64), (3, 37), (1, 1), (2, 4864), (2, 3, 129), (0, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_silu_and_mul_matches_float64(backend, device, shape, dtype):
    gate = randn(*shape, dtype=dtype, device=device, seed=1, scale=3.0)
    up = randn(*shape, dtype=dtype, device=device, seed=2, scale=2.0)
    dout = randn(*shape, dtype=dtype, device=device, seed=3)

    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    out = K.silu_and_mul(g, u)
    out.backward(dout)

    g64, u64 = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    gold = K.silu_and_mul_ref(g64, u64)
    gold.backward(dout.double())

    g_lp, u_lp = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    eager = K.silu_and_mul_ref(g_lp, u_lp)
    eager.backward(dout)

    assert out.dtype == dtype and out.shape == gate.shape and out.is_contiguous()
    # Triton rounds silu(g) * u once; eager (HF) rounds silu(g) and then the product: either is within the table
    assert_close(out, gold, dtype, "silu_and_mul")
    assert_within_twice_eager_error(out, gold, eager.detach(), dtype, "silu_and_mul")
    assert_within_twice_eager_error(g.grad, g64.grad, g_lp.grad, dtype, "dgate")
    assert_within_twice_eager_error(u.grad, u64.grad, u_lp.grad, dtype, "dup")


def test_reference_is_hf_op_for_op():
    """The CPU path runs the reference: bit for bit HF's ``act_fn(gate) * up`` with ``hidden_act="silu"``."""
    from transformers.activations import ACT2FN

    for dtype in INPUT_DTYPES:
        gate = randn(5, 33, dtype=dtype, device="cpu", seed=4, scale=4.0)
        up = randn(5, 33, dtype=dtype, device="cpu", seed=5)
        assert torch.equal(K.silu_and_mul_ref(gate, up), ACT2FN["silu"](gate) * up)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_silu_and_mul_reads_the_halves_of_a_fused_projection(backend, device, dtype):
    """``gate``/``up`` as the two halves of a ``[N, 2I]`` gate_up output: row-strided views, no copy, same result."""
    N, I = 6, 45
    gu = randn(N, 2 * I, dtype=dtype, device=device, seed=6, scale=3.0)
    gate, up = gu[:, :I], gu[:, I:]
    assert not gate.is_contiguous()
    out = K.silu_and_mul(gate, up)
    if backend == "triton":  # (eager F.silu takes another CPU code path, with other last bits, on a strided input)
        assert torch.equal(out, K.silu_and_mul(gate.contiguous(), up.contiguous()))
    assert_close(out, F.silu(gate.double()) * up.double(), dtype, "halves")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp(1000) = inf, as wanted
def test_silu_and_mul_extreme_gates_stay_finite(backend, device):
    gate = torch.tensor([[-1000.0, -90.0, -20.0, 0.0, 20.0, 90.0, 1000.0]], device=device)
    up = torch.full_like(gate, 2.0)
    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    out = K.silu_and_mul(g, u)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(g.grad).all() and torch.isfinite(u.grad).all()
    g64, u64 = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    gold = K.silu_and_mul_ref(g64, u64)
    gold.sum().backward()
    assert_close(out, gold, torch.float32, "out")
    assert_close(g.grad, g64.grad, torch.float32, "dgate")
    assert_close(u.grad, u64.grad, torch.float32, "dup")


def test_silu_and_mul_float64_and_no_grad(backend, device):
    gate = randn(3, 10, dtype=torch.float64, device=device, seed=7)
    up = randn(3, 10, dtype=torch.float64, device=device, seed=8)
    assert torch.equal(K.silu_and_mul(gate, up), F.silu(gate) * up)  # float64 always takes the reference
    g32 = gate.float().requires_grad_(True)
    with torch.no_grad():
        out = K.silu_and_mul(g32, up.float())
    assert out.grad_fn is None


def test_silu_and_mul_gradcheck_reference():
    gate = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(K.silu_and_mul_ref, (gate, up))


def test_silu_and_mul_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="gate must have dtype"):
        K.silu_and_mul(x.long(), x)
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        K.silu_and_mul(x, 1.0)
    with pytest.raises(ValueError, match=r"up must have the shape of gate \(2, 8\), got \(2, 9\)"):
        K.silu_and_mul(x, torch.randn(2, 9))
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        K.silu_and_mul(x, x.half())
    with pytest.raises(ValueError, match="0-d"):
        K.silu_and_mul(torch.tensor(1.0), torch.tensor(1.0))
