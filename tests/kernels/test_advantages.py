"""group_advantages and masked_whiten against their float64 references and independent formulas, every backend."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels.advantages as adv_mod
from kernels.advantages import group_advantages, group_advantages_ref, masked_whiten, masked_whiten_ref
from tests._numerics import INPUT_DTYPES, assert_close, randn, random_mask

NUM_GROUPS = 6
# (estimator, norm_by_std, unbiased_std): GRPO with Bessel / population std, Dr. GRPO, RLOO.
VARIANTS = [("grpo", True, True), ("grpo", True, False), ("grpo", False, True), ("rloo", True, True)]


@pytest.mark.parametrize("G", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_group_advantages_matches_float64(backend, device, G, dtype, variant):
    estimator, norm_by_std, unbiased_std = variant
    scores = randn(NUM_GROUPS * G, dtype=dtype, device=device, seed=G, scale=2.0)
    out = group_advantages(scores, G, estimator=estimator, norm_by_std=norm_by_std, unbiased_std=unbiased_std)
    gold = group_advantages_ref(scores.double(), G, estimator, norm_by_std, unbiased_std, 1e-6)
    assert out.dtype == torch.float32 and out.shape == scores.shape
    assert_close(out, gold, torch.float32, "advantages")


def _independent_gold(scores: torch.Tensor, G: int, estimator: str, norm_by_std: bool, unbiased_std: bool,
                      epsilon: float) -> torch.Tensor:
    """The anchors' formulas written out per group in float64 (veRL loop style, torch.std)."""
    out = []
    for group in scores.double().reshape(-1, G):
        if G == 1:  # veRL: mean 0, std 1 (grpo); 0 (rloo_vectorized)
            out.append(torch.zeros(1) if estimator == "rloo" else group / (1 + epsilon) if norm_by_std else group)
        elif estimator == "rloo":  # leave-one-out baseline
            out.append(torch.stack([group[i] - (group.sum() - group[i]) / (G - 1) for i in range(G)]))
        elif norm_by_std:
            out.append((group - group.mean()) / (group.std(unbiased=unbiased_std) + epsilon))
        else:
            out.append(group - group.mean())
    return torch.cat(out)


@pytest.mark.parametrize("G", [1, 2, 5])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("epsilon", [1e-4, 1e-9])
def test_group_advantages_match_the_anchor_formulas(backend, device, G, variant, epsilon):
    estimator, norm_by_std, unbiased_std = variant
    scores = randn(3 * G, dtype=torch.float32, device=device, seed=20 + G)
    out = group_advantages(scores, G, estimator=estimator, norm_by_std=norm_by_std, unbiased_std=unbiased_std,
                           epsilon=epsilon)
    assert_close(out, _independent_gold(scores.cpu(), G, estimator, norm_by_std, unbiased_std, epsilon),
                 torch.float32, "advantages")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_advantages_identical_scores_give_zero(backend, device, estimator):
    # Group 0 is constant 0.3 (not a dyadic number: a plain float32 mean of five 0.3s is off by an ulp, which 1/eps
    # would blow up to ~1e-2); group 1 constant -7; group 2 is not constant.
    scores = torch.tensor([0.3] * 5 + [-7.0] * 5 + [1.0, 0.0, 0.0, 1.0, 1.0], device=device)
    out = group_advantages(scores, 5, estimator=estimator)
    assert torch.isfinite(out).all()
    assert torch.all(out[:10] == 0)
    assert (out[10:] != 0).all()
    one_hot = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0], device=device), 4, estimator=estimator)
    assert one_hot[0] > 0 and torch.all(one_hot[1:] < 0)


def test_group_advantages_epsilon_zero_is_rejected(backend, device):
    # with epsilon = 0 a group of equal scores (every completion right, or every one wrong) would be 0 / 0 = NaN
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0], device=device)
    with pytest.raises(ValueError, match="epsilon must be > 0, got 0"):
        group_advantages(scores, 2, epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon must be > 0, got 0"):
        group_advantages(scores, 2, epsilon=0)
    assert torch.isfinite(group_advantages(scores, 2, epsilon=1e-12)).all()


def test_group_advantages_strided_float64_and_empty(backend, device):
    base = randn(40, dtype=torch.float32, device=device, seed=30)
    strided = base[::2]  # stride 2
    out = group_advantages(strided, 4)
    assert_close(out, group_advantages_ref(strided.double(), 4), torch.float32, "strided")
    out64 = group_advantages(strided.double(), 4, estimator="rloo")
    assert out64.dtype == torch.float64
    assert group_advantages(base[:0], 4).shape == (0,)


def test_group_advantages_large_group_spans_chunks(backend, device, monkeypatch):
    # Groups larger than the chunk width loop over chunks: force a chunk of 4 so G = 10 takes three.
    monkeypatch.setattr(adv_mod, "_GROUP_MAX_BLOCK", 4)
    scores = randn(30, dtype=torch.float16, device=device, seed=31)
    for est in ("grpo", "rloo"):
        out = group_advantages(scores, 10, estimator=est)
        assert_close(out, group_advantages_ref(scores.double(), 10, est), torch.float32, est)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(G=st.integers(2, 9), num_groups=st.integers(1, 4), seed=st.integers(0, 2**16), unbiased=st.booleans())
def test_group_advantages_grpo_is_standardised_per_group(backend, device, G, num_groups, seed, unbiased):
    scores = randn(G * num_groups, dtype=torch.float32, device=device, seed=seed, scale=3.0)
    out = group_advantages(scores, G, unbiased_std=unbiased).reshape(num_groups, G).double()
    spread = scores.reshape(num_groups, G).double().std(dim=1, unbiased=unbiased)
    # float32 centring loses |score| * 2**-24 per element, amplified by 1 / std: a group of close scores (a small
    # spread) is ill-conditioned, so the bound scales with max|score| / std (hypothesis found 1.6e-5 at ~3x)
    conditioning = (scores.reshape(num_groups, G).double().abs().amax(dim=1) / (spread + 1e-6)).clamp(min=1.0)
    assert (out.mean(dim=1).abs() <= 1e-5 * conditioning).all()
    expected_std = spread / (spread + 1e-6)  # 1 up to epsilon
    assert torch.allclose(out.std(dim=1, unbiased=unbiased), expected_std, rtol=1e-4, atol=1e-5)
    rloo = group_advantages(scores, G, estimator="rloo").reshape(num_groups, G).double()
    assert rloo.sum(dim=1).abs().max() < 1e-4  # leave-one-out advantages sum to zero per group


def test_group_advantages_bad_input():
    s = torch.randn(6)
    with pytest.raises(ValueError, match="group size num_generations=4 does not divide the batch B=6"):
        group_advantages(s, 4)
    with pytest.raises(ValueError, match="num_generations must be >= 1, got 0"):
        group_advantages(s, 0)
    with pytest.raises(TypeError, match="num_generations must be an int, got float"):
        group_advantages(s, 2.0)
    with pytest.raises(TypeError, match="num_generations must be an int, got bool"):
        group_advantages(s, True)
    with pytest.raises(ValueError, match="estimator must be one of"):
        group_advantages(s, 2, estimator="ppo")
    with pytest.raises(ValueError, match="epsilon must be > 0, got -1"):
        group_advantages(s, 2, epsilon=-1e-6)
    with pytest.raises(ValueError, match="epsilon must be finite, got nan"):
        group_advantages(s, 2, epsilon=float("nan"))
    with pytest.raises(ValueError, match=r"scores must have 1 dimensions, got shape \(3, 2\)"):
        group_advantages(s.reshape(3, 2), 2)
    with pytest.raises(TypeError, match="scores must have dtype"):
        group_advantages(s.long(), 2)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        group_advantages([1.0, 2.0], 2)


WHITEN_SHAPES = [(8, 64), (5, 37), (1, 2), (3, 1)]


@pytest.mark.parametrize("shape", WHITEN_SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_float64(backend, device, shape, dtype, shift_mean):
    B, T = shape
    values = randn(B, T, dtype=dtype, device=device, seed=40, scale=3.0) + 1.5
    mask = random_mask(B, T, device, seed=41, full_rows=(0,), empty_rows=(B - 1,) if B > 2 else ())
    if B == 1 or T == 1:
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
    out = masked_whiten(values, mask, shift_mean=shift_mean)
    gold = masked_whiten_ref(values.double(), mask, shift_mean)
    assert out.dtype == torch.float32 and out.shape == values.shape
    assert_close(out, gold, torch.float32, "whitened")
    if shift_mean:  # the masked entries come out with mean 0 and unbiased variance 1 (up to epsilon)
        sel = out[mask].double()
        assert abs(sel.mean().item()) < 1e-5
        assert abs(sel.var().item() - 1.0) < 1e-4


def test_masked_whiten_veRL_numbers(backend, device):
    # Selected entries 10, 20, 30, 40, 50: mean 30, unbiased var 250; masked entries are whitened too (not zeroed).
    values = torch.tensor([[10.0, 20.0, 30.0, 99.0], [40.0, 50.0, 0.0, 0.0]], device=device)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], device=device)
    out = masked_whiten(values, mask, epsilon=0.0)
    expected = (values.double() - 30.0) / 250.0 ** 0.5
    assert_close(out, expected, torch.float32, "whitened")
    out = masked_whiten(values, mask.float(), shift_mean=False, epsilon=0.0)
    assert_close(out, expected + 30.0, torch.float32, "whitened + mean")


def test_masked_whiten_grid_stride_and_determinism(backend, device, monkeypatch):
    # Force tiny blocks and 3 reduction programs so each program strides over many blocks and the partial count is
    # not a power of two; the result must not depend on the blocking, and two runs must be bitwise equal.
    values = randn(8, 64, dtype=torch.bfloat16, device=device, seed=42)
    mask = random_mask(8, 64, device, seed=43)
    gold = masked_whiten_ref(values.double(), mask)
    default = masked_whiten(values, mask)
    monkeypatch.setattr(adv_mod, "_BLOCK", 16)
    monkeypatch.setattr(adv_mod, "_MAX_PARTS", 3)
    first = masked_whiten(values, mask)
    assert_close(first, gold, torch.float32, "whitened")
    assert_close(first, default, torch.float32, "blocking")
    assert torch.equal(first, masked_whiten(values, mask))
    strided = masked_whiten(values.t(), mask.t())  # non-contiguous inputs
    assert_close(strided, gold.t(), torch.float32, "transposed")


@pytest.mark.parametrize("shape", [(8, 64), (5, 37), (3, 1), (1, 3)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_masked_non_finite_never_leaks(backend, device, shape, shift_mean):
    B, T = shape
    values = randn(B, T, dtype=torch.float32, device=device, seed=45, scale=2.0)
    mask = random_mask(B, T, device, seed=46, full_rows=(0,), empty_rows=(B - 1,) if B > 2 else ())
    if B == 1:
        mask[0, -1] = False  # (1, 3): two selected entries and one masked
    out = masked_whiten(values, mask, shift_mean=shift_mean)
    bad_values = values.masked_fill(~mask, float("nan"))
    bad_values[-1, -1] = float("inf") if not mask[-1, -1] else bad_values[-1, -1]
    bad = masked_whiten(bad_values, mask.float(), shift_mean=shift_mean)
    # the statistics never read a masked entry: every selected output is the clean one; a masked entry's own output
    # is computed from its own value (veRL whitens every position)
    assert torch.isfinite(bad[mask]).all()
    assert_close(bad[mask], out[mask], torch.float32, "whitened")
    assert not torch.isfinite(bad[~mask]).any()


def test_masked_whiten_mask_count_errors(backend, device):
    values = randn(2, 3, dtype=torch.float32, device=device, seed=44)
    with pytest.raises(ValueError, match=r"mask must select at least one element.*sum\(mask\) = 0"):
        masked_whiten(values, torch.zeros(2, 3, dtype=torch.bool, device=device))
    one = torch.zeros(2, 3, device=device)
    one[1, 2] = 1.0
    with pytest.raises(ValueError, match="mask selects exactly one element"):
        masked_whiten(values, one)
    with pytest.raises(ValueError, match="mask selects exactly one element"):
        masked_whiten(values[:1, :1], torch.ones(1, 1, dtype=torch.bool, device=device))


def test_masked_whiten_bad_input():
    v = torch.randn(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask must have the shape of values \(2, 3\), got \(3, 2\)"):
        masked_whiten(v, m.t())
    with pytest.raises(TypeError, match="values must have dtype"):
        masked_whiten(v.long(), m)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        masked_whiten(v, [[1, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        masked_whiten(v, m, epsilon=-1.0)
    with pytest.raises(ValueError, match="epsilon must be finite, got inf"):
        masked_whiten(v, m, epsilon=float("inf"))
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1, got 0.25 at index \(0, 2\)"):
        masked_whiten(v, torch.tensor([[1.0, 1.0, 0.25], [0.0, 1.0, 1.0]]))
