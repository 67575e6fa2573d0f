"""Batched sampling of the next token, with its log-prob, and no host synchronisation.

Per row ``s`` of ``logits [S, V]``: greedy rows (temperature 0) take the argmax of the raw logits; the others divide by
the temperature, keep the top-k, then the nucleus (top-p), renormalise, and draw by an exponential race (the
Gumbel-max trick, as nano-vllm and vLLM do): ``token = argmax_j p_j / E_j`` with ``E_j ~ Exp(1)`` i.i.d., i.e.
``argmax_j (log p_j - log E_j)``; ``P(token = j) = p_j``. No ``torch.multinomial``, no ``.item()``: the whole call is
queued on the device and is capturable in a CUDA graph or a ``torch.compile`` region.

The noise is counter-based and per request: ``E_j = -log U_j`` with ``U_j`` a function of ``(seeds[s], positions[s],
j)`` alone (``uniform_noise``, integer hashing with exact int64 arithmetic), never of a generator's state. Hence the
token a request draws at a position does not depend on which other rows share the batch, or on their order, and the
noise is bit-identical on every device (the logits' float rounding still differs between devices).

Log-probs: the returned value is the log-prob of the chosen token under the distribution actually sampled from (after
temperature, top-k and top-p, renormalised over the kept tokens), in float32 -- what an importance ratio against
the rollout policy needs. For greedy rows it is the log-softmax of the *raw* logits (temperature 1, nothing truncated)
at the argmax: the log-prob a trainer recomputes from the same logits at temperature 1 (greedy "samples" from a point
mass, whose log-prob, 0, says nothing).
"""

from __future__ import annotations

import torch

from kernels._backend import select_backend
from kernels.sampling import race_sample

__all__ = ["child_seed", "make_seed", "sample", "uniform_noise"]

_M32 = 0xFFFFFFFF
_M63 = (1 << 63) - 1
_GOLDEN32 = 0x9E3779B9  # floor(2**32 / phi): an odd offset so that a zero input does not hash to the fixed point 0
_GOLDEN63 = 0x1E3779B97F4A7C15  # an odd 63-bit constant (the 64-bit golden ratio, top bit dropped)
_U_BITS = 23  # float32 holds (m + 0.5) exactly for m < 2**23, so U lies strictly inside (0, 1) with 1 - U >= 2**-24


# ----------------------------------------------------------------------------------------------------- hashing
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow: ``c`` is replaced by ``c - 2**32``
    (same residue mod 2**32) when ``c >= 2**31``, so ``|x * c| < 2**63``; ``& mask`` of the two's complement product
    is the residue."""
    return (x * (c - (1 << 32) if c >= (1 << 31) else c)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of ``[0, 2**32)`` with full avalanche), on int64 tensors."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _fmix32_(h: torch.Tensor) -> torch.Tensor:
    """``_fmix32`` in place on ``h`` (a fresh int64 temporary of the caller's): the same bits, without the ten
    ``[S, V]`` int64 temporaries the functional form allocates (2.3x faster on a CPU at 128 x 2,048)."""
    h.bitwise_xor_(h >> 16)
    h.mul_(0x85EBCA6B - (1 << 32)).bitwise_and_(_M32)  # _mul32: the constant's residue below 2**31 in magnitude
    h.bitwise_xor_(h >> 13)
    h.mul_(0xC2B2AE35 - (1 << 32)).bitwise_and_(_M32)
    return h.bitwise_xor_(h >> 16)


def _row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from the 64-bit seed and the position (taken mod 2**32); for a fixed seed, distinct
    positions give distinct keys (each chain ends in a bijection of the position)."""
    lo, hi, pos = seeds & _M32, (seeds >> 32) & _M32, positions & _M32
    ka = _fmix32(_fmix32(_fmix32(lo ^ _GOLDEN32) ^ hi) ^ pos)
    kb = _fmix32(_fmix32(_fmix32(hi ^ 0x2545F491) ^ lo) ^ pos)
    return ka, kb


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms ``U[s, j] = ((h >> 9) + 0.5) / 2**23`` with ``h = fmix32(fmix32(ids ^ ka[s]) ^ kb[s])``.

    seeds, positions: ``(S,)`` int64. ids: ``(S, V)`` or ``(V,)`` int64 token ids in ``[0, 2**32)``.
    Returns ``(S, V)`` float32 in ``[2**-24, 1 - 2**-24]``: 2**23 equally spaced levels, so ``-log U`` is finite and
    positive (an ``Exp(1)`` draw, discretised at 2**-23). The 64 bits of ``(ka, kb)`` make two rows share a noise
    vector only with probability ~2**-64. Integer ops only: the same bits on every device."""
    ka, kb = _row_keys(seeds.long(), positions.long())
    h = _fmix32_(_fmix32_(ids.long() ^ ka[:, None]).bitwise_xor_(kb[:, None]))  # in place on one [S, V] temporary
    return (h >> (32 - _U_BITS)).to(torch.float32).add_(0.5).mul_(2.0 ** -_U_BITS)


# ----------------------------------------------------------------------------------------------------- sampling
def _truncate(sorted_logits: torch.Tensor, greedy: torch.Tensor, top_k: torch.Tensor | None,
              top_p: torch.Tensor | None) -> torch.Tensor:
    """Set to -inf the entries of ``sorted_logits (S, V)`` (each row descending) outside the top-k, then outside the
    nucleus; greedy rows, rows with ``top_k <= 0`` and rows with ``top_p >= 1`` are left whole. Rank 0 is always
    kept."""
    V = sorted_logits.shape[1]
    out = sorted_logits
    if top_k is not None:
        k = torch.where((top_k <= 0) | greedy, V, top_k.clamp(max=V))
        kth = out.gather(1, (k - 1).unsqueeze(1))  # ties with the k-th value are kept (thresholding, as vLLM)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None:
        probs = out.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # exclusive prefix sum: 0 exactly at rank 0
        drop = (mass_before >= top_p.unsqueeze(1)) & ~(greedy | (top_p >= 1)).unsqueeze(1)
        drop[:, 0] = False
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
           seeds: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return it with its log-prob.

    Args:
        logits: ``(S, V)`` float32 (other float dtypes are upcast), the next-token logits of ``S`` sequences.
        temperature: ``(S,)`` float32, >= 0; 0 = greedy.
        top_k: ``(S,)`` int64, <= 0 = off for that row; or None: off for every row.
        top_p: ``(S,)`` float32 in (0, 1], 1 = off for that row; or None: off for every row.
        seeds: ``(S,)`` int64, the sample's seed (``child_seed(request_seed, index)``).
        positions: ``(S,)`` int64, a counter distinct for each draw of a sample (the token's position in the
            sequence); the noise depends on ``(seeds[s], positions[s], token id)`` only.

    Returns:
        token_ids: ``(S,)`` int64. logprobs: ``(S,)`` float32, see the module docstring.

    Pass None for ``top_k``/``top_p`` when no row uses it (a host-side decision on the ``SamplingParams``): only
    then is the ``(S, V)`` sort skipped, and the whole draw is one fused kernel (``kernels.race_sample``: Triton on CUDA, the compiled extension on the CPU). No host synchronisation; ties in the greedy argmax go to the lowest id.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (S, V), got shape {tuple(logits.shape)}")
    S, V = logits.shape
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seeds", seeds),
                    ("positions", positions)):
        if t is not None and tuple(t.shape) != (S,):
            raise ValueError(f"{name} must have shape ({S},) like logits' rows, got {tuple(t.shape)}")
    temperature = temperature.to(torch.float32)
    if top_k is None and top_p is None and select_backend("race_sample", logits) != "torch":
        # one fused pass over the logits (kernels.sampling; Triton on CUDA, the compiled extension on the CPU): the
        # same function, without [S, V] temporaries
        ka, kb = _row_keys(seeds.long(), positions.long())
        return race_sample(logits if logits.stride(1) == 1 else logits.contiguous(), temperature, ka, kb)
    logits = logits.float()
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)  # greedy rows keep their raw logits
    if top_k is None and top_p is None:
        kept, ids = scaled, torch.arange(V, device=logits.device)
        greedy_col = scaled.argmax(dim=-1)
    else:
        # A stable descending sort puts the lowest id first among equal logits, so column 0 is torch.argmax's pick.
        kept, ids = scaled.sort(dim=-1, descending=True, stable=True)
        kept = _truncate(kept, greedy, None if top_k is None else top_k.long(),
                         None if top_p is None else top_p.to(torch.float32))
        greedy_col = torch.zeros(S, dtype=torch.long, device=logits.device)
    # Exponential race in log space: argmax_j (logit_j - log E_j); -inf (truncated) entries never win.
    race = kept - uniform_noise(seeds, positions, ids).log_().neg_().log_()  # log(E), E = -log U, in place
    col = torch.where(greedy, greedy_col, race.argmax(dim=-1))
    logprobs = kept.gather(1, col.unsqueeze(1)).squeeze(1) - torch.logsumexp(kept, dim=-1)
    token_ids = col if ids.dim() == 1 else ids.gather(1, col.unsqueeze(1)).squeeze(1)
    return token_ids, logprobs


# ----------------------------------------------------------------------------------------------------- seeds
def make_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed in ``[0, 2**63 - 1)`` for a request without one, from ``generator`` (None: torch's default
    generator, so ``torch.manual_seed`` makes the run reproducible)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, _M63, (), generator=generator, device=device, dtype=torch.int64))


def _mix63(x: int) -> int:
    """A bijection of ``[0, 2**63)`` (xorshifts and odd multipliers mod 2**63, the splitmix64 pattern)."""
    x ^= x >> 31
    x = (x * 0x3F58476D1CE4E5B9) & _M63
    x ^= x >> 27
    x = (x * 0x14D049BB133111EB) & _M63
    return x ^ (x >> 31)


def child_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request seeded ``seed``: in ``[0, 2**63)``, deterministic, and distinct for
    distinct indices of the same seed (a bijection of ``seed + (index + 1) * odd mod 2**63``). Any int ``seed``."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return _mix63((seed + (index + 1) * _GOLDEN63) & _M63)
