"""ppo_loss / grpo_loss against the float64 reference (values, metrics, gradients), a hand-computed case, the
micro-batch invariance of every aggregation mode (fully masked rows included), the seq-mean denominators against the
anchors' formula, NaN/inf at masked positions, extreme ratios and bad input. The gspo and cispo policy losses against
a float64 transcription of the anchors' formulas written here (``anchor_policy_loss``), by hand, under micro-batch
splits and with NaN/inf at masked positions."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.loss_agg import LOSS_AGG_MODES
from kernels.ppo_loss import POLICY_LOSSES, grpo_loss, ppo_loss, ppo_loss_ref
from tests._numerics import INPUT_DTYPES, assert_close, randn, random_mask, seq_agg_expected

CPP_OPS = ("ppo_loss",)  # the backend fixture's "cpp" param runs ppo_loss / grpo_loss through csrc/cpu/ppo_loss.cpp

SHAPES = [(4, 64), (5, 37), (1, 1), (3, 300)]  # 300 > one chunk of tokens under the interpreter
CONFIGS = {
    "plain": {},
    "clip_higher+dual": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0),
    "kl_k3": dict(kl_coef=0.04, kl_estimator="k3"),
    "kl_k1+is_tok": dict(kl_coef=0.1, kl_estimator="k1", is_weights="token"),
    "seq_adv+is_seq+k2": dict(kl_coef=0.5, kl_estimator="k2", is_weights="seq", seq_adv=True),
    "dual+abs": dict(clip_ratio_c=1.5, kl_coef=0.2, kl_estimator="abs"),
}


def make_inputs(B, T, dtype, device, cfg, seed=0):
    lp = randn(B, T, dtype=dtype, device=device, seed=seed, scale=0.5) - 1.0
    # old = lp + noise, so ratios straddle both clip bounds
    old = (lp.double() + randn(B, T, dtype=torch.float64, device=device, seed=seed + 1, scale=0.3)).to(dtype)
    adv_shape = (B,) if cfg.get("seq_adv") else (B, T)
    adv = randn(*adv_shape, dtype=dtype, device=device, seed=seed + 2)
    mask = random_mask(B, T, device, seed + 3, full_rows=(0,), empty_rows=(B - 1,) if B > 2 else ())
    kw = {k: v for k, v in cfg.items() if k not in ("is_weights", "seq_adv")}
    if cfg.get("kl_coef"):
        kw["ref_logprobs"] = (lp.double() + randn(B, T, dtype=torch.float64, device=device, seed=seed + 4,
                                                   scale=0.4)).to(dtype)
    if cfg.get("is_weights"):
        shape = (B, T) if cfg["is_weights"] == "token" else (B,)
        kw["rollout_is_weights"] = randn(*shape, dtype=torch.float64, device=device, seed=seed + 5).abs().to(dtype)
    return lp, old, adv, mask, kw


def to64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


# Every option under the two common modes, and every mode under one config with all the options' code paths.
CASES = [(c, m) for c in CONFIGS for m in ("token-mean", "seq-mean-token-mean")] + [
    ("kl_k1+is_tok", m) for m in ("seq-mean-token-sum", "seq-mean-token-sum-norm")
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("config, mode", CASES)
def test_ppo_loss_matches_float64(backend, device, shape, dtype, config, mode):
    lp, old, adv, mask, kw = make_inputs(*shape, dtype, device, CONFIGS[config])
    x = lp.clone().requires_grad_(True)
    loss, metrics = ppo_loss(x, old, adv, mask, loss_agg_mode=mode, **kw)
    loss.backward()

    x64 = lp.double().requires_grad_(True)
    gold, gold_metrics = ppo_loss_ref(x64, old.double(), adv.double(), mask, loss_agg_mode=mode, **to64(kw))
    gold.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, gold, torch.float32, "loss", scale=5)  # fp32 sums over up to 900 tokens
    assert set(metrics) == set(gold_metrics)
    for name, value in metrics.items():
        assert not value.requires_grad
        assert_close(value, gold_metrics[name], torch.float32, name, scale=5)
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, "dlogprobs")
    assert torch.all(x.grad[~mask] == 0)


def test_ppo_loss_hand_computed(backend, device):
    # token 0: r = 1.5, A = +1 -> clipped at 1.2: loss -1.2, no gradient; token 1: r = 0.5, A = +1 -> loss -0.5,
    # gradient -A*r = -0.5; token-mean over 2 tokens.
    old = torch.zeros(1, 2, device=device)
    lp = torch.log(torch.tensor([[1.5, 0.5]], device=device)).requires_grad_(True)
    adv = torch.ones(1, 2, device=device)
    loss, metrics = ppo_loss(lp, old, adv, torch.ones(1, 2, dtype=torch.bool, device=device))
    loss.backward()
    assert loss.item() == pytest.approx(-0.85, abs=1e-6)
    assert lp.grad.tolist()[0] == pytest.approx([0.0, -0.25], abs=1e-6)
    assert metrics["pg_clipfrac"].item() == pytest.approx(0.5)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    assert metrics["clip_ratio/low_mean"].item() == 0.0


def test_ppo_loss_on_policy_gradient_is_minus_advantage(backend, device):
    lp = randn(3, 9, dtype=torch.float32, device=device, seed=7).requires_grad_(True)
    adv = randn(3, dtype=torch.float32, device=device, seed=8)
    mask = random_mask(3, 9, device, seed=9, full_rows=(0,))
    loss, metrics = grpo_loss(lp, lp.detach(), adv, mask, kl_coef=0.0)
    loss.backward()
    expected = -adv[:, None].expand(3, 9) * mask / mask.sum()
    assert_close(lp.grad, expected, torch.float32, "dlogprobs")
    assert metrics["pg_clipfrac"].item() == 0.0 and metrics["ppo_kl"].item() == 0.0


def global_denominators(mask, T):
    """What a trainer passes to every micro-batch: the whole batch's token count and count of non-empty rows."""
    return dict(global_num_tokens=max(int(mask.sum()), 1), global_num_seqs=max(int(mask.any(-1).sum()), 1),
                loss_scale_factor=T)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_ppo_loss_micro_batch_split_sums_to_full_batch(backend, device, mode):
    B, T = 8, 23
    lp, old, adv, mask, kw = make_inputs(B, T, torch.float32, device, CONFIGS["kl_k3"], seed=11)
    mask[3] = False  # the 1-row micro-batch below is fully masked; row 7 is too (make_inputs)
    globals_ = global_denominators(mask, T)
    full_x = lp.clone().requires_grad_(True)
    full, _ = ppo_loss(full_x, old, adv, mask, loss_agg_mode=mode, **kw, **globals_)
    full.backward()
    local, _ = ppo_loss(lp, old, adv, mask, loss_agg_mode=mode, **kw)  # the global counts are the local ones here
    assert_close(full.detach(), local, torch.float32, "loss with global = local denominators")
    total = torch.zeros((), device=device)
    grads = []
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        x = lp[rows].clone().requires_grad_(True)
        part, _ = ppo_loss(x, old[rows], adv[rows], mask[rows], loss_agg_mode=mode,
                           ref_logprobs=kw["ref_logprobs"][rows], kl_coef=kw["kl_coef"], **globals_)
        part.backward()
        total = total + part.detach()
        grads.append(x.grad)
    assert_close(total, full.detach(), torch.float32, "summed micro-batch loss")
    assert_close(torch.cat(grads), full_x.grad, torch.float32, "micro-batch grads")


def test_ppo_loss_extreme_log_ratio_is_clamped(backend, device):
    lp = torch.tensor([[-0.5, -60.0, -1.0]], device=device, requires_grad=True)
    old = torch.tensor([[-50.0, -0.5, -1.0]], device=device)
    adv = torch.tensor([[-1.0, 1.0, 1.0]], device=device)
    loss, metrics = ppo_loss(lp, old, adv, torch.ones(1, 3, device=device), clip_ratio_c=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    gold, _ = ppo_loss_ref(lp.detach().cpu().double(), old.cpu().double(), adv.cpu().double(), torch.ones(1, 3),
                           clip_ratio_c=3.0)
    assert_close(loss.cpu(), gold, torch.float32, "loss")
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == 0  # beyond the +-20 nat clamp: no gradient


def test_ppo_loss_all_masked_is_zero_not_nan(backend, device):
    lp = randn(2, 5, dtype=torch.float32, device=device, seed=3).requires_grad_(True)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    for mode in LOSS_AGG_MODES:
        loss, metrics = ppo_loss(lp, lp.detach() + 0.1, torch.ones(2, device=device), mask, loss_agg_mode=mode)
        loss.backward()
        assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())
    assert torch.all(lp.grad == 0)


def test_ppo_loss_gradcheck_reference():
    lp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    old = lp.detach() + 0.3 * torch.randn(2, 4, dtype=torch.float64)
    adv, ref = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)

    def f(x):
        return ppo_loss_ref(x, old, adv, mask, clip_ratio_c=3.0, ref_logprobs=ref, kl_coef=0.1)[0]

    assert torch.autograd.gradcheck(f, (lp,))


def test_ppo_loss_bad_input():
    lp, mask = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"old_logprobs must have the shape of logprobs \(2, 3\), got \(2, 4\)"):
        ppo_loss(lp, torch.randn(2, 4), lp, mask)
    with pytest.raises(ValueError, match=r"advantages must have shape \(2, 3\), \(2,\) or \(2, 1\), got \(3,\)"):
        ppo_loss(lp, lp, torch.randn(3), mask)
    with pytest.raises(ValueError, match="response_mask must have the shape"):
        ppo_loss(lp, lp, lp, mask[:, :2])
    with pytest.raises(ValueError, match="clip_ratio_low must be >= 0, got -0.1"):
        ppo_loss(lp, lp, lp, mask, clip_ratio_low=-0.1)
    with pytest.raises(ValueError, match="clip_ratio_high must be >= 0"):
        ppo_loss(lp, lp, lp, mask, clip_ratio_high=-1.0)
    with pytest.raises(ValueError, match="clip_ratio_c must be a number > 1"):
        ppo_loss(lp, lp, lp, mask, clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="clip_ratio_high must be finite, got nan"):
        ppo_loss(lp, lp, lp, mask, clip_ratio_high=float("nan"))
    with pytest.raises(ValueError, match="clip_ratio_c must be finite, got inf"):
        ppo_loss(lp, lp, lp, mask, clip_ratio_c=float("inf"))
    with pytest.raises(ValueError, match=r"response_mask must be bool or hold only 0 and 1, got 0.5 at index \(0, 1\)"):
        ppo_loss(lp, lp, lp, torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"response_mask must be bool or hold only 0 and 1, got 2 at index \(1, 0\)"):
        ppo_loss(lp, lp, lp, torch.tensor([[1, 1, 0], [2, 1, 1]]))
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        ppo_loss(lp, lp, lp, mask, loss_agg_mode="token-sum-mean")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        ppo_loss(lp, lp, lp, mask, ref_logprobs=lp, kl_coef=0.1, kl_estimator="k5")
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_loss(lp, lp, lp, mask)
    with pytest.raises(ValueError, match="global_num_tokens must be > 0, got 0"):
        ppo_loss(lp, lp, lp, mask, global_num_tokens=0)
    with pytest.raises(TypeError, match="logprobs must have dtype"):
        ppo_loss(lp.long(), lp, lp, mask)
    with pytest.raises(ValueError, match="logprobs must have 2 dimensions"):
        ppo_loss(lp[0], lp[0], lp[0], mask[0])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(2, 6), T=st.integers(1, 20), cut=st.integers(1, 5), mode=st.sampled_from(LOSS_AGG_MODES),
       empty=st.sets(st.integers(0, 5), max_size=3), seed=st.integers(0, 2**16))
def test_ppo_loss_any_split_sums_to_full_batch(backend, device, B, T, cut, mode, empty, seed):
    cut = min(cut, B - 1)
    lp, old, adv, mask, kw = make_inputs(B, T, torch.float32, device, CONFIGS["clip_higher+dual"], seed=seed)
    for row in empty:  # fully masked rows anywhere, possibly a whole micro-batch of them
        if row < B:
            mask[row] = False
    globals_ = global_denominators(mask, T)
    full_x = lp.clone().requires_grad_(True)
    full, _ = ppo_loss(full_x, old, adv, mask, loss_agg_mode=mode, **kw, **globals_)
    full.backward()
    local, _ = ppo_loss(lp, old, adv, mask, loss_agg_mode=mode, **kw)
    assert_close(full.detach(), local, torch.float32, "loss with global = local denominators")
    parts, grads = [], []
    for r in (slice(0, cut), slice(cut, B)):
        x = lp[r].clone().requires_grad_(True)
        part = ppo_loss(x, old[r], adv[r], mask[r], loss_agg_mode=mode, **kw, **globals_)[0]
        part.backward()
        parts.append(part.detach())
        grads.append(x.grad)
    assert_close(parts[0] + parts[1], full.detach(), torch.float32, "summed loss")
    assert_close(torch.cat(grads), full_x.grad, torch.float32, "micro-batch grads")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_ppo_loss_seq_mean_excludes_fully_masked_rows(backend, device, mode):
    # On-policy (r = 1, nothing clipped) and no KL: the per-token loss is exactly -A, so the loss is the anchors'
    # aggregation of -A (veRL agg_loss: seq-mean over rows with >= 1 token), written out independently.
    B, T = 5, 7
    lp = randn(B, T, dtype=torch.float32, device=device, seed=20)
    adv = randn(B, T, dtype=torch.float32, device=device, seed=21)
    mask = random_mask(B, T, device, seed=22, full_rows=(0,), empty_rows=(1, 3))
    rows = [(-adv[i][mask[i]]).double() for i in range(B) if mask[i].any()]  # 3 non-empty rows
    expected = seq_agg_expected(rows, mode, T)
    x = lp.clone().requires_grad_(True)
    loss, _ = ppo_loss(x, lp, adv, mask, loss_agg_mode=mode)
    assert_close(loss, expected, torch.float32, mode)
    # appending fully masked rows changes nothing, in any mode
    def pad(t, v):
        return torch.cat([t, torch.full((2, T), v, dtype=t.dtype, device=device)])

    more, _ = ppo_loss(pad(lp, -1.0), pad(lp, -1.0), pad(adv, 3.0), pad(mask, False), loss_agg_mode=mode)
    assert_close(more, loss.detach(), torch.float32, "with two more empty rows")


POISON_CONFIGS = ["plain", "clip_higher+dual", "kl_k1+is_tok", "seq_adv+is_seq+k2", "dual+abs"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", POISON_CONFIGS)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_ppo_loss_masked_non_finite_never_leaks(backend, device, shape, config, mode):
    """NaN / inf in every input where response_mask == 0: the clean loss, the clean metrics, the clean gradient,
    exactly 0 at the masked tokens."""
    B, T = shape
    lp, old, adv, mask, kw = make_inputs(B, T, torch.float32, device, CONFIGS[config], seed=30)
    if B > 1:
        mask[1, T // 2:] = False  # trailing padding in a second row too (row 0 is full)

    def poison(x, value):
        if x.shape == mask.shape:
            return x.masked_fill(~mask, value)
        return x.masked_fill(~mask.any(-1), value)  # per-sequence tensors: the fully masked rows

    bad_kw = dict(kw)
    for name, value in (("ref_logprobs", float("inf")), ("rollout_is_weights", float("nan"))):
        if name in kw:
            bad_kw[name] = poison(kw[name], value)
    assert_poison_changes_nothing(lp, old, adv, mask, poison, kw, bad_kw, loss_agg_mode=mode)


def assert_poison_changes_nothing(lp, old, adv, mask, poison, kw, bad_kw, **common):
    """``ppo_loss`` with NaN/inf at the masked positions of every input (``poison``; ``bad_kw``: the poisoned
    keywords) gives the clean loss, metrics and gradient, and exactly 0 gradient at the masked tokens."""
    x_clean = lp.clone().requires_grad_(True)
    x_bad = poison(lp, float("nan")).requires_grad_(True)
    gold, gold_metrics = ppo_loss(x_clean, old, adv, mask, **common, **kw)
    loss, metrics = ppo_loss(x_bad, poison(old, -float("inf")), poison(adv, float("nan")), mask, **common, **bad_kw)
    gold.backward()
    loss.backward()
    assert torch.isfinite(loss)
    assert_close(loss, gold.detach(), torch.float32, "loss")
    for name, value in metrics.items():
        assert torch.isfinite(value), name
        assert_close(value, gold_metrics[name], torch.float32, name)
    assert torch.isfinite(x_bad.grad).all() and torch.all(x_bad.grad[~mask] == 0)
    assert_close(x_bad.grad, x_clean.grad, torch.float32, "dlogprobs")


# ------------------------------------------------------------------------------------- policy_loss: gspo and cispo
def anchor_policy_loss(lp, old, adv, mask, policy, *, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=None,
                       ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", rollout_is_weights=None,
                       loss_agg_mode=None, global_num_tokens=None, global_num_seqs=None, loss_scale_factor=None):
    """rl_anchors.md §b6 transcribed in float64, row by row over the valid tokens only (independent of
    ``ppo_loss_ref``): veRL ``compute_policy_loss_gspo`` (ratio ``exp(clamp(lp - sg(lp) + sg(log s_i), max=10))``,
    ``log s_i`` the mean of ``lp - old`` over the row's valid tokens, PPO's clipped surrogate, seq-mean-token-mean)
    and ``compute_policy_loss_cispo`` (``-sg(clip(r, 1-eps_l, 1+eps_h)) * A * lp``, ``r = exp(clamp(lp - old,
    +-20))``), times the rollout IS weights, plus ``kl_coef`` times the k1/k3 KL; the metrics of the module docstring.
    ``lp`` is a float64 leaf: its ``.grad`` is the anchor's gradient."""
    B, T = lp.shape
    lo, hi = 1.0 - clip_ratio_low, 1.0 + clip_ratio_high

    def rows_of(x):  # [B] per-sequence values broadcast over the tokens
        return None if x is None else (x.double()[:, None] if x.dim() == 1 else x.double()).expand(B, T)

    adv, isw, ref = rows_of(adv), rows_of(rollout_is_weights), rows_of(ref_logprobs)
    per_row, pg_rows = [], []
    seen = {k: [] for k in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "kl", "clip_ratio/low_mean",
                            "clip_ratio/high_mean")}
    for i in range(B):
        v = mask[i].bool()
        if not v.any():
            continue
        x, o, a = lp[i][v], old[i][v].double(), adv[i][v]
        d = x - o
        if policy == "gspo":
            log_s = d.sum() / v.sum()
            r = torch.exp(torch.clamp(x - x.detach() + log_s.detach(), max=10.0))
            neg_kl = -d.detach()
        else:
            r = torch.exp(torch.clamp(d, -20.0, 20.0))
            neg_kl = -torch.clamp(d, -20.0, 20.0).detach()
        if policy == "cispo":
            pg = -torch.clamp(r, lo, hi).detach() * a * x
            clipped = (r < lo) | (r > hi)
            lower = torch.zeros_like(clipped)
        else:
            l1, l2 = -a * r, -a * torch.clamp(r, lo, hi)
            pg = torch.maximum(l1, l2)
            clipped = l2 > l1
            lower = torch.zeros_like(clipped)
            if clip_ratio_c is not None:
                l3 = -a * clip_ratio_c
                lower = (pg > l3) & (a < 0)
                pg = torch.where(a < 0, torch.minimum(pg, l3), pg)
        if isw is not None:
            pg = pg * isw[i][v]
        kl = torch.zeros_like(x)
        if ref is not None:
            delta = ref[i][v] - x
            kl = -delta if kl_estimator == "k1" else torch.exp(delta.clamp(-20, 20)) - delta.clamp(-20, 20) - 1
        per_row.append(pg + kl_coef * kl)
        pg_rows.append(pg)
        r = r.detach()
        for name, value in (("pg_clipfrac", clipped), ("pg_clipfrac_lower", lower), ("ppo_kl", neg_kl),
                            ("kl", kl.detach()), ("clip_ratio/low_mean", (r < lo) & (a < 0)),
                            ("clip_ratio/high_mean", (r > hi) & (a > 0))):
            seen[name].append(value.double())
    mode = loss_agg_mode or ("seq-mean-token-mean" if policy == "gspo" else "token-mean")
    n_tok = global_num_tokens or max(int(mask.bool().sum()), 1)
    n_seq = global_num_seqs or max(len(per_row), 1)

    def agg(rows):
        total = torch.zeros((), dtype=torch.float64)
        for row in rows:
            total = total + (row.mean() if mode == "seq-mean-token-mean" else row.sum())
        if mode == "token-mean":
            return total / n_tok
        return total / (n_seq * (loss_scale_factor or T) if mode == "seq-mean-token-sum-norm" else n_seq)

    metrics = {name: (torch.cat(vals).mean() if vals else torch.zeros((), dtype=torch.float64))
               for name, vals in seen.items()}
    metrics["pg_loss"] = agg(pg_rows).detach()
    return agg(per_row), metrics


def policy_inputs(B, T, dtype, device, seed, *, seq_adv=False, isw="token", kl="k3"):
    """Inputs whose ratios straddle both clip bounds per token (cispo) and per sequence (gspo: rows drift by
    old - lp = +0.45, -0.6, 0 nats in turn, so s_i ~ 0.64, 1.8, 1: below 0.8, above 1.28 (and 1.5, a dual-clip bound
    below), inside)."""
    lp = randn(B, T, dtype=dtype, device=device, seed=seed, scale=0.5) - 1.0
    drift = torch.tensor([(0.45, -0.6, 0.0)[i % 3] for i in range(B)], dtype=torch.float64, device=device)[:, None]
    old = (lp.double() + drift + randn(B, T, dtype=torch.float64, device=device, seed=seed + 1, scale=0.3)).to(dtype)
    adv = randn(*((B,) if seq_adv else (B, T)), dtype=dtype, device=device, seed=seed + 2)
    mask = random_mask(B, T, device, seed + 3, full_rows=(0,), empty_rows=(B - 1,) if B > 2 else ())
    kw = {"clip_ratio_high": 0.28}
    if kl:
        kw.update(kl_coef=0.1, kl_estimator=kl, ref_logprobs=(
            lp.double() + randn(B, T, dtype=torch.float64, device=device, seed=seed + 4, scale=0.4)).to(dtype))
    if isw:
        shape = (B, T) if isw == "token" else (B,)
        kw["rollout_is_weights"] = (randn(*shape, dtype=torch.float64, device=device, seed=seed + 5).abs()
                                    + 0.2).to(dtype)
    return lp, old, adv, mask, kw


def check_against_anchor(lp, old, adv, mask, policy, dtype, **kw):
    """ppo_loss (the active backend) against anchor_policy_loss on the same rounded inputs: loss, every metric,
    and the gradient (exactly 0 at masked tokens). Returns the gradient."""
    x = lp.clone().requires_grad_(True)
    loss, metrics = ppo_loss(x, old, adv, mask, policy_loss=policy, **kw)
    loss.backward()
    x64 = lp.detach().cpu().double().requires_grad_(True)
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gold, gold_metrics = anchor_policy_loss(x64, old.cpu(), adv.cpu(), mask.cpu(), policy, **cpu)
    gold.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, gold, torch.float32, f"{policy} loss", scale=5)  # float32 sums over up to 900 tokens
    assert set(metrics) == set(gold_metrics)
    for name, value in metrics.items():
        assert not value.requires_grad
        assert_close(value, gold_metrics[name], torch.float32, f"{policy} {name}", scale=5)
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, f"{policy} dlogprobs")
    assert torch.all(x.grad[~mask.bool()] == 0)
    return x.grad


POLICY_SHAPES = [(4, 64), (5, 37), (1, 1), (3, 1), (1, 23), (3, 300)]  # B=1, T=1, odd T, several chunks


@pytest.mark.parametrize("shape", POLICY_SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("policy", ["gspo", "cispo"])
def test_policy_loss_matches_float64_anchor(backend, device, shape, dtype, policy):
    """Clip-higher, per-token IS weights and the k3 KL term on, default aggregation (gspo: seq-mean-token-mean)."""
    lp, old, adv, mask, kw = policy_inputs(*shape, dtype, device, seed=40)
    check_against_anchor(lp, old, adv, mask, policy, dtype, **kw)


POLICY_CONFIGS = [  # (policy, options, loss_agg_mode): the other option paths, float32
    ("gspo", {"isw": None, "kl": None}, None),
    ("gspo", {"seq_adv": True, "isw": "seq", "kl": "k1", "clip_ratio_c": 1.5}, None),
    ("gspo", {"clip_ratio_c": 3.0}, "seq-mean-token-mean"),
    ("cispo", {"isw": None, "kl": None}, None),
    ("cispo", {"seq_adv": True, "isw": "seq", "kl": "k1"}, "seq-mean-token-mean"),
    ("cispo", {}, "seq-mean-token-sum-norm"),
]


@pytest.mark.parametrize("policy, opts, mode", POLICY_CONFIGS)
def test_policy_loss_options_match_float64_anchor(backend, device, policy, opts, mode):
    opts = dict(opts)
    c = opts.pop("clip_ratio_c", None)
    lp, old, adv, mask, kw = policy_inputs(6, 29, torch.float32, device, seed=41, **opts)
    check_against_anchor(lp, old, adv, mask, policy, torch.float32, clip_ratio_c=c, loss_agg_mode=mode, **kw)


def test_gspo_gradient_by_hand(backend, device):
    """d loss / d lp_t = -A_i s_i / (|y_i| * n_seqs) on unclipped rows; 0 on a clipped row and where log s_i > 10."""
    d = torch.tensor([[0.1, -0.05], [-0.1, 9.0], [0.5, 0.5], [12.0, 0.0]], dtype=torch.float64)  # lp - old
    lp = -1.0 - torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    old = lp - d
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    x = lp.float().to(device).requires_grad_(True)
    loss, metrics = ppo_loss(x, old.float().to(device), adv.float().to(device), mask.to(device),
                             policy_loss="gspo")
    loss.backward()
    s0, s1 = math.exp(0.025), math.exp(-0.1)  # row 0: log s = (0.1 - 0.05) / 2; row 1: one token
    # row 2: s = e^0.5 > 1.2 with A > 0: clipped, -1.2; row 3: log s = 12 clamped at 10, A < 0: -A e^10, no gradient
    expected_grad = [[-2.0 * s0 / (2 * 4)] * 2, [1.0 * s1 / (1 * 4), 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert x.grad.cpu().tolist() == [pytest.approx(row, rel=1e-5, abs=1e-7) for row in expected_grad]
    assert loss.item() == pytest.approx((-2.0 * s0 + s1 - 1.2 + math.exp(10.0)) / 4, rel=1e-6)
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 6)  # row 2's two tokens
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(2 / 6)
    assert metrics["clip_ratio/low_mean"].item() == 0.0 and metrics["pg_clipfrac_lower"].item() == 0.0
    assert metrics["ppo_kl"].item() == pytest.approx(-(0.1 - 0.05 - 0.1 + 0.5 + 0.5 + 12.0) / 6, rel=1e-5)


def test_cispo_keeps_the_gradient_of_clipped_tokens_by_hand(backend, device):
    # token 0: r = 1.5, A = +1: weight clip(r) = 1.2, gradient -1.2 / 2 (vanilla PPO would give 0); token 1:
    # r = 0.5, A = -1: weight 0.8, gradient +0.8 / 2; loss = mean(-w * A * lp).
    lp = torch.tensor([[-0.7, -1.3]], device=device)
    old = lp - torch.log(torch.tensor([[1.5, 0.5]], device=device))
    x = lp.clone().requires_grad_(True)
    loss, metrics = ppo_loss(x, old, torch.tensor([1.0, -1.0], device=device)[None],
                             torch.ones(1, 2, dtype=torch.bool, device=device), policy_loss="cispo")
    loss.backward()
    assert x.grad.cpu().tolist()[0] == pytest.approx([-0.6, 0.4], rel=1e-5)
    assert loss.item() == pytest.approx((-1.2 * -0.7 + 0.8 * -1.3) / 2, rel=1e-5)
    assert metrics["pg_clipfrac"].item() == 1.0 and metrics["pg_clipfrac_lower"].item() == 0.0
    assert metrics["clip_ratio/high_mean"].item() == 0.5 and metrics["clip_ratio/low_mean"].item() == 0.5


@pytest.mark.parametrize("policy, mode", [("gspo", None), ("cispo", None), ("cispo", "seq-mean-token-mean")])
def test_policy_loss_micro_batch_split_sums_to_full_batch(backend, device, policy, mode):
    B, T = 8, 23
    lp, old, adv, mask, kw = policy_inputs(B, T, torch.float32, device, seed=42)
    mask[3] = False  # the 1-row micro-batch below is fully masked; row 7 is too (policy_inputs)
    globals_ = global_denominators(mask, T)
    full_x = lp.clone().requires_grad_(True)
    full, _ = ppo_loss(full_x, old, adv, mask, loss_agg_mode=mode, policy_loss=policy, **kw, **globals_)
    full.backward()
    total, grads = torch.zeros((), device=device), []
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        x = lp[rows].clone().requires_grad_(True)
        part_kw = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        part, _ = ppo_loss(x, old[rows], adv[rows], mask[rows], loss_agg_mode=mode, policy_loss=policy,
                           **part_kw, **globals_)
        part.backward()
        total = total + part.detach()
        grads.append(x.grad)
    assert_close(total, full.detach(), torch.float32, "summed micro-batch loss")
    assert_close(torch.cat(grads), full_x.grad, torch.float32, "micro-batch grads")


@pytest.mark.parametrize("shape", [(5, 37), (3, 300)])
@pytest.mark.parametrize("policy, opts", [("gspo", {"clip_ratio_c": 3.0}), ("gspo", {"seq_adv": True, "isw": "seq"}),
                                          ("cispo", {})])
def test_policy_loss_masked_non_finite_never_leaks(backend, device, shape, policy, opts):
    """NaN / inf in every input where response_mask == 0 (gspo's row mean included): the clean loss, metrics and
    gradient, exactly 0 at the masked tokens."""
    opts = dict(opts)
    c = opts.pop("clip_ratio_c", None)
    lp, old, adv, mask, kw = policy_inputs(*shape, torch.float32, device, seed=43, **opts)
    mask[1, shape[1] // 2:] = False

    def poison(x, value):
        return x.masked_fill(~mask if x.shape == mask.shape else ~mask.any(-1), value)

    bad_kw = {k: (poison(v, float("nan") if k == "rollout_is_weights" else float("inf"))
                  if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    assert_poison_changes_nothing(lp, old, adv, mask, poison, kw, bad_kw, policy_loss=policy, clip_ratio_c=c)


def test_policy_loss_default_aggregation_and_bad_input():
    lp, old, adv, mask, _ = policy_inputs(4, 9, torch.float32, "cpu", seed=44, isw=None, kl=None)
    for policy, default in (("vanilla", "token-mean"), ("cispo", "token-mean"), ("gspo", "seq-mean-token-mean")):
        for fn in (ppo_loss, ppo_loss_ref):
            a, _ = fn(lp, old, adv, mask, policy_loss=policy)
            b, _ = fn(lp, old, adv, mask, policy_loss=policy, loss_agg_mode=default)
            assert torch.equal(a, b), (fn.__name__, policy)
    assert torch.equal(ppo_loss(lp, old, adv, mask)[0], ppo_loss(lp, old, adv, mask, policy_loss="vanilla")[0])
    assert POLICY_LOSSES == ("vanilla", "gspo", "cispo")
    for fn in (ppo_loss, ppo_loss_ref, grpo_loss):
        kl = {"kl_coef": 0.0} if fn is grpo_loss else {}
        with pytest.raises(ValueError, match="loss_agg_mode must be 'seq-mean-token-mean' or None, got 'token-mean'"):
            fn(lp, old, adv, mask, policy_loss="gspo", loss_agg_mode="token-mean", **kl)
        with pytest.raises(ValueError, match="clip_ratio_c must be None, got 3.0"):
            fn(lp, old, adv, mask, policy_loss="cispo", clip_ratio_c=3.0, **kl)
        with pytest.raises(ValueError, match=r"policy_loss must be one of \('vanilla', 'gspo', 'cispo'\), got 'sapo'"):
            fn(lp, old, adv, mask, policy_loss="sapo", **kl)
