"""Small statistics helpers for reporting evaluation results (for example a reward model's held-out accuracy)."""

from __future__ import annotations

import math


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) for a binomial proportion: ``(low, high)`` in ``[0, 1]``.

    With ``p = successes / n``:

        centre    = (p + z^2 / (2n)) / (1 + z^2 / n)
        halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        interval  = (centre - halfwidth, centre + halfwidth)

    ``z = 1.96`` gives the 95% interval. Unlike the normal (Wald) interval it stays inside ``[0, 1]`` and is not
    degenerate at ``p = 0`` or ``1`` (``0/10`` gives ``(0.0, 0.278)``); ``50/100`` gives ``(0.404, 0.596)``.

    Raises ``ValueError`` for ``n < 1``, ``successes`` outside ``[0, n]``, or ``z <= 0``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n] = [0, {n}], got {successes}")
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    halfwidth = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - halfwidth), min(1.0, centre + halfwidth)  # clamp rounding at p = 0 or 1


def nanmean(values) -> float:
    """Mean of the numbers in ``values``, skipping ``None`` and NaN (a reward function's "no verdict"); NaN when
    nothing is left."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")
