"""fused_linear_logprobs against the float64 reference (hidden @ W.T + b, then log-softmax): values, entropy and the
gradients of hidden, weight and bias, with several chunks per call, through both backends."""

import pytest
import torch

from kernels.fused_linear_logprobs import fused_linear_logprobs, fused_linear_logprobs_ref
from tests._numerics import INPUT_DTYPES, assert_close, randn

# (N, H, V, chunk_size): aligned, odd/prime with a ragged last chunk, 1-sized; None: one chunk (the forward's tile
# is kept for the backward).
SHAPES = [(16, 32, 64, 8), (13, 33, 37, 5), (1, 8, 1, None), (7, 5, 300, 3), (11, 24, 53, None)]


def make_inputs(N, H, V, dtype, device, seed=0):
    hidden = randn(N, H, dtype=dtype, device=device, seed=seed)
    weight = randn(V, H, dtype=dtype, device=device, seed=seed + 1, scale=H ** -0.5 * 3)
    bias = randn(V, dtype=dtype, device=device, seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    labels = torch.randint(0, V, (N,), generator=g)
    if N > 2:
        labels[1] = -100
    return hidden, weight, bias, labels.to(device)


# measured: bf16 <= 3.0e-3, fp16 <= 4.5e-4 over these shapes
NORMWISE_GRAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("with_bias, temperature", [(True, 0.7), (False, 1.0)])
def test_fused_linear_logprobs_matches_float64(backend, device, shape, dtype, with_bias, temperature):
    N, H, V, chunk = shape
    hidden, weight, bias, labels = make_inputs(N, H, V, dtype, device)
    g_lp = randn(N, dtype=torch.float32, device=device, seed=10)
    g_ent = randn(N, dtype=torch.float32, device=device, seed=11)

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    h, w, b = leaves
    lp, ent = fused_linear_logprobs(h, w, labels, bias=b if with_bias else None, temperature=temperature,
                                    return_entropy=True, chunk_size=chunk)
    torch.autograd.backward([lp, ent], [g_lp, g_ent])

    gold_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    h64, w64, b64 = gold_leaves
    lp64, ent64 = fused_linear_logprobs_ref(h64, w64, labels, bias=b64 if with_bias else None,
                                            temperature=temperature, return_entropy=True)
    torch.autograd.backward([lp64, ent64], [g_lp.double(), g_ent.double()])

    assert lp.dtype == ent.dtype == torch.float32
    # fp32 sums of H products per logit, then a V-wide log-sum-exp: a few float32 ulps of the logits' magnitude.
    assert_close(lp, lp64, torch.float32, "logprobs", scale=5)
    assert_close(ent, ent64, torch.float32, "entropy", scale=5)
    names = ("dhidden", "dweight", "dbias") if with_bias else ("dhidden", "dweight")
    for name, ours, gold in zip(names, leaves, gold_leaves):
        assert ours.grad.dtype == dtype
        if dtype == torch.float32:
            assert_close(ours.grad, gold.grad, dtype, name, scale=5)
        else:
            # bf16/fp16 weights: the logit gradient is rounded to the weight's dtype before the two backward GEMMs
            # (as plain bf16 autograd and TRL do; cuBLAS wants both operands in one dtype). dhidden = dz @ W sums V
            # terms that cancel (sum(dz) = 0), so single elements can be far off in relative terms while the
            # tensor is right: compare norm-wise, at the precision of the dtype (METHOD: bf16 1e-3 .. 1e-2).
            err, ref = float((ours.grad.double() - gold.grad).norm()), float(gold.grad.norm())
            assert err <= NORMWISE_GRAD_TOL[dtype] * ref, f"{name} ({dtype}): norm-wise relative error {err / ref:.3g}"
    if not with_bias:
        assert b.grad is None
    if N > 2:
        assert lp[1].item() == 0.0 and ent[1].item() == 0.0


def test_fused_linear_logprobs_frozen_head_and_logprobs_only(backend, device):
    hidden, weight, _, labels = make_inputs(9, 16, 50, torch.float32, device, seed=3)
    h = hidden.clone().requires_grad_(True)
    lp = fused_linear_logprobs(h, weight, labels, chunk_size=4)
    lp.sum().backward()
    h64 = hidden.double().requires_grad_(True)
    fused_linear_logprobs_ref(h64, weight.double(), labels).sum().backward()
    assert weight.grad is None
    assert_close(h.grad, h64.grad, torch.float32, "dhidden", scale=5)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_fused_linear_logprobs_ignored_rows_non_finite_never_leak(backend, device, poison):
    # hidden states of ignored rows (prompt/padding) full of NaN/inf: outputs and the gradients of hidden, weight and
    # bias equal the clean ones; dW = dz.T @ h would be 0 * nan = NaN if those rows entered the product
    N, H, V = 7, 5, 11
    hidden, weight, bias, labels = make_inputs(N, H, V, torch.float32, device, seed=20)
    labels[4] = -100
    ignored = labels == -100
    results = []
    for h in (hidden, hidden.masked_fill(ignored.unsqueeze(-1), poison)):
        h, w, b = (t.clone().requires_grad_(True) for t in (h, weight, bias))
        lp, ent = fused_linear_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=3)
        (lp.sum() + 0.5 * ent.sum()).backward()
        results.append((lp.detach(), ent.detach(), h.grad, w.grad, b.grad))
    for name, got, gold in zip(("logprobs", "entropy", "dhidden", "dweight", "dbias"), results[1], results[0]):
        assert torch.isfinite(got).all(), name
        assert_close(got, gold, torch.float32, name)
    assert torch.all(results[1][2][ignored] == 0)


def test_fused_linear_logprobs_bad_input():
    h, w, labels = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\] with H = hidden.shape\[1\] = 8"):
        fused_linear_logprobs(h, torch.randn(10, 7), labels)
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        fused_linear_logprobs(h, w.half(), labels)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        fused_linear_logprobs(h, w, labels, bias=torch.randn(9))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fused_linear_logprobs(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_linear_logprobs(h, w, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be finite, got inf"):
        fused_linear_logprobs(h, w, labels, temperature=float("inf"))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_linear_logprobs(h, w, labels, chunk_size=0)


@pytest.mark.parametrize("chunk, tiles", [(None, 1), (4, 2 * 3)])  # N = 10: one chunk, or three chunks of <= 4
def test_fused_linear_logprobs_recomputes_tiles_only_across_chunks(monkeypatch, chunk, tiles):
    """One chunk: the forward's logit tile serves the backward (one GEMM); several: each tile is recomputed. A second
    backward through a retained graph gives the same gradients either way."""
    import sys

    mod = sys.modules["kernels.fused_linear_logprobs"]  # the package's attribute of that name is the function
    calls = []
    real = mod._chunk_logits
    monkeypatch.setattr(mod, "_chunk_logits", lambda *a: calls.append(1) or real(*a))
    hidden, weight, _, labels = make_inputs(10, 16, 30, torch.float32, "cpu", seed=5)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    lp = fused_linear_logprobs(h, w, labels, chunk_size=chunk)
    g = randn(10, dtype=torch.float32, device="cpu", seed=6)
    first = torch.autograd.grad(lp, (h, w), g, retain_graph=True)
    assert len(calls) == tiles
    second = torch.autograd.grad(lp, (h, w), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = fused_linear_logprobs_ref(h, w, labels)
    for ours, gold in zip(first, torch.autograd.grad(ref, (h, w), g)):
        assert_close(ours, gold, torch.float32, "grad", scale=5)
