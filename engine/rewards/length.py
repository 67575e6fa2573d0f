"""DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", Eq. 13; veRL ``reward_manager.overlong_buffer``).

With ``L_max`` = ``max_tokens`` (the generation budget) and ``L_cache`` = ``buffer_len``, a completion of ``|y|``
tokens gets

    R_length(y) = 0                                     if |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache    if L_max - L_cache < |y| <= L_max
                = -1                                     if |y| > L_max

times ``penalty_factor``, added to its reward. A completion cannot exceed ``max_tokens`` here (the generator stops
it), so the punishment reaches ``-penalty_factor`` exactly at the budget.
"""

from __future__ import annotations

from collections.abc import Sequence


def overlong_penalty(lengths: Sequence[int], *, max_tokens: int, buffer_len: int,
                     penalty_factor: float = 1.0) -> list[float]:
    """The DAPO length reward of each completion (``lengths``, in tokens): 0 up to ``max_tokens - buffer_len``,
    then falling linearly to ``-penalty_factor`` at ``max_tokens`` (and staying there beyond it). Returns one float
    per length (all 0 when ``buffer_len`` is 0: off).

    Raises ``ValueError`` for ``max_tokens < 1``, ``buffer_len`` outside ``[0, max_tokens)``, a negative
    ``penalty_factor`` or a negative length (naming it)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= buffer_len < max_tokens:
        raise ValueError(f"buffer_len must be in [0, max_tokens={max_tokens}), got {buffer_len}")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    if buffer_len == 0:
        return [0.0] * len(lengths)
    expected = max_tokens - buffer_len
    out = []
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"lengths[{i}] must be >= 0, got {n}")
        exceed = min(max(n - expected, 0), buffer_len)  # beyond max_tokens the punishment stays at its floor
        out.append(-exceed / buffer_len * penalty_factor)
    return out
