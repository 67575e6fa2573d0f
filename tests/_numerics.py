"""The one tolerance table of the test suite, and a verbose comparison helper.

Every kernel computes in float32 whatever its input dtype, and every test builds its float64 gold from the *same*
(already rounded) low-precision inputs. So the only error left is (a) float32 arithmetic, bounded by the fp32 row, and
(b) rounding of outputs stored in the input dtype (the gradients w.r.t. bf16/fp16 inputs), bounded by that dtype's row:
about two units in the last place (bf16 has 8 mantissa bits: 2**-7 = 7.8e-3; fp16 has 11: 2**-10 = 9.8e-4).
Per-case exceptions carry a comment with their reason at the call site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


TOLS: dict[torch.dtype, Tol] = {
    torch.float64: Tol(rtol=1e-10, atol=1e-12),
    torch.float32: Tol(rtol=2e-5, atol=2e-6),
    torch.float16: Tol(rtol=2e-3, atol=1e-5),
    torch.bfloat16: Tol(rtol=1.6e-2, atol=1e-4),
}

# Low-precision input dtypes the kernels accept; the outputs of the log-prob/loss math are float32 for all of them.
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "output",
                 scale: float = 1.0) -> None:
    """Assert ``|actual - expected| <= scale * (atol + rtol * |expected|)`` elementwise with ``TOLS[dtype]``.

    NaN/inf must match exactly. On failure the message lists the worst five indices with both values."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nonfinite = ~torch.isfinite(e) | ~torch.isfinite(a)
    if nonfinite.any():
        same = (a[nonfinite] == e[nonfinite]) | (torch.isnan(a[nonfinite]) & torch.isnan(e[nonfinite]))
        assert bool(same.all()), f"{name}: non-finite values differ at {nonfinite.nonzero()[:5].tolist()}"
    tol = TOLS[dtype]
    bound = scale * (tol.atol + tol.rtol * e.abs())
    err = torch.where(nonfinite, torch.zeros_like(a), (a - e).abs())
    excess = err - bound
    if bool((excess > 0).any()):
        worst = torch.topk(excess.flatten(), k=min(5, excess.numel())).indices
        rows = []
        for flat in worst.tolist():
            idx = tuple(torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
            idx = tuple(int(i) for i in idx)
            rows.append(f"  at {idx}: got {a.flatten()[flat]:.8g}, expected {e.flatten()[flat]:.8g}")
        raise AssertionError(
            f"{name} ({dtype}): max abs err {err.max():.3g}, bound rtol={tol.rtol * scale:g} "
            f"atol={tol.atol * scale:g}; worst:\n" + "\n".join(rows)
        )


def randn(*shape: int, dtype: torch.dtype, device, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Fresh standard-normal values (never zeros) from a seeded generator, rounded to ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def random_mask(B: int, T: int, device, seed: int, *, full_rows=(), empty_rows=()) -> torch.Tensor:
    """A ``[B, T]`` bool response mask with random right padding; rows in ``empty_rows`` are fully masked."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    for r in full_rows:
        lengths[r] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    for r in empty_rows:
        mask[r] = False
    return mask.to(device)


def seq_agg_expected(rows: list[torch.Tensor], mode: str, T: int) -> torch.Tensor:
    """The ``loss_agg_mode`` aggregation of per-row token losses written out from the anchors (veRL ``agg_loss``,
    OpenRLHF ``aggregate_loss``): ``rows`` holds the valid tokens' losses of each non-empty row only, so the seq-mean
    modes average over the rows that have a token; ``T`` is the padded length (the default loss_scale_factor)."""
    return {
        "token-mean": lambda: torch.cat(rows).mean(),
        "seq-mean-token-mean": lambda: sum(r.mean() for r in rows) / len(rows),
        "seq-mean-token-sum": lambda: sum(r.sum() for r in rows) / len(rows),
        "seq-mean-token-sum-norm": lambda: sum(r.sum() for r in rows) / (len(rows) * T),
    }[mode]()


def assert_within_twice_eager_error(got, gold, eager, dtype, name):
    """flash-attention's rule (STYLE 3) for results that eager PyTorch itself computes with several roundings in
    bf16/fp16 (gradients here, SwiGLU, RoPE's rounded products before a cancelling sum): ``max|got - gold| <= 2
    max|eager - gold| + atol + rtol max|gold|`` (``eager``: the reference run in ``dtype``; the last term allows one
    rounding of the largest value, which eager may get exactly right on tiny inputs); float32 results must also pass
    the table's float32 row. (Used by the tests of rms_norm, silu_mul and rope_cache.)"""
    assert got.dtype == eager.dtype and got.shape == gold.shape, name
    if gold.numel() == 0:
        return
    got, gold, eager = got.detach().double(), gold.detach(), eager.detach().double()
    err = float((got - gold).abs().max())
    base = float((eager - gold).abs().max())
    tol = TOLS[dtype]
    bound = 2 * base + tol.atol + tol.rtol * float(gold.abs().max())
    assert err <= bound, f"{name} ({dtype}): max abs err {err:.3g} > {bound:.3g} (eager's error {base:.3g})"
    if dtype == torch.float32:
        assert_close(got, gold, dtype, name)
