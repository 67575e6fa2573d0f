"""Numerically stable scalar math shared by the Triton kernels, written with ``tl.exp``/``tl.log`` only.

libdevice functions (``log1p``, ``tanh``, ...) do not run under the Triton CPU interpreter (research note
ecosystem_reliability.md, c.3), so the few we need are built here from ``exp``/``log``. All helpers take and return
float32 blocks.

    log1p(y)       = y                          if 1 + y == 1 in float32
                   = log(u) * y / (u - 1)       otherwise, u = 1 + y
      (D. Goldberg, "What every computer scientist should know about floating-point arithmetic", 1991, thm. 4: the
       rounding error of u cancels between log(u) and u - 1, which leaves a few ulps for y > -1.)
    logsigmoid(x)  = min(x, 0) - log1p(exp(-|x|))           (finite for every finite x; exp never overflows)
    sigmoid(x)     = 1 / (1 + e)  if x >= 0,  e / (1 + e)  otherwise, e = exp(-|x|)
"""

from __future__ import annotations

from kernels._backend import tl, triton


@triton.jit
def _log1p(y):
    """float32 ``log(1 + y)`` for ``y > -1``, accurate near 0 without libdevice."""
    u = 1.0 + y
    small = u == 1.0
    den = tl.where(small, 1.0, u - 1.0)  # never 0, so the discarded branch raises no division warning
    return tl.where(small, y, tl.log(u) * (y / den))


@triton.jit
def _logsigmoid(x):
    """float32 ``log(sigmoid(x))``, stable for every finite ``x``."""
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    """float32 ``sigmoid(x)`` without overflow (``exp`` of a non-positive number only)."""
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    return tl.where(x >= 0, inv, e * inv)
