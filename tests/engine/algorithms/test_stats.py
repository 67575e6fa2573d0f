"""engine.algorithms.stats.wilson_interval against hand-computed values, its edge cases and its errors."""

import math

import pytest

from engine.algorithms.stats import wilson_interval


def test_wilson_interval_values():
    # 50/100: centre 0.5, halfwidth 1.96 / 1.038416 * sqrt(0.0025 + 0.00009604) = 0.096170
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.403830, abs=1e-6) and high == pytest.approx(0.596170, abs=1e-6)
    # 0/10: the lower bound is exactly 0 (no negative rounding), the upper 2 * 0.19208 / 1.38416 = 0.277540
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.277540, abs=1e-6)
    low, high = wilson_interval(10, 10)  # mirror image
    assert high == 1.0 and low == pytest.approx(1 - 0.277540, abs=1e-6)
    # 8/10 at z = 1: centre (0.8 + 0.05) / 1.1, halfwidth sqrt(0.016 + 0.0025) / 1.1
    low, high = wilson_interval(8, 10, z=1.0)
    assert (low, high) == pytest.approx(((0.85 - math.sqrt(0.0185)) / 1.1, (0.85 + math.sqrt(0.0185)) / 1.1))
    # 1/1: (1/(1+z^2), 1); fractional successes (ties counted half) are accepted
    assert wilson_interval(1, 1) == pytest.approx((1 / (1 + 1.96**2), 1.0))
    assert sum(wilson_interval(2.5, 5)) == pytest.approx(1.0)  # p = 0.5: symmetric about it


def test_wilson_interval_shrinks_and_contains_p():
    widths = []
    for n in (10, 100, 1000, 10000):
        low, high = wilson_interval(round(0.7 * n), n)
        assert low < 0.7 < high
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] == pytest.approx(2 * 1.96 * math.sqrt(0.7 * 0.3 / 10000), rel=1e-3)  # the Wald width, large n


def test_wilson_interval_errors():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must be in \[0, n\] = \[0, 10\], got 11"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="got -1"):
        wilson_interval(-1, 10)
    with pytest.raises(ValueError, match="z must be > 0"):
        wilson_interval(1, 10, z=0.0)
