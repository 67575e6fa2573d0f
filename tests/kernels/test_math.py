"""The shared Triton math helpers of kernels/_math.py against float64 torch, over their whole float32 range."""

import pytest
import torch

from kernels._backend import HAS_TRITON, interpreting, tl, triton
from kernels._math import _log1p, _logsigmoid, _sigmoid

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or interpreting()), reason="needs triton (GPU or interpreter)"
)


@triton.jit
def _math_probe_kernel(X, Y, OUT, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(OUT + offs, _log1p(y), mask=valid)
    tl.store(OUT + N + offs, _logsigmoid(x), mask=valid)
    tl.store(OUT + 2 * N + offs, _sigmoid(x), mask=valid)


def test_math_helpers_match_float64(device):
    # y > -1 for log1p, from just above -1 through the float32 cancellation zone near 0 to huge values
    y = torch.tensor([-0.999999, -0.5, -1e-3, -1e-7, -1e-30, 0.0, 1e-30, 1e-9, 3e-8, 1e-6, 1e-4, 1e-2, 0.3, 1.0,
                      7.0, 1e3, 1e30], dtype=torch.float32)
    x = torch.tensor([-1e4, -200.0, -90.0, -20.0, -1.0, -1e-6, 0.0, 1e-6, 0.5, 1.0, 15.0, 17.0, 40.0, 88.0, 104.0,
                      200.0, 1e4], dtype=torch.float32)
    n = x.numel()
    out = torch.empty(3 * n, dtype=torch.float32, device=device)
    _math_probe_kernel[(1,)](x.to(device), y.to(device), out, n, BLOCK=32)
    out = out.cpu().double()
    x64, y64 = x.double(), y.double()
    gold = (torch.log1p(y64), torch.nn.functional.logsigmoid(x64), torch.sigmoid(x64))
    for name, got, exp in zip(("log1p", "logsigmoid", "sigmoid"), out.split(n), gold):
        # a few float32 ulps relative (Goldberg's log1p: <= 5 ulps; the GPU's exp/log add ~2 ulps: logsigmoid(15)
        # was 6.1e-7 off on an H100), tiny absolute floor for subnormal results
        bad = (got - exp).abs() > 1e-6 * exp.abs() + 1e-43
        assert not bad.any(), f"{name}: at {x[bad].tolist() if name != 'log1p' else y[bad].tolist()} " \
                              f"got {got[bad].tolist()}, expected {exp[bad].tolist()}"
