"""logprobs_from_logits / entropy_from_logits against their float64 reference, forward and gradient, every backend.

Under the CPU interpreter the Triton kernels use 256-wide vocabulary tiles (``_INTERPRET_MAX_BLOCK_V``), so V = 512 and
V = 1031 run the multi-tile online log-sum-exp merge (and V = 1031 a 7-wide tail tile). The interpreter costs ~2-5 ms
per program: rows stay <= 64 here, and N >= 65,536 rows is tested through the grid the launcher builds (a real launch
of that size runs in the GPU-only test at the bottom).
"""

import math

import pytest
import torch

from kernels import logprobs as LP
from kernels.logprobs import (
    entropy_from_logits,
    entropy_from_logits_ref,
    logprobs_from_logits,
    logprobs_from_logits_ref,
)
from tests._numerics import INPUT_DTYPES, assert_close, randn

CPP_OPS = ("logprobs_from_logits", "entropy_from_logits")  # the backend fixture's "cpp" param: csrc/cpu/logprobs.cpp

# (leading shape, V): aligned, odd/prime, single row with V = 1 and V = 2
SHAPES = [((8,), 512), ((3, 7), 1031), ((1,), 1), ((1,), 2)]


def _labels(lead, V, device, seed, ignore_index=-100, ignore_frac=0.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    labels = torch.randint(0, V, lead, generator=g)
    if ignore_frac:
        labels[torch.rand(lead, generator=g) < ignore_frac] = ignore_index
    return labels.to(device)


def _check_against_gold(logits, labels, *, temperature=1.0, ignore_index=-100, seed=7):
    """Run ours (lp and entropy, random upstream grads for both) and the float64 gold on the same rounded logits.

    Returns ``(lp, entropy, grad)`` of ours for extra assertions."""
    dtype = logits.dtype
    before = logits.detach().clone()
    ours_in = logits.detach().clone().requires_grad_(True)
    lp, ent = logprobs_from_logits(ours_in, labels, temperature=temperature, ignore_index=ignore_index,
                                   return_entropy=True)
    dlp = randn(lp.numel(), dtype=torch.float32, device=lp.device, seed=seed).reshape(lp.shape)
    dent = randn(lp.numel(), dtype=torch.float32, device=lp.device, seed=seed + 1).reshape(lp.shape)
    torch.autograd.backward([lp, ent], [dlp, dent])

    gold_in = logits.detach().double().requires_grad_(True)
    lp64, ent64 = logprobs_from_logits_ref(gold_in, labels, temperature=temperature, ignore_index=ignore_index,
                                           return_entropy=True)
    torch.autograd.backward([lp64, ent64], [dlp.double(), dent.double()])

    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == labels.shape and ent.shape == labels.shape
    assert_close(lp, lp64, torch.float32, "logprobs")
    assert_close(ent, ent64, torch.float32, "entropy")
    assert ours_in.grad.dtype == dtype and ours_in.grad.shape == logits.shape
    assert_close(ours_in.grad, gold_in.grad, dtype, "dlogits")
    assert torch.equal(ours_in.detach(), before), "the logits were modified"
    return lp, ent, ours_in.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_matches_float64(backend, device, shape, dtype, temperature):
    lead, V = shape
    logits = randn(*lead, V, dtype=dtype, device=device, seed=1, scale=2.0)
    labels = _labels(lead, V, device, seed=2)
    _check_against_gold(logits, labels, temperature=temperature)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_logprobs_strided_batch_is_read_in_place(backend, device, dtype):
    """The common call: logits[:, :-1, :] of the model's [B, L, V] output (not contiguous), labels input_ids[:, 1:]."""
    B, L, V = 3, 9, 300
    base = randn(B, L, V, dtype=dtype, device=device, seed=3, scale=2.0)
    ids = _labels((B, L), V, device, seed=4)
    logits, labels = base[:, :-1, :], ids[:, 1:]
    assert not logits.is_contiguous()
    x, L2, stride_b, stride_t = LP._row_layout(logits)
    assert x.data_ptr() == logits.data_ptr() and (L2, stride_b, stride_t) == (L - 1, L * V, V)  # no copy
    _check_against_gold(logits, labels, temperature=0.7)

    # gradient flows back into the unsliced leaf: the dropped last position gets exactly 0
    leaf = base.clone().requires_grad_(True)
    lp, ent = logprobs_from_logits(leaf[:, :-1, :], labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(leaf.grad[:, -1], torch.zeros_like(leaf.grad[:, -1]))
    assert torch.equal(leaf.detach(), base)


def test_logprobs_other_layouts(backend, device):
    """Three leading dims that split in two levels; ones that do not (copied); a strided last dim (copied); 1-D."""
    V = 40
    base = randn(2, 3, 5, V, dtype=torch.float32, device=device, seed=5)
    two_level = base[:, :, :-1, :]  # dims 0 and 1 merge
    assert LP._row_layout(two_level)[0].data_ptr() == base.data_ptr()
    _check_against_gold(two_level, _labels(two_level.shape[:-1], V, device, seed=6))
    no_merge = base[:, :-1, :-1, :]
    _check_against_gold(no_merge, _labels(no_merge.shape[:-1], V, device, seed=7))
    strided_v = randn(V, 6, dtype=torch.float32, device=device, seed=8).t()  # [6, V] with column stride 6
    _check_against_gold(strided_v, _labels((6,), V, device, seed=9))
    one_d = randn(V, dtype=torch.bfloat16, device=device, seed=10)
    lp, ent, _ = _check_against_gold(one_d, torch.tensor(3, device=device))
    assert lp.shape == () and ent.shape == ()


def test_logprobs_int32_labels_and_single_output(backend, device):
    V = 97
    logits = randn(6, V, dtype=torch.bfloat16, device=device, seed=11)
    labels = _labels((6,), V, device, seed=12)
    gold = logprobs_from_logits_ref(logits.double(), labels)
    out = logprobs_from_logits(logits, labels.int())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert_close(out, gold, torch.float32, "logprobs")

    # only one of the two outputs used: the other's gradient is absent (None inside the backward)
    x = logits.clone().requires_grad_(True)
    logprobs_from_logits(x, labels).sum().backward()
    x64 = logits.double().requires_grad_(True)
    logprobs_from_logits_ref(x64, labels).sum().backward()
    assert_close(x.grad, x64.grad, torch.bfloat16, "dlogits (lp only)")
    x.grad = None
    logprobs_from_logits(x, labels, return_entropy=True)[1].sum().backward()
    x64.grad = None
    logprobs_from_logits_ref(x64, labels, return_entropy=True)[1].sum().backward()
    assert_close(x.grad, x64.grad, torch.bfloat16, "dlogits (entropy only)")


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_logprobs_ignore_index(backend, device, dtype):
    V = 130
    logits = randn(4, 5, V, dtype=dtype, device=device, seed=13, scale=2.0)
    labels = _labels((4, 5), V, device, seed=14, ignore_frac=0.4)
    labels[0, 0], labels[3, 4] = -100, 5
    ignored = labels == -100
    lp, ent, grad = _check_against_gold(logits, labels, temperature=0.7)
    assert torch.equal(lp[ignored], torch.zeros_like(lp[ignored]))
    assert torch.equal(ent[ignored], torch.zeros_like(ent[ignored]))
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    assert (grad[~ignored].abs().sum(-1) > 0).all()

    # an ignore_index inside [0, V) also skips those rows (F.cross_entropy semantics)
    lp, ent, grad = _check_against_gold(logits, labels.clamp_min(0), ignore_index=5)
    skip = labels.clamp_min(0) == 5
    assert skip.any() and (lp[skip] == 0).all() and (ent[skip] == 0).all() and (grad[skip] == 0).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_logprobs_ignored_rows_non_finite_never_leak(backend, device, poison):
    # prompt/padding rows (label == ignore_index) full of NaN/inf: the other rows, both outputs and the whole gradient
    # are those of clean logits, and the ignored rows' gradient is exactly 0 (not 0 * nan)
    V = 37
    logits = randn(3, 5, V, dtype=torch.float32, device=device, seed=16)
    labels = _labels((3, 5), V, device, seed=17, ignore_frac=0.4)
    labels[0, 0], labels[2, 4] = -100, 3
    ignored = labels == -100
    upstream = randn(3, 5, dtype=torch.float32, device=device, seed=18)
    grads, outs = [], []
    for x in (logits, logits.masked_fill(ignored.unsqueeze(-1), poison)):
        x = x.clone().requires_grad_(True)
        lp, ent = logprobs_from_logits(x, labels, return_entropy=True, temperature=0.7)
        ((lp + ent) * upstream).sum().backward()
        outs.append((lp.detach(), ent.detach()))
        grads.append(x.grad)
    assert torch.isfinite(outs[1][0]).all() and torch.isfinite(outs[1][1]).all()
    assert_close(outs[1][0], outs[0][0], torch.float32, "logprobs")
    assert_close(outs[1][1], outs[0][1], torch.float32, "entropy")
    assert torch.isfinite(grads[1]).all() and torch.all(grads[1][ignored] == 0)
    assert_close(grads[1], grads[0], torch.float32, "dlogits")


def test_logprobs_all_rows_ignored(backend, device):
    logits = randn(3, 64, dtype=torch.bfloat16, device=device, seed=15).requires_grad_(True)
    labels = torch.full((3,), -100, device=device)
    lp, ent = logprobs_from_logits(logits, labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(lp, torch.zeros(3, device=device)) and torch.equal(ent, torch.zeros(3, device=device))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_large_logit_offset(backend, device, dtype, temperature):
    """A common offset of 1000 changes nothing: no overflow, no cancellation (max taken before dividing by T)."""
    V = 512
    logits = (randn(4, V, dtype=torch.float64, device=device, seed=16, scale=3.0) + 1000.0).to(dtype)
    lp, ent, _ = _check_against_gold(logits, _labels((4,), V, device, seed=17), temperature=temperature)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


def test_logprobs_empty_rows(backend, device):
    logits = torch.zeros(0, 7, device=device, requires_grad=True)
    lp, ent = logprobs_from_logits(logits, torch.zeros(0, dtype=torch.long, device=device), return_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,) and lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == (0, 7)


@pytest.mark.parametrize("shape", [((8,), 512), ((3, 7), 1031), ((1,), 1)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_entropy_matches_float64(backend, device, shape, dtype):
    lead, V = shape
    base = randn(*lead, V + 1, dtype=dtype, device=device, seed=18, scale=2.0)
    logits = base[..., :V]  # strided rows
    before = logits.clone()
    x = logits.clone().requires_grad_(True)
    ent = entropy_from_logits(x, temperature=0.7)
    dent = randn(*lead, dtype=torch.float32, device=device, seed=19)
    ent.backward(dent)
    x64 = logits.double().requires_grad_(True)
    gold = entropy_from_logits_ref(x64, temperature=0.7)
    gold.backward(dent.double())
    assert ent.dtype == torch.float32
    assert_close(ent, gold, torch.float32, "entropy")
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, "dlogits")
    assert torch.equal(logits, before)
    # the strided view itself, no clone
    assert_close(entropy_from_logits(logits, temperature=0.7), gold, torch.float32, "entropy (strided)")
    # the same numbers as the entropy output of logprobs_from_logits
    _, ent2 = logprobs_from_logits(logits, torch.zeros(lead, dtype=torch.long, device=device), temperature=0.7,
                                   return_entropy=True)
    assert_close(ent2, gold, torch.float32, "entropy (return_entropy)")


def test_references_gradcheck_and_float64_passthrough():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 4, -100], [2, 2, 1]])
    assert torch.autograd.gradcheck(
        lambda t: logprobs_from_logits_ref(t, labels, temperature=0.7, return_entropy=True), (x,))
    assert torch.autograd.gradcheck(lambda t: entropy_from_logits_ref(t, temperature=1.3), (x,))
    # float64 input takes the reference on every backend, and returns float64
    lp, ent = logprobs_from_logits(x, labels, return_entropy=True)
    assert lp.dtype == torch.float64 and ent.dtype == torch.float64
    assert torch.equal(lp, logprobs_from_logits_ref(x, labels))
    # closed forms: uniform logits give lp = -log V and H = log V
    u = torch.zeros(4, 8, dtype=torch.float64)
    lp, ent = logprobs_from_logits_ref(u, torch.arange(4), return_entropy=True)
    assert torch.allclose(lp, torch.full((4,), -math.log(8.0), dtype=torch.float64))
    assert torch.allclose(ent, -lp)


def test_many_rows_go_on_grid_axis_0():
    """N >= 65,536 rows (interpreting that many programs would take minutes; the GPU test below launches it)."""
    n_rows, V = 70_000, 151_936
    block = LP._MAX_BLOCK_V
    assert LP._fwd_grid(n_rows) == (n_rows,)
    assert LP._bwd_grid(n_rows, V, block) == (n_rows, 38)  # axis 1 holds the vocabulary tiles, far below 65,535
    with pytest.raises(ValueError, match="tiles"):
        LP._bwd_grid(1, 65_536 * 16, 16)


def test_many_rows_reference(device, monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "torch")
    logits = randn(65_537, 2, dtype=torch.float32, device=device, seed=20)
    labels = _labels((65_537,), 2, device, seed=21)
    assert_close(logprobs_from_logits(logits, labels), logprobs_from_logits_ref(logits.double(), labels),
                 torch.float32, "logprobs")


def test_bad_input(backend, device):
    logits = torch.randn(2, 3, 5, device=device)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\) .*got \(2, 4\)"):
        logprobs_from_logits(logits, torch.zeros(2, 4, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"labels must have dtype in \(int64, int32\), got float32"):
        logprobs_from_logits(logits, labels.float())
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        logprobs_from_logits(logits, [[0, 1, 2], [0, 1, 2]])
    bad = labels.clone()
    bad[1, 2] = 5
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\) or equal ignore_index=-100, got 5 at index "
                                         r"\(1, 2\)"):
        logprobs_from_logits(logits, bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="got -1"):
        logprobs_from_logits(logits, bad)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"temperature must be > 0, got {t}"):
            logprobs_from_logits(logits, labels, temperature=t)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            entropy_from_logits(logits, temperature=t)
    with pytest.raises(ValueError, match="temperature must be finite"):
        logprobs_from_logits(logits, labels, temperature=float("inf"))
    with pytest.raises(TypeError, match="logits must have dtype in .*got int64"):
        logprobs_from_logits(logits.long(), labels)
    with pytest.raises(TypeError, match="logits must have dtype"):
        entropy_from_logits(logits.long())
    with pytest.raises(ValueError, match=r"logits must have shape \[..., V\] with V >= 1, got \(2, 0\)"):
        entropy_from_logits(torch.zeros(2, 0, device=device))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        logprobs_from_logits(logits, labels, ignore_index=-100.0)
    with pytest.raises(ValueError, match="all inputs must be on one device"):
        logprobs_from_logits(logits, labels.to("meta"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_many_rows_and_int64_offsets():
    """65,537 rows on grid axis 0; and rows past element 2**31 of a V = 151,936 bf16 tensor (int64 offsets)."""
    dev = torch.device("cuda")
    logits = randn(65_537, 8, dtype=torch.bfloat16, device=dev, seed=22).requires_grad_(True)
    labels = _labels((65_537,), 8, dev, seed=23)
    lp = logprobs_from_logits(logits, labels)
    lp.sum().backward()
    x64 = logits.detach().double().requires_grad_(True)
    logprobs_from_logits_ref(x64, labels).sum().backward()
    assert_close(lp, logprobs_from_logits_ref(x64, labels), torch.float32, "logprobs")
    assert_close(logits.grad, x64.grad, torch.bfloat16, "dlogits")
    del logits, x64

    V, n_rows = 151_936, 14_200  # 14,200 * 151,936 > 2**31
    big = torch.randn(n_rows, V, device=dev, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, V, (n_rows,), device=dev)
    lp, ent = logprobs_from_logits(big, labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    tail = slice(n_rows - 4, n_rows)
    x64 = big.detach()[tail].double().requires_grad_(True)
    lp64, ent64 = logprobs_from_logits_ref(x64, labels[tail], return_entropy=True)
    (lp64.sum() + ent64.sum()).backward()
    assert_close(lp[tail], lp64, torch.float32, "logprobs")
    assert_close(ent[tail], ent64, torch.float32, "entropy")
    assert_close(big.grad[tail], x64.grad, torch.bfloat16, "dlogits")
