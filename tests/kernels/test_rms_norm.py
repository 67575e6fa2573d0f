"""rms_norm and fused_add_rms_norm against their float64 reference (HF LlamaRMSNorm), forward and gradients, through
every backend; strided head views; HF's roundings in low precision; bad input."""

import pytest
import torch

import kernels as K
from kernels._backend import interpreting
from tests._numerics import INPUT_DTYPES, assert_close, assert_within_twice_eager_error, randn

# aligned, odd/prime, 1-sized, the hidden sizes of Qwen2.5-0.5B (896) and a 704, per-head [N, H, D] rows, no rows
SHAPES = [(4, 64), (3, 37), (1, 1), (5, 896), (2, 704), (6, 3, 32), (2, 1, 3, 17), (0, 64)]
EPS = 1e-6


def weight(C, dtype, device, seed=7):
    return (1 + randn(C, dtype=torch.float64, device=device, seed=seed, scale=0.3)).to(dtype)


def assert_hf_bits(actual, hf_lowp, dtype, name, min_frac=0.99):
    """At least ``min_frac`` of the bf16/fp16 outputs equal HF's eager result in that dtype bit for bit: the kernel
    rounds where HF rounds (normalised x, then the product with w), only the float32 sum of squares differs (a
    round-once kernel matches ~75% of the elements). Skipped for float32 (nothing rounds), and for bf16 under the
    Triton interpreter, whose float32 -> bf16 cast truncates instead of rounding to nearest."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting()) or actual.numel() == 0:
        return
    frac = float((actual == hf_lowp).double().mean())
    assert frac >= min_frac, f"{name} ({dtype}): only {frac:.1%} of the elements equal HF's eager result"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_rms_norm_matches_float64(backend, device, shape, dtype):
    C = shape[-1]
    x = randn(*shape, dtype=dtype, device=device, seed=1, scale=2.0)
    w = weight(C, dtype, device)
    dout = randn(*shape, dtype=dtype, device=device, seed=3)

    x_ours, w_ours = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = K.rms_norm(x_ours, w_ours, EPS)
    out.backward(dout)

    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    gold = K.rms_norm_ref(x64, w64, EPS)
    gold.backward(dout.double())

    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    # two roundings to dtype (the normalised x, then the product with w), each <= half an ulp (the interpreter's
    # bf16 cast truncates: < 1 ulp each), so up to 2 ulp of bf16: the table's rtol
    assert_close(out, gold, dtype, "rms_norm")
    assert_hf_bits(out, K.rms_norm_ref(x, w, EPS), dtype, "rms_norm")
    assert x_ours.grad.dtype == dtype and w_ours.grad.dtype == dtype
    # gradients: HF's eager backward in dtype is itself far from float64 (dx = rstd (g - xhat mean(g xhat)) cancels,
    # dw sums the rows of a rounded product), so the kernels are judged by the flash-attention rule (STYLE 3)
    x_lp, w_lp = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    K.rms_norm_ref(x_lp, w_lp, EPS).backward(dout)
    assert_within_twice_eager_error(x_ours.grad, x64.grad, x_lp.grad, dtype, "dx")
    assert_within_twice_eager_error(w_ours.grad, w64.grad, w_lp.grad, dtype, "dw")


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_rms_norm_of_strided_head_views_reads_in_place(backend, device, dtype):
    """Qwen3's per-head norm on ``[N, H, D]`` q/k views of a wider projection (non-mergeable strides)."""
    N, H, H_kv, D = 5, 4, 2, 24
    qkv = randn(N, (H + 2 * H_kv) * D, dtype=dtype, device=device, seed=4, scale=3.0)
    q = qkv[:, : H * D].view(N, H, D)
    k = qkv[:, H * D: (H + H_kv) * D].view(N, H_kv, D)
    w = weight(D, dtype, device)
    assert not q.is_contiguous()
    for view in (q, k):
        got = K.rms_norm(view, w, EPS)
        assert torch.equal(got, K.rms_norm(view.contiguous(), w, EPS))
        assert_close(got, K.rms_norm_ref(view.double(), w.double(), EPS), dtype, "head norm")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_fused_add_rms_norm_matches_float64(backend, device, shape, dtype):
    C = shape[-1]
    x = randn(*shape, dtype=dtype, device=device, seed=5, scale=2.0)
    res = randn(*shape, dtype=dtype, device=device, seed=6, scale=3.0)
    w = weight(C, dtype, device)
    normed, res_out = K.fused_add_rms_norm(x, res, w, EPS)
    assert normed.dtype == dtype and res_out.dtype == dtype
    assert normed.shape == x.shape and res_out.shape == x.shape
    # the residual stream rounded once in dtype, as HF's `residual + hidden_states`
    assert_close(res_out, res.double() + x.double(), dtype, "residual_out")
    if not (interpreting() and dtype == torch.bfloat16):  # the interpreter's bf16 cast truncates
        assert torch.equal(res_out, res + x)
    # the norm of the residual the kernel produced
    assert_close(normed, K.rms_norm_ref(res_out.double(), w.double(), EPS), dtype, "normed")
    ref_normed, ref_res = K.fused_add_rms_norm_ref(x, res, w, EPS)
    assert torch.equal(ref_res, res + x) and torch.equal(ref_normed, K.rms_norm_ref(res + x, w, EPS))
    assert_hf_bits(normed, K.rms_norm_ref(res_out, w, EPS), dtype, "normed")


def test_reference_is_hf_op_for_op():
    """The CPU path runs the reference: bit for bit HF's LlamaRMSNorm (and the generator's former rms_norm)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in INPUT_DTYPES:
        norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(weight(96, dtype, "cpu"))
        x = randn(7, 96, dtype=dtype, device="cpu", seed=8, scale=4.0)
        assert torch.equal(K.rms_norm_ref(x, norm.weight, 1e-5), norm(x))
        res = randn(7, 96, dtype=dtype, device="cpu", seed=9)
        normed, r = K.fused_add_rms_norm_ref(x, res, norm.weight, 1e-5)
        assert torch.equal(r, res + x) and torch.equal(normed, norm(res + x))


def test_rms_norm_weight_dtype_promotes_as_hf(backend, device):
    """A float32 weight on bf16 activations gives float32 (HF: ``weight * x.to(input_dtype)``)."""
    x = randn(3, 40, dtype=torch.bfloat16, device=device, seed=10)
    w = weight(40, torch.float32, device)
    out = K.rms_norm(x, w, EPS)
    assert out.dtype == torch.float32
    ref = K.rms_norm_ref(x, w, EPS)
    assert_close(out, ref, torch.bfloat16, "promoted")  # one bf16 rounding (the normalised x) may differ
    normed, res_out = K.fused_add_rms_norm(x, x, w, EPS)
    assert normed.dtype == torch.float32 and res_out.dtype == torch.bfloat16


def test_rms_norm_float64_and_no_grad_paths(backend, device):
    x = randn(4, 33, dtype=torch.float64, device=device, seed=11)
    w = weight(33, torch.float64, device)
    assert torch.equal(K.rms_norm(x, w, EPS), K.rms_norm_ref(x, w, EPS))  # float64 always takes the reference
    x32, w32 = x.float().requires_grad_(True), w.float().requires_grad_(True)
    with torch.no_grad():
        out = K.rms_norm(x32, w32, EPS)
    assert out.grad_fn is None
    assert torch.equal(out, K.rms_norm(x32.detach(), w32.detach(), EPS))


def test_fused_add_rms_norm_gradient_runs_the_reference(backend, device):
    """Inference op: with autograd on it falls back to the differentiable reference."""
    x = randn(3, 16, dtype=torch.float32, device=device, seed=12).requires_grad_(True)
    res = randn(3, 16, dtype=torch.float32, device=device, seed=13).requires_grad_(True)
    w = weight(16, torch.float32, device)
    normed, res_out = K.fused_add_rms_norm(x, res, w, EPS)
    (normed.sum() + res_out.sum()).backward()
    x64, r64 = x.detach().double().requires_grad_(True), res.detach().double().requires_grad_(True)
    n64, ro64 = K.fused_add_rms_norm_ref(x64, r64, w.double(), EPS)
    (n64.sum() + ro64.sum()).backward()
    assert_close(x.grad, x64.grad, torch.float32, "dx")
    assert_close(res.grad, r64.grad, torch.float32, "dresidual")


def test_rms_norm_gradcheck_reference():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: K.rms_norm_ref(a, b, EPS), (x, w))


def test_rms_norm_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="x must have dtype"):
        K.rms_norm(x.long(), torch.ones(8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        K.rms_norm([1.0], torch.ones(1))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\) \(x's last dim\), got \(7,\)"):
        K.rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="weight must have 1 dimensions"):
        K.rms_norm(x, torch.ones(1, 8))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        K.rms_norm(x, torch.ones(8), -1e-6)
    with pytest.raises(ValueError, match="eps must be finite"):
        K.rms_norm(x, torch.ones(8), float("nan"))
    with pytest.raises(ValueError, match=r"last dim must be in \[1, 65536\], got 0"):
        K.rms_norm(torch.randn(2, 0), torch.ones(0))
    with pytest.raises(ValueError, match="0-d"):
        K.rms_norm(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(2, 8\), got \(3, 8\)"):
        K.fused_add_rms_norm(x, torch.randn(3, 8), torch.ones(8))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        K.fused_add_rms_norm(x, x.half(), torch.ones(8))
