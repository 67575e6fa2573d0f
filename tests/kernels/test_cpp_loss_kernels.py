"""The compiled CPU kernels of the loss side (``csrc/cpu/logprobs.cpp``, ``csrc/cpu/ppo_loss.cpp``) on what the
backend-parametrised tests of ``test_logprobs.py`` / ``test_ppo_loss.py`` do not reach: leading dims read in place
with any strides, vocabularies across the kernel's 2048-element blocks, single rows, -inf logits, strided / broadcast /
mixed-dtype PPO inputs, token tiles of 256 with ragged tails (gspo and cispo too), the ops' own argument errors, the
stale-library guard of ``ppo_loss`` and the default CPU dispatch end to end. Every comparison is against the float64
reference on the same rounded inputs."""

import importlib

import pytest
import torch

from kernels import _extension
from kernels import logprobs as LP
from kernels._backend import select_backend
from kernels.logprobs import (
    entropy_from_logits,
    entropy_from_logits_ref,
    logprobs_from_logits,
    logprobs_from_logits_ref,
)
from kernels.loss_agg import LOSS_AGG_MODES
from kernels.ppo_loss import METRIC_NAMES, ppo_loss, ppo_loss_ref
from tests._numerics import INPUT_DTYPES, assert_close, randn, random_mask

OPS = ("logprobs_from_logits", "entropy_from_logits", "logprobs_from_logits_backward", "ppo_loss", "loss_agg_rows")


@pytest.fixture
def cpp(monkeypatch):
    """Force the compiled kernels (skipped with RLHF_ENGINE_BUILD_EXT=0; a build that lacks an op fails)."""
    if not _extension.enabled():
        pytest.skip("compiled extension disabled (RLHF_ENGINE_BUILD_EXT=0)")
    missing = [op for op in OPS if not _extension.has_op(op)]
    if missing:
        pytest.fail(f"compiled extension lacks {missing}: {_extension.extension_error()}")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cpp")
    return torch.ops.rlhf_engine


def _labels(lead, V, seed, ignore_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, lead, generator=g)
    if ignore_frac:
        labels[torch.rand(lead, generator=g) < ignore_frac] = -100
    return labels


def _check_logprobs(logits, labels, temperature=0.7, seed=3):
    """Ours (cpp, both outputs, random upstream gradients) against the float64 reference; returns ours."""
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = logprobs_from_logits(x, labels, temperature=temperature, return_entropy=True)
    g_lp = randn(lp.numel(), dtype=torch.float32, device="cpu", seed=seed).reshape(lp.shape)
    g_ent = randn(lp.numel(), dtype=torch.float32, device="cpu", seed=seed + 1).reshape(lp.shape)
    torch.autograd.backward([lp, ent], [g_lp, g_ent])
    x64 = logits.detach().double().requires_grad_(True)
    lp64, ent64 = logprobs_from_logits_ref(x64, labels, temperature=temperature, return_entropy=True)
    torch.autograd.backward([lp64, ent64], [g_lp.double(), g_ent.double()])
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    assert_close(lp, lp64, torch.float32, "logprobs")
    assert_close(ent, ent64, torch.float32, "entropy")
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    assert_close(x.grad, x64.grad, logits.dtype, "dlogits")
    return lp, ent, x.grad


# V: a single logit, odd, below one block, one past a block (2048), several blocks with a ragged tail
VOCABS = [1, 7, 1000, 2049, 5000]


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_logprobs_strided_leading_dims_read_in_place(cpp, V, dtype):
    base = randn(2, 4, 5, V, dtype=dtype, device="cpu", seed=V, scale=2.0)
    views = {
        "two-level": base[:, :, :-1, :],
        "no-merge": base[:, :-1, 1:, :],  # three strided levels: the Triton launcher copies this one, cpp does not
        "transposed": base.transpose(0, 2)[:, ::2],
        "broadcast": base[0, 0].unsqueeze(0).expand(3, 5, V),  # stride 0 on the leading dim
    }
    for name, logits in views.items():
        labels = _labels(logits.shape[:-1], V, seed=len(name), ignore_frac=0.2)
        if V > 1:
            # the compiled forward keeps the view itself (no contiguous copy) for the backward
            layout = LP._logprobs_fwd(logits, labels, 1.0, -100, "cpp")[4]
            assert len(layout) == 1 and layout[0].data_ptr() == logits.data_ptr(), name
        _check_logprobs(logits, labels)


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_logprobs_one_row(cpp, V, dtype):
    logits = randn(1, V, dtype=dtype, device="cpu", seed=10 + V, scale=3.0)
    _check_logprobs(logits, _labels((1,), V, seed=V), temperature=1.3)
    _check_logprobs(logits[0], torch.tensor(V - 1))  # 1-D logits, 0-d label
    ent = entropy_from_logits(logits, temperature=0.5)
    assert_close(ent, entropy_from_logits_ref(logits.double(), temperature=0.5), torch.float32, "entropy")
    lp, ent, grad = _check_logprobs(logits, torch.tensor([-100]))  # the only row ignored
    assert lp.item() == 0 and ent.item() == 0 and torch.all(grad == 0)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_logprobs_ignored_rows_never_read(cpp, poison, dtype):
    V = 5000  # three blocks
    logits = randn(4, 3, V, dtype=dtype, device="cpu", seed=21, scale=2.0)
    labels = _labels((4, 3), V, seed=22, ignore_frac=0.4)
    labels[0, 0], labels[3, 2] = -100, 11
    ignored = labels == -100
    clean = _check_logprobs(logits, labels)
    bad = _check_logprobs(logits.masked_fill(ignored.unsqueeze(-1), poison), labels)
    for a, b in zip(clean, bad):
        assert torch.equal(a, b)
    assert torch.all(bad[2][ignored] == 0)


def test_logprobs_negative_infinite_logits(cpp):
    """-inf logits (a masked vocabulary), also filling the first blocks of a row: the log-probs are the reference's
    (finite); the entropy is NaN exactly where the reference's p * log p is (0 * -inf)."""
    V = 6000
    logits = randn(3, V, dtype=torch.float32, device="cpu", seed=31)
    logits[0, :4500] = -float("inf")  # two whole blocks, then part of the third
    logits[1, 100:200] = -float("inf")
    labels = torch.tensor([4600, 300, 5])
    lp, ent = logprobs_from_logits(logits, labels, return_entropy=True)
    lp64, ent64 = logprobs_from_logits_ref(logits.double(), labels, return_entropy=True)
    assert_close(lp, lp64, torch.float32, "logprobs")
    assert torch.equal(torch.isnan(ent), torch.isnan(ent64)) and torch.isnan(ent[:2]).all()
    assert_close(ent[2], ent64[2], torch.float32, "entropy of the finite row")
    x = logits.clone().requires_grad_(True)
    logprobs_from_logits(x, labels).sum().backward()  # log-probs only: a finite gradient, 0 at the -inf logits
    x64 = logits.double().requires_grad_(True)
    logprobs_from_logits_ref(x64, labels).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[0, :4500] == 0)
    assert_close(x.grad, x64.grad, torch.float32, "dlogits")
    # a NaN logit in a valid row is NaN out, also inside a block of -inf (which the max skips)
    for pos in (10, 3000):
        bad = logits.clone()
        bad[0, pos] = float("nan")
        assert torch.isnan(logprobs_from_logits(bad, labels)[0])


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_entropy_only_and_single_output_gradients(cpp, dtype):
    logits = randn(6, 2500, dtype=dtype, device="cpu", seed=41, scale=2.0)[:, 3:]  # strided rows
    labels = _labels((6,), logits.shape[-1], seed=42)
    for which in ("lp", "ent", "entropy_fn"):
        x = logits.clone().requires_grad_(True)
        x64 = logits.double().requires_grad_(True)
        if which == "entropy_fn":
            entropy_from_logits(x, temperature=0.9).sum().backward()
            entropy_from_logits_ref(x64, temperature=0.9).sum().backward()
        else:
            i = 0 if which == "lp" else 1
            logprobs_from_logits(x, labels, temperature=0.9, return_entropy=True)[i].sum().backward()
            logprobs_from_logits_ref(x64, labels, temperature=0.9, return_entropy=True)[i].sum().backward()
        assert_close(x.grad, x64.grad, dtype, f"dlogits ({which})")


def test_logprobs_op_argument_errors(cpp):
    x = torch.randn(2, 3, 5)
    labels = torch.zeros(2, 3, dtype=torch.long).reshape(-1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\) or equal ignore_index=-100, got 7 at index 4"):
        cpp.logprobs_from_logits(x, torch.tensor([0, 1, 2, 3, 7, 0]), 1.0, -100)
    with pytest.raises(TypeError, match="labels must be int64 or int32, got Float"):
        cpp.logprobs_from_logits(x, labels.float(), 1.0, -100)
    with pytest.raises(ValueError, match=r"labels must have shape \[6\] \(one per row of logits\), got \[5\]"):
        cpp.logprobs_from_logits(x, labels[:5], 1.0, -100)
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16, got Double"):
        cpp.entropy_from_logits(x.double(), 1.0)
    with pytest.raises(ValueError, match=r"logits must have shape \[..., V\] with V >= 1, got \[2, 0\]"):
        cpp.entropy_from_logits(torch.zeros(2, 0), 1.0)
    with pytest.raises(ValueError, match="logits must have unit stride in the last dim"):
        cpp.entropy_from_logits(torch.randn(5, 4).t(), 1.0)
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            cpp.logprobs_from_logits(x, labels, t, -100)
    _, _, stats = cpp.logprobs_from_logits(x, labels, 1.0, -100)
    g = torch.ones(6)
    with pytest.raises(ValueError, match=r"stats must have shape \[3, 6\]"):
        cpp.logprobs_from_logits_backward(x, labels, g, None, stats[:2], 1.0, -100)
    with pytest.raises(TypeError, match="grad_entropy must be Float, got Half"):
        cpp.logprobs_from_logits_backward(x, labels, None, g.half(), stats, 1.0, -100)
    with pytest.raises(ValueError, match=r"grad_logprobs must have shape \[6\], got \[2, 3\]"):
        cpp.logprobs_from_logits_backward(x, labels, g.view(2, 3), None, stats, 1.0, -100)
    with pytest.raises(ValueError, match="grad_logprobs needs labels"):
        cpp.logprobs_from_logits_backward(x, None, g, None, stats, 1.0, -100)
    assert torch.equal(cpp.logprobs_from_logits_backward(x, labels, None, None, stats, 1.0, -100),
                       torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------------- ppo_loss
def _ppo_inputs(B, T, seed, dtype=torch.float32):
    lp = randn(B, T, dtype=dtype, device="cpu", seed=seed, scale=0.5) - 1.0
    old = (lp.double() + randn(B, T, dtype=torch.float64, device="cpu", seed=seed + 1, scale=0.3)).to(dtype)
    ref = (lp.double() + randn(B, T, dtype=torch.float64, device="cpu", seed=seed + 2, scale=0.4)).to(dtype)
    adv = randn(B, T, dtype=dtype, device="cpu", seed=seed + 3)
    mask = random_mask(B, T, "cpu", seed + 4, full_rows=(0,), empty_rows=(B - 1,) if B > 2 else ())
    if T > 4:  # holes inside the responses too
        mask[:, T // 3] = False
    return lp, old, ref, adv, mask


def _check_ppo(lp, old, adv, mask, scale=5, **kw):
    x = lp.detach().clone().requires_grad_(True)
    loss, metrics = ppo_loss(x, old, adv, mask, **kw)
    loss.backward()
    x64 = lp.detach().double().requires_grad_(True)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gold, gold_metrics = ppo_loss_ref(x64, old.double(), adv.double(), mask, **kw64)
    gold.backward()
    assert_close(loss, gold, torch.float32, "loss", scale=scale)
    for name in METRIC_NAMES:
        assert_close(metrics[name], gold_metrics[name], torch.float32, name, scale=scale)
    assert x.grad.dtype == lp.dtype
    assert_close(x.grad, x64.grad, lp.dtype, "dlogprobs")
    assert torch.all(x.grad[~mask.bool()] == 0)
    return loss, metrics, x.grad


@pytest.mark.parametrize("shape", [(1, 1), (1, 257), (3, 600), (6, 1000)])  # token tiles of 256: ragged tails
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_ppo_loss_tiles_and_modes(cpp, shape, mode):
    B, T = shape
    lp, old, ref, adv, mask = _ppo_inputs(B, T, seed=50)
    for kw in (dict(clip_ratio_c=3.0, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k3"),
               dict(clip_ratio_high=0.28, ref_logprobs=ref, kl_coef=0.0, kl_estimator="abs")):
        _check_ppo(lp, old, adv, mask, loss_agg_mode=mode, **kw)
        n_tok, n_seq = max(int(mask.sum()) + 5, 1), max(int(mask.any(-1).sum()) + 1, 1)
        _check_ppo(lp, old, adv, mask, loss_agg_mode=mode, global_num_tokens=n_tok, global_num_seqs=n_seq,
                   loss_scale_factor=T + 3, **kw)


@pytest.mark.parametrize("shape", [(1, 257), (3, 600)])
@pytest.mark.parametrize("policy", ["gspo", "cispo"])
def test_ppo_loss_policy_losses_across_tiles(cpp, shape, policy):
    """gspo's per-row ratio and cispo's weights on rows of several 256-token tiles, with every option."""
    B, T = shape
    lp, old, ref, adv, mask = _ppo_inputs(B, T, seed=55)
    old = old + torch.tensor([0.45, -0.6, 0.0])[:B, None]  # gspo: one row clipped low, one high, one inside
    isw = adv.abs() + 0.5
    for kw in ({"ref_logprobs": ref, "kl_coef": 0.1, "kl_estimator": "k3", "rollout_is_weights": isw},
               {"clip_ratio_high": 0.28, "rollout_is_weights": isw[:, 0].clone()}):
        if policy == "gspo":
            kw["clip_ratio_c"] = 1.5
        _check_ppo(lp, old, adv, mask, policy_loss=policy, **kw)
        n_tok, n_seq = max(int(mask.sum()) + 5, 1), max(int(mask.any(-1).sum()) + 1, 1)
        _check_ppo(lp, old, adv, mask, policy_loss=policy, global_num_tokens=n_tok, global_num_seqs=n_seq, **kw)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_ppo_loss_strided_and_broadcast_inputs(cpp, dtype):
    B, T = 5, 300
    lp, old, ref, adv, mask = _ppo_inputs(B, T, seed=60, dtype=dtype)
    wide = torch.stack([lp, lp + 1], dim=-1).reshape(B, 2 * T)
    lp_strided = wide[:, ::2]  # column stride 2
    old_t = old.t().contiguous().t()  # column-major
    ref_t = ref.t().contiguous().t()
    assert not lp_strided.is_contiguous() and not old_t.is_contiguous()
    seq_adv = adv[:, 0].clone()
    isw_row = randn(B, dtype=torch.float64, device="cpu", seed=61).abs().to(dtype)
    isw_tok = randn(T, B, dtype=torch.float64, device="cpu", seed=62).abs().to(dtype).t()  # strided [B, T]
    for a, w in ((adv, None), (seq_adv, isw_row), (seq_adv[:, None], isw_row[:, None]), (adv.t().contiguous().t(),
                                                                                       isw_tok)):
        _check_ppo(lp_strided, old_t, a, mask, clip_ratio_c=2.0, ref_logprobs=ref_t, kl_coef=0.2,
                   kl_estimator="k2", rollout_is_weights=w, loss_agg_mode="seq-mean-token-mean")
    for policy in ("gspo", "cispo"):
        _check_ppo(lp_strided, old_t, seq_adv, mask, ref_logprobs=ref_t, kl_coef=0.2, kl_estimator="k2",
                   rollout_is_weights=isw_tok, policy_loss=policy)


def test_ppo_loss_mixed_dtypes_and_number_masks(cpp):
    B, T = 4, 100
    lp, old, ref, adv, mask = _ppo_inputs(B, T, seed=70)
    lp16, adv16 = lp.bfloat16(), adv.half()
    for policy in ("vanilla", "gspo", "cispo"):
        loss, metrics, grad = _check_ppo(lp16, old, adv16, mask, ref_logprobs=ref, kl_coef=0.05, policy_loss=policy)
        assert grad.dtype == torch.bfloat16
        for m in (mask.float(), mask.long(), mask.to(torch.uint8)):
            loss2, metrics2, grad2 = _check_ppo(lp16, old, adv16, m, ref_logprobs=ref, kl_coef=0.05,
                                                policy_loss=policy)
            assert torch.equal(loss2, loss) and torch.equal(grad2, grad)


@pytest.mark.parametrize("config", ["plain", "dual+k1+isw", "gspo+dual+k1+isw", "cispo+k1+isw"])
def test_ppo_loss_masked_non_finite_never_leaks_across_tiles(cpp, config):
    B, T = 4, 700
    lp, old, ref, adv, mask = _ppo_inputs(B, T, seed=80)
    mask[1, 250:520] = False  # a hole across a tile boundary
    kw = {} if config == "plain" else dict(clip_ratio_c=3.0, ref_logprobs=ref, kl_coef=0.3, kl_estimator="k1",
                                           rollout_is_weights=adv.abs() + 0.5)
    if config.startswith(("gspo", "cispo")):
        kw["policy_loss"] = config.split("+")[0]
        if config.startswith("cispo"):
            del kw["clip_ratio_c"]
    clean = _check_ppo(lp, old, adv, mask, **kw)

    def poison(x, v):
        return x.masked_fill(~mask, v)

    bad_kw = {k: (poison(v, float("nan")) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    x = poison(lp, float("nan")).requires_grad_(True)
    loss, metrics = ppo_loss(x, poison(old, float("inf")), poison(adv, -float("inf")), mask, **bad_kw)
    loss.backward()
    assert torch.equal(loss.detach(), clean[0].detach())
    for name in METRIC_NAMES:
        assert torch.equal(metrics[name], clean[1][name]), name
    assert torch.equal(x.grad, clean[2])


def test_ppo_loss_op_argument_errors(cpp):
    lp, old, ref, adv, mask = _ppo_inputs(2, 3, seed=90)

    def call(**over):
        args = dict(logprobs=lp, old_logprobs=old, advantages=adv, response_mask=mask, ref_logprobs=None,
                    rollout_is_weights=None, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=None, kl_coef=0.0,
                    kl_estimator="k3")
        args.update(over)
        return cpp.ppo_loss(*args.values())

    dl, stats = call()
    assert dl.shape == (2, 3) and stats.shape == (2, 1, 9)
    with pytest.raises(ValueError, match=r"old_logprobs must have the shape of logprobs \[2, 3\], got \[2, 4\]"):
        call(old_logprobs=torch.randn(2, 4))
    with pytest.raises(TypeError, match="advantages must be Float, got BFloat16"):
        call(advantages=adv.bfloat16())
    with pytest.raises(TypeError, match="response_mask must be Bool, got Float"):
        call(response_mask=mask.float())
    with pytest.raises(ValueError, match="logprobs must be 2-D, got shape"):
        call(logprobs=lp[0])
    with pytest.raises(TypeError, match="logprobs must be float32, bfloat16 or float16, got Double"):
        call(logprobs=lp.double())
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1, got 0.5"):
        call(clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="clip_ratio_low must be <= 1, got 1.5"):
        call(clip_ratio_low=1.5)
    with pytest.raises(ValueError, match="clip_ratio_high must be finite, got nan"):
        call(clip_ratio_high=float("nan"))
    with pytest.raises(ValueError, match="kl_estimator must be one of .*got 'k5'"):
        call(kl_estimator="k5")
    with pytest.raises(ValueError, match="kl_coef=0.1 > 0 needs ref_logprobs, got None"):
        call(kl_coef=0.1)
    seq = torch.zeros(2)
    assert call(policy_loss=1, seq_log_ratio=seq)[1].shape == (2, 1, 9)
    with pytest.raises(ValueError, match="policy_loss must be 0 .vanilla., 1 .gspo. or 2 .cispo., got 3"):
        call(policy_loss=3)
    with pytest.raises(ValueError, match="seq_log_ratio must be given for policy_loss=1 .gspo. and only then"):
        call(policy_loss=1)
    with pytest.raises(ValueError, match="seq_log_ratio must be given"):
        call(policy_loss=0, seq_log_ratio=seq)
    with pytest.raises(ValueError, match="cispo. has no dual clip: clip_ratio_c must be None, got 3"):
        call(policy_loss=2, clip_ratio_c=3.0)
    with pytest.raises(ValueError, match=r"seq_log_ratio must have shape \[2\]"):
        call(policy_loss=1, seq_log_ratio=torch.zeros(3))
    with pytest.raises(TypeError, match="seq_log_ratio must be Float, got Double"):
        call(policy_loss=1, seq_log_ratio=seq.double())
    with pytest.raises(ValueError, match="loss_agg_mode must be one of .*got 'token-sum'"):
        cpp.loss_agg_rows(stats, 2, "token-sum", None, None, 3.0)
    with pytest.raises(ValueError, match=r"n_weighted must be in \[0, 9\)"):
        cpp.loss_agg_rows(stats, 9, "token-mean", None, None, 3.0)
    with pytest.raises(ValueError, match="global_num_tokens must be > 0, got 0"):
        cpp.loss_agg_rows(stats, 2, "token-mean", 0.0, None, 3.0)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_fused_linear_logprobs_through_the_compiled_kernel(cpp, dtype):
    """fused_linear_logprobs runs the log-prob kernel on float32 logit tiles (several chunks): with cpp forced, the
    values and all three gradients are the float64 reference's."""
    from kernels.fused_linear_logprobs import fused_linear_logprobs, fused_linear_logprobs_ref
    from tests.kernels.test_fused_linear_logprobs import NORMWISE_GRAD_TOL

    N, H, V = 37, 24, 2100
    hidden = randn(N, H, dtype=dtype, device="cpu", seed=100)
    weight = randn(V, H, dtype=dtype, device="cpu", seed=101, scale=0.3)
    bias = randn(V, dtype=dtype, device="cpu", seed=102)
    labels = _labels((N,), V, seed=103, ignore_frac=0.2)
    ins = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    lp, ent = fused_linear_logprobs(ins[0], ins[1], labels, bias=ins[2], temperature=0.8, return_entropy=True,
                                    chunk_size=10)
    (lp.sum() + 0.5 * ent.sum()).backward()
    gold_ins = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    lp64, ent64 = fused_linear_logprobs_ref(gold_ins[0], gold_ins[1], labels, bias=gold_ins[2], temperature=0.8,
                                            return_entropy=True)
    (lp64.sum() + 0.5 * ent64.sum()).backward()
    assert_close(lp, lp64, torch.float32, "logprobs", scale=5)  # float32 GEMM tiles
    assert_close(ent, ent64, torch.float32, "entropy", scale=5)
    for name, a, b in zip(("dhidden", "dweight", "dbias"), ins, gold_ins):
        if dtype == torch.float32:
            assert_close(a.grad, b.grad, dtype, name, scale=5)
        else:  # the logit gradient is rounded to bf16/fp16 before the GEMMs: norm-wise, as test_fused_linear_logprobs
            err, ref = float((a.grad.double() - b.grad).norm()), float(b.grad.norm())
            assert err <= NORMWISE_GRAD_TOL[dtype] * ref, f"{name} ({dtype}): norm-wise relative error {err / ref:.3g}"


# ---------------------------------------------------------------------------------------------- default dispatch
def test_ppo_loss_stale_compiled_op_is_never_called(monkeypatch):
    """A library built from an older ppo_loss.cpp (no policy_loss argument) is detected from its schema: the default
    CPU dispatch then runs the reference (one warning), a forced cpp backend raises."""
    if not _extension.enabled():
        pytest.skip("compiled extension disabled (RLHF_ENGINE_BUILD_EXT=0)")
    PL = importlib.import_module("kernels.ppo_loss")  # the module (the package attribute is the function)

    monkeypatch.setattr(PL, "_cpp_schema_ok", None)
    assert PL._cpp_has_policy_loss()  # the library built from this checkout's source
    monkeypatch.setattr(PL, "_cpp_schema_ok", False)
    monkeypatch.setattr(_extension, "op", lambda name: pytest.fail(f"the stale op {name} was called"))
    lp, old, _, adv, mask = _ppo_inputs(3, 10, seed=95)
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="stale build without the policy_loss argument"):
        loss, _ = ppo_loss(lp, old, adv, mask, policy_loss="gspo")
    assert torch.equal(loss, ppo_loss_ref(lp, old, adv, mask, policy_loss="gspo")[0])
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="RLHF_KERNELS_BACKEND=cpp but the compiled rlhf_engine::ppo_loss is"):
        ppo_loss(lp, old, adv, mask)


def test_default_cpu_dispatch_picks_the_compiled_kernels(monkeypatch):
    if not _extension.enabled():
        pytest.skip("compiled extension disabled (RLHF_ENGINE_BUILD_EXT=0)")
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    x = torch.randn(2, 3)
    for op in ("logprobs_from_logits", "entropy_from_logits", "ppo_loss"):
        assert select_backend(op, x) == "cpp", op
        assert select_backend(op, x.double()) == "torch", op  # float64 is the reference's


def test_grpo_steps_default_cpu_dispatch_match_the_reference(monkeypatch):
    """The end-to-end GRPO run of test_e2e_grpo_step with the default CPU dispatch (the compiled log-prob and loss
    kernels inside fused_linear_logprobs / grpo_loss) against the PyTorch reference run."""
    if not _extension.enabled():
        pytest.skip("compiled extension disabled (RLHF_ENGINE_BUILD_EXT=0)")
    from tests.kernels.test_e2e_grpo_step import train

    hist_ref, params_ref = train("torch", monkeypatch, torch.device("cpu"))
    hist_cpp, params_cpp = train("", monkeypatch, torch.device("cpu"))  # "" = not forced: the default dispatch
    for step, ((l_a, m_a), (l_b, m_b)) in enumerate(zip(hist_ref, hist_cpp)):
        assert_close(l_b, l_a, torch.float32, f"loss at step {step}", scale=10)
        for name in m_a:
            assert_close(m_b[name], m_a[name], torch.float32, f"{name} at step {step}", scale=10)
    for i, (a, b) in enumerate(zip(params_ref, params_cpp)):
        assert_close(b, a, torch.float32, f"parameter {i}", scale=50)
