"""gae and discounted_returns against their float64 reference and hand-computed examples, and with NaN/inf inputs at
masked tokens (which must reach no advantage and no other token's output), through every backend."""

import pytest
import torch

from kernels.gae import discounted_returns, discounted_returns_ref, gae, gae_ref
from tests._numerics import INPUT_DTYPES, assert_close, randn, random_mask

CPP_OPS = ("gae", "discounted_returns")  # the backend fixture's "cpp" param runs these through csrc/cpu

SHAPES = [(8, 64), (5, 37), (1, 1)]
GAMMA_LAM = [(1.0, 1.0), (0.99, 0.95)]


def make_mask(B: int, T: int, device, seed: int, holes: bool = True) -> torch.Tensor:
    """Random right padding, row 0 full, the last row fully masked (B > 2); with ``holes``, the odd rows also lose
    ~20% of their tokens inside the response (tool/observation spans), the even rows stay pure right padding."""
    mask = random_mask(B, T, device, seed, full_rows=(0,), empty_rows=(B - 1,) if B > 2 else ())
    if holes:
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        drop = (torch.rand(B, T, generator=g) < 0.2) & (torch.arange(B)[:, None] % 2 == 1)
        mask &= ~drop.to(device)
    return mask


def seq_error_scale(T: int) -> float:
    # Both the kernel and the gold run the same T-step recurrence; the float32 one rounds once per step on running
    # sums of up to T unit-scale terms, so its error grows about linearly with T. Measured at T = 128 (6 seeds): at
    # most 0.63x the unscaled float32 bound; the allowance T/64 only matters beyond T = 64.
    return max(1.0, T / 64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("skip_masked", [True, False])
def test_gae_matches_float64(backend, device, shape, dtype, gamma, lam, skip_masked):
    B, T = shape
    r = randn(B, T, dtype=dtype, device=device, seed=1)
    v = randn(B, T, dtype=dtype, device=device, seed=2)
    m = make_mask(B, T, device, seed=3)

    adv, ret = gae(r, v, m, gamma=gamma, lam=lam, skip_masked=skip_masked)
    gold_adv, gold_ret = gae_ref(r.double(), v.double(), m, gamma, lam, skip_masked)

    assert adv.dtype == ret.dtype == torch.float32
    assert_close(adv, gold_adv, torch.float32, "advantages", scale=seq_error_scale(T))
    assert_close(ret, gold_ret, torch.float32, "returns", scale=seq_error_scale(T))
    if B > 2:  # a fully masked row: veRL reports advantage 0 and returns = values; OpenRLHF 0 and 0
        assert torch.all(adv[-1] == 0)
        assert_close(ret[-1], v[-1].float() if skip_masked else torch.zeros(T), torch.float32, "masked returns")


POISON_SHAPES = [(8, 64), (5, 37), (1, 1), (3, 1), (4, 2)]  # (3, 1): a full row, a fully masked row


@pytest.mark.parametrize("shape", POISON_SHAPES)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("skip_masked", [True, False])
@pytest.mark.parametrize("holes", [True, False])
def test_gae_masked_non_finite_never_leaks(backend, device, shape, gamma, lam, skip_masked, holes):
    B, T = shape
    r = randn(B, T, dtype=torch.float32, device=device, seed=13)
    v = randn(B, T, dtype=torch.float32, device=device, seed=14)
    m = make_mask(B, T, device, seed=15, holes=holes)
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam, skip_masked=skip_masked)
    bad_r = r.masked_fill(~m, float("nan"))
    bad_v = v.masked_fill(~m, float("nan"))
    bad_v[:, -1:] = bad_v[:, -1:].masked_fill(~m[:, -1:], float("inf"))  # trailing padding: inf values
    bad_adv, bad_ret = gae(bad_r, bad_v, m, gamma=gamma, lam=lam, skip_masked=skip_masked)
    # advantages: clean everywhere, the masked tokens' documented values included (carried; 0 on trailing padding)
    assert torch.isfinite(bad_adv).all()
    assert_close(bad_adv, adv, torch.float32, "advantages")
    if B > 2:
        assert torch.all(bad_adv[-1] == 0)  # the fully masked row
    # returns: clean on every response token; on masked tokens the documented value, adv + V_t (veRL, the token's own
    # value) or adv + 0 (OpenRLHF), so a masked token shows only its own value input
    assert_close(bad_ret[m], ret[m], torch.float32, "returns on response tokens")
    if skip_masked:
        assert_close(bad_ret[~m], bad_adv[~m] + bad_v[~m], torch.float32, "masked returns")
    else:
        assert_close(bad_ret, ret, torch.float32, "returns")
        assert torch.all(bad_ret[~m] == bad_adv[~m])


@pytest.mark.parametrize("shape", POISON_SHAPES)
def test_discounted_returns_masked_non_finite_never_leaks(backend, device, shape):
    B, T = shape
    r = randn(B, T, dtype=torch.float32, device=device, seed=16)
    m = make_mask(B, T, device, seed=17)
    out = discounted_returns(r, m, gamma=0.9)
    bad = discounted_returns(r.masked_fill(~m, float("nan")), m, gamma=0.9)
    # the running return restarts after a masked token, so its NaN stays at that token (its own documented return)
    assert torch.isfinite(bad[m]).all()
    assert_close(bad[m], out[m], torch.float32, "returns on response tokens")
    assert torch.isnan(bad[~m]).all()


def test_gae_hand_example(backend, device):
    """r = [1, 2, 3], V = [0.5, 1, 1.5], m = [1, 0, 1], gamma = lam = 0.5, worked by hand (all exact in binary)."""
    r = torch.tensor([[1.0, 2.0, 3.0]], device=device)
    v = torch.tensor([[0.5, 1.0, 1.5]], device=device)
    m = torch.tensor([[True, False, True]], device=device)
    # veRL: t=2: delta = 3 - 1.5 = 1.5 -> A = 1.5, nv = 1.5.  t=1 (masked): state kept -> A = 1.5, nv = 1.5.
    # t=0: delta = 1 + 0.5 * 1.5 - 0.5 = 1.25, A = 1.25 + 0.25 * 1.5 = 1.625.  returns = A + V.
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5)
    assert adv.tolist() == [[1.625, 1.5, 1.5]]
    assert ret.tolist() == [[2.125, 2.5, 3.0]]
    # OpenRLHF/TRL: V -> [0.5, 0, 1.5], r -> [1, 0, 3].  t=2: A = 1.5.  t=1: delta = 0 + 0.5 * 1.5 - 0 = 0.75,
    # A = 0.75 + 0.25 * 1.5 = 1.125.  t=0: delta = 1 + 0.5 * 0 - 0.5 = 0.5, A = 0.5 + 0.25 * 1.125 = 0.78125.
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5, skip_masked=False)
    assert adv.tolist() == [[0.78125, 1.125, 1.5]]
    assert ret.tolist() == [[1.28125, 1.125, 3.0]]


def test_gae_skip_masked_agrees_on_right_padding_differs_on_holes(backend, device):
    B, T = 6, 23
    r = randn(B, T, dtype=torch.float32, device=device, seed=4)
    v = randn(B, T, dtype=torch.float32, device=device, seed=5)
    m = make_mask(B, T, device, seed=6, holes=False)
    a_verl, r_verl = gae(r, v, m, gamma=0.99, lam=0.95)
    a_orl, r_orl = gae(r, v, m, gamma=0.99, lam=0.95, skip_masked=False)
    assert_close(a_verl, a_orl, torch.float32, "advantages")  # everywhere, padding included
    assert_close(r_verl[m], r_orl[m], torch.float32, "returns on response tokens")

    m[0, T // 2] = False  # one interior zero in a full row
    a_verl, _ = gae(r, v, m, gamma=0.99, lam=0.95)
    a_orl, _ = gae(r, v, m, gamma=0.99, lam=0.95, skip_masked=False)
    assert_close(a_verl[1:], a_orl[1:], torch.float32, "untouched rows")
    assert_close(a_verl[0, T // 2 + 1:], a_orl[0, T // 2 + 1:], torch.float32, "right of the hole")
    assert (a_verl[0, : T // 2 + 1] - a_orl[0, : T // 2 + 1]).abs().min() > 1e-3


def test_gae_strided_inputs_mask_dtypes_and_many_programs(backend, device):
    # B = 70 spans two programs of 64 rows; transposed (non-contiguous) inputs are read through their strides.
    B, T = 70, 9
    r = randn(T, B, dtype=torch.float32, device=device, seed=7).t()
    v = randn(T, B, dtype=torch.bfloat16, device=device, seed=8).t()
    m = make_mask(B, T, device, seed=9)
    gold = gae_ref(r.double(), v.double(), m, 0.9, 0.8)
    for mask in (m, m.float(), m.long(), m.to(torch.uint8), m.t().contiguous().t()):
        adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
        assert_close(adv, gold[0], torch.float32, "advantages")
        assert_close(ret, gold[1], torch.float32, "returns")


def test_gae_float64_and_empty(backend, device):
    r = randn(3, 5, dtype=torch.float64, device=device, seed=10)
    m = torch.ones(3, 5, dtype=torch.bool, device=device)
    adv, ret = gae(r, r, m, gamma=0.9, lam=0.9)
    assert adv.dtype == ret.dtype == torch.float64
    adv, ret = gae(r.float()[:0], r.float()[:0], m[:0])
    assert adv.shape == ret.shape == (0, 5)
    adv, ret = gae(r.float()[:, :0], r.float()[:, :0], m[:, :0])
    assert adv.shape == (3, 0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("gamma", [1.0, 0.99])
def test_discounted_returns_matches_float64(backend, device, shape, dtype, gamma):
    B, T = shape
    r = randn(B, T, dtype=dtype, device=device, seed=11)
    m = make_mask(B, T, device, seed=12)
    out = discounted_returns(r, m, gamma=gamma)
    gold = discounted_returns_ref(r.double(), m, gamma)
    assert out.dtype == torch.float32
    assert_close(out, gold, torch.float32, "returns", scale=seq_error_scale(T))


def test_discounted_returns_hand_example(backend, device):
    # row 0: t=2: G = 3 (kept, m=1); t=1: G = 2 + 0.5 * 3 = 3.5, then reset (m=0); t=0: G = 1 + 0.5 * 0 = 1.
    # row 1: t=2: G = 1, then reset (trailing padding holds its own reward); t=1: G = 1; t=0: G = 1 + 0.5 * 1 = 1.5.
    r = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], device=device)
    m = torch.tensor([[1, 0, 1], [1, 1, 0]], device=device)
    out = discounted_returns(r, m, gamma=0.5)
    assert out.tolist() == [[1.0, 3.5, 3.0], [1.5, 1.0, 1.0]]


def test_gae_bad_input():
    r = torch.randn(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"values must have the shape of token_level_rewards \(2, 3\), got \(2, 4\)"):
        gae(r, torch.randn(2, 4), m)
    with pytest.raises(ValueError, match=r"response_mask must have the shape of token_level_rewards"):
        gae(r, r, m[:, :2])
    with pytest.raises(ValueError, match=r"token_level_rewards must have 2 dimensions, got shape \(6,\)"):
        gae(r.flatten(), r.flatten(), m.flatten())
    with pytest.raises(TypeError, match="values must have dtype"):
        gae(r, r.long(), m)
    with pytest.raises(TypeError, match="response_mask must have dtype"):
        gae(r, r, m.to(torch.complex64))
    with pytest.raises(TypeError, match="token_level_rewards must be a torch.Tensor, got list"):
        gae([[1.0]], r, m)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
        gae(r, r, m, gamma=1.5)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got -0.1"):
        gae(r, r, m, lam=-0.1)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got nan"):
        gae(r, r, m, lam=float("nan"))
    with pytest.raises(TypeError, match="gamma must be a number"):
        gae(r, r, m, gamma="0.9")
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        discounted_returns(r, m, gamma=2.0)
    with pytest.raises(ValueError, match="response_mask must have the shape"):
        discounted_returns(r, m.t())
    with pytest.raises(TypeError, match="token_level_rewards must have dtype"):
        discounted_returns(r.int(), m)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got inf"):
        gae(r, r, m, gamma=float("inf"))
    with pytest.raises(ValueError, match="response_mask must be bool or hold only 0 and 1, got 0.5"):
        gae(r, r, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="response_mask must be bool or hold only 0 and 1, got -1"):
        discounted_returns(r, -torch.ones(2, 3, dtype=torch.long))
