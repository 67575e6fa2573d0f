"""kernels.loss_agg: the denominators of every ``loss_agg_mode`` against veRL/OpenRLHF's formulas written out per row
(fully masked rows excluded from the seq-mean count), TRL's ``dr_grpo``, and NaN/inf at masked positions (no leak
into the loss or the gradient). The fused kernels' use of these weights is tested in test_ppo_loss / test_value_loss.
"""

import pytest
import torch

from kernels.loss_agg import LOSS_AGG_MODES, agg_loss_ref, masked_mean_ref
from tests._numerics import assert_close, randn, random_mask

SHAPES = [(4, 7), (5, 37), (1, 1), (3, 1)]


def anchor_agg(loss, mask, mode, global_num_tokens=None, global_num_seqs=None, loss_scale_factor=None):
    """veRL ``core_algos.agg_loss`` / OpenRLHF ``aggregate_loss`` (current), row by row in float64 Python."""
    B, T = loss.shape
    rows = [[float(loss[i, t]) for t in range(T) if mask[i, t]] for i in range(B)]
    n_tok = sum(len(r) for r in rows)
    seq_mask = [len(r) > 0 for r in rows]  # veRL: seq_mask = (loss_mask.sum(-1) > 0)
    d_seq = global_num_seqs if global_num_seqs is not None else max(sum(seq_mask), 1)
    if mode == "token-mean":
        return sum(map(sum, rows)) / (global_num_tokens if global_num_tokens is not None else max(n_tok, 1))
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows if r) / d_seq
    if mode == "seq-mean-token-sum":
        return sum(map(sum, rows)) / d_seq
    return sum(map(sum, rows)) / (d_seq * (loss_scale_factor if loss_scale_factor is not None else T))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_ref_matches_the_anchor_formulas(shape, mode):
    B, T = shape
    loss = randn(B, T, dtype=torch.float64, device="cpu", seed=1)
    mask = random_mask(B, T, "cpu", seed=2, full_rows=(0,), empty_rows=(B - 1,) if B > 2 else ())
    assert_close(agg_loss_ref(loss, mask, mode), torch.tensor(anchor_agg(loss, mask, mode), dtype=torch.float64),
                 torch.float64, mode)
    given = dict(global_num_tokens=11, global_num_seqs=6, loss_scale_factor=9)
    assert_close(agg_loss_ref(loss, mask, mode, **given),
                 torch.tensor(anchor_agg(loss, mask, mode, **given), dtype=torch.float64), torch.float64, mode)


def test_agg_loss_ref_hand_computed_fully_masked_row_is_not_counted():
    # rows: [1, 2, 3] (3 tokens), [4] (1 token), and a fully masked row of 9s
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    expected = {
        "token-mean": 10 / 4,
        "seq-mean-token-mean": (2 + 4) / 2,  # 2 non-empty rows, not 3
        "seq-mean-token-sum": 10 / 2,
        "seq-mean-token-sum-norm": 10 / (2 * 3),  # seq-mean of sums / T
    }
    for mode, value in expected.items():
        assert agg_loss_ref(loss, mask, mode).item() == pytest.approx(value, rel=1e-12), mode
    assert agg_loss_ref(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=5).item() == pytest.approx(1.0)
    assert agg_loss_ref(loss, mask, "seq-mean-token-sum", global_num_seqs=4).item() == pytest.approx(2.5)
    for mode in LOSS_AGG_MODES:  # nothing valid: 0, not 0 / 0
        assert agg_loss_ref(loss, torch.zeros_like(mask), mode).item() == 0.0


def test_seq_mean_token_sum_norm_is_trl_dr_grpo_when_every_row_has_a_token():
    # TRL dr_grpo: (per_token_loss * mask).sum() / (B * max_completion_length)
    B, T, max_completion_length = 4, 6, 8
    loss = randn(B, T, dtype=torch.float64, device="cpu", seed=3)
    mask = random_mask(B, T, "cpu", seed=4)
    assert bool(mask.any(-1).all())
    trl = (loss * mask).sum() / (B * max_completion_length)
    ours = agg_loss_ref(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=max_completion_length)
    assert_close(ours, trl, torch.float64, "dr_grpo")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_agg_loss_ref_masked_non_finite_never_leaks(mode, poison):
    B, T = 5, 9
    clean = randn(B, T, dtype=torch.float32, device="cpu", seed=5)
    mask = random_mask(B, T, "cpu", seed=6, full_rows=(0,), empty_rows=(B - 1,))
    x_clean = clean.clone().requires_grad_(True)
    x_bad = clean.masked_fill(~mask, poison).requires_grad_(True)
    gold = agg_loss_ref(x_clean, mask.float(), mode)
    got = agg_loss_ref(x_bad, mask.float(), mode)
    gold.backward()
    got.backward()
    assert torch.isfinite(got)
    assert_close(got, gold, torch.float32, "loss")
    assert torch.isfinite(x_bad.grad).all() and torch.all(x_bad.grad[~mask] == 0)
    assert_close(x_bad.grad, x_clean.grad, torch.float32, "grad")
    mean = masked_mean_ref(x_bad, mask)
    assert_close(mean, masked_mean_ref(clean, mask), torch.float32, "masked mean")


def test_agg_loss_ref_bad_input():
    loss, mask = torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1, got 0.5 at index \(1, 2\)"):
        agg_loss_ref(loss, torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.5]]))
    with pytest.raises(ValueError, match="mask must have the shape of loss_mat"):
        agg_loss_ref(loss, mask[:, :2])
    with pytest.raises(ValueError, match="global_num_seqs must be finite, got nan"):
        agg_loss_ref(loss, mask, "seq-mean-token-mean", global_num_seqs=float("nan"))
    with pytest.raises(ValueError, match="loss_scale_factor must be finite, got inf"):
        agg_loss_ref(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=float("inf"))
