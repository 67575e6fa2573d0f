"""The sampler (greedy, temperature, top-k, top-p; counter-based exponential race), its log-probs against a float64
reference, its reproducibility and distribution, the seed helpers, and ``SamplingParams`` / output validation."""

import math

import pytest
import torch

from kernels import _extension

from engine.generation.outputs import CompletionOutput, RequestOutput
from engine.generation.sampler import child_seed, make_seed, sample, uniform_noise
from engine.generation.sampling_params import SamplingParams
from kernels._backend import HAS_TRITON
from tests._numerics import assert_close

M32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------ references
def _fmix32_py(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _uniform_py(seed: int, position: int, j: int) -> float:
    """The noise specification in plain Python ints (arbitrary precision: no overflow question)."""
    lo, hi, pos = seed & M32, (seed >> 32) & M32, position & M32
    ka = _fmix32_py(_fmix32_py(_fmix32_py(lo ^ 0x9E3779B9) ^ hi) ^ pos)
    kb = _fmix32_py(_fmix32_py(_fmix32_py(hi ^ 0x2545F491) ^ lo) ^ pos)
    h = _fmix32_py(_fmix32_py(j ^ ka) ^ kb)
    return ((h >> 9) + 0.5) / 2**23


def _kept_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64 ``(V,)`` probabilities that one row samples from: 0 outside the top-k / nucleus set, renormalised."""
    x = logits.double()
    if temperature == 0:
        return torch.softmax(x, -1)  # greedy rows report the raw log-softmax
    p = torch.softmax(x / temperature, -1)
    order = sorted(range(len(p)), key=lambda j: (-float(x[j]), j))
    keep = torch.zeros(len(p), dtype=torch.bool)
    if top_k > 0:
        kth = float(x[order[min(top_k, len(p)) - 1]])
        keep |= x >= kth
    else:
        keep[:] = True
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    if top_p < 1:
        mass, nucleus = 0.0, torch.zeros_like(keep)
        for j in order:
            if mass >= top_p or p[j] == 0:
                break
            nucleus[j] = True
            mass += float(p[j])
        p = torch.where(nucleus, p, 0.0)
        p = p / p.sum()
    return p


def _rows(S: int, seed: int, device, *, truncate: bool):
    g = torch.Generator().manual_seed(seed)
    temperature = torch.rand(S, generator=g) * 1.5 + 0.2
    temperature[::5] = 0.0  # some greedy rows
    top_k = torch.randint(-1, 8, (S,), generator=g) if truncate else None
    top_p = torch.where(torch.rand(S, generator=g) < 0.3, 1.0, torch.rand(S, generator=g) * 0.9 + 0.05) \
        if truncate else None
    seeds = torch.randint(0, 2**62, (S,), generator=g)
    positions = torch.randint(0, 4096, (S,), generator=g)
    to = (lambda t: None if t is None else t.to(device))
    return to(temperature), to(top_k), to(top_p), to(seeds), to(positions)


# ------------------------------------------------------------------------------------------------ noise
def test_noise_matches_the_integer_specification_bit_for_bit(device):
    seeds = [0, 1, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1, 987654321987654321]
    positions = [0, 1, 7, 2**31, 2**32 - 1, 100000, 3]
    ids = [0, 1, 2, 1000, 151935, 2**31 + 5]
    u = uniform_noise(torch.tensor(seeds, device=device), torch.tensor(positions, device=device),
                      torch.tensor(ids, device=device))
    expected = torch.tensor([[_uniform_py(s, p, j) for j in ids] for s, p in zip(seeds, positions)])
    assert u.dtype == torch.float32
    assert torch.equal(u.cpu(), expected.float())
    assert float(u.min()) > 0 and float(u.max()) < 1


def test_noise_is_uniform_and_positions_and_seeds_decorrelate():
    S, V = 64, 4096
    u = uniform_noise(torch.arange(S), torch.zeros(S, dtype=torch.long), torch.arange(V)).double()
    n = S * V
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    hist = torch.histc(u, bins=16, min=0, max=1)
    assert (hist - n / 16).abs().max() < 5 * math.sqrt(n / 16)
    # Consecutive positions of one seed and consecutive seeds: no visible correlation between rows.
    corr = torch.corrcoef(u)
    off_diag = corr[~torch.eye(S, dtype=torch.bool)]
    assert off_diag.abs().max() < 6 / math.sqrt(V)


# ------------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("S,V", [(1, 1), (4, 37), (16, 128)])
def test_greedy_takes_the_argmax_with_its_raw_log_softmax(device, S, V, truncate):
    g = torch.Generator().manual_seed(S * 1000 + V)
    logits = (torch.randn(S, V, generator=g) * 3).to(device)
    zeros = torch.zeros(S, device=device)
    top_k = torch.full((S,), 2, device=device) if truncate else None  # ignored by greedy rows
    top_p = torch.full((S,), 0.1, device=device) if truncate else None
    tokens, logprobs = sample(logits, zeros, top_k, top_p, torch.arange(S, device=device),
                              torch.zeros(S, dtype=torch.long, device=device))
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.argmax(-1))
    expected = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None]).squeeze(1)
    assert_close(logprobs, expected, torch.float32, "greedy logprobs")


@pytest.mark.parametrize("truncate", [False, True])
def test_greedy_ties_go_to_the_lowest_id(device, truncate):
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]], device=device)
    kw = {"top_k": torch.tensor([3, 0], device=device), "top_p": torch.tensor([0.5, 1.0], device=device)} \
        if truncate else {"top_k": None, "top_p": None}
    tokens, logprobs = sample(logits, torch.zeros(2, device=device), seeds=torch.tensor([1, 2], device=device),
                              positions=torch.tensor([0, 0], device=device), **kw)
    assert tokens.tolist() == [1, 0]
    assert_close(logprobs[1].cpu(), torch.tensor(math.log(0.25)), torch.float32, "uniform row")


def test_bf16_logits_are_upcast(device):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    tokens, logprobs = sample(logits, torch.zeros(3, device=device), None, None, torch.arange(3, device=device),
                              torch.zeros(3, dtype=torch.long, device=device))
    assert logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.float().argmax(-1))


# ------------------------------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("S,V", [(1, 7), (40, 37), (32, 128)])
def test_logprobs_match_the_float64_kept_distribution(device, S, V, truncate):
    g = torch.Generator().manual_seed(7 * S + V)
    logits = (torch.randn(S, V, generator=g) * 2).to(device)
    temperature, top_k, top_p, seeds, positions = _rows(S, S + V, device, truncate=truncate)
    tokens, logprobs = sample(logits, temperature, top_k, top_p, seeds, positions)
    expected = []
    for s in range(S):
        p = _kept_distribution(logits[s].cpu(), float(temperature[s]),
                               int(top_k[s]) if truncate else 0, float(top_p[s]) if truncate else 1.0)
        tok = int(tokens[s])
        assert p[tok] > 0, f"row {s}: token {tok} outside the top-k / nucleus set"
        expected.append(math.log(p[tok]))
    # float32 log-softmax of logits / T with |logits / T| up to ~40: a few ulps of the largest logit.
    assert_close(logprobs.cpu(), torch.tensor(expected, dtype=torch.float64), torch.float32, "logprobs", scale=8.0)


def test_the_sort_path_equals_the_plain_path_when_nothing_is_truncated(device):
    S, V = 24, 101
    logits = torch.randn(S, V, generator=torch.Generator().manual_seed(11)).to(device)
    temperature, _, _, seeds, positions = _rows(S, 11, device, truncate=False)
    plain = sample(logits, temperature, None, None, seeds, positions)
    off_k = torch.where(torch.arange(S) % 2 == 0, 0, -1).to(device)
    sorted_ = sample(logits, temperature, off_k, torch.ones(S, device=device), seeds, positions)
    assert torch.equal(plain[0], sorted_[0])
    assert_close(sorted_[1], plain[1], torch.float32, "logprobs")


def test_top_k_one_and_tiny_top_p_are_greedy_with_logprob_zero(device):
    S, V = 8, 64
    logits = torch.randn(S, V, generator=torch.Generator().manual_seed(5)).to(device)
    ones = torch.ones(S, device=device)
    seeds, positions = torch.arange(S, device=device), torch.arange(S, device=device)
    for top_k, top_p in [(torch.ones(S, dtype=torch.long, device=device), None), (None, ones * 1e-6)]:
        tokens, logprobs = sample(logits, ones, top_k, top_p, seeds, positions)
        assert torch.equal(tokens, logits.argmax(-1))
        assert torch.equal(logprobs, torch.zeros_like(logprobs))


# ------------------------------------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("truncate", [False, True])
def test_same_seed_and_position_give_the_same_token_whatever_the_batch(device, truncate):
    S, V = 33, 257
    logits = torch.randn(S, V, generator=torch.Generator().manual_seed(1)).to(device)
    temperature, top_k, top_p, seeds, positions = _rows(S, 1, device, truncate=truncate)
    temperature = temperature.clamp(min=0.5)  # all sampled rows
    tokens, logprobs = sample(logits, temperature, top_k, top_p, seeds, positions)
    again = sample(logits, temperature, top_k, top_p, seeds, positions)
    assert torch.equal(tokens, again[0]) and torch.equal(logprobs, again[1])
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(2)).to(device)
    pick = (lambda t: None if t is None else t[perm])
    permuted = sample(logits[perm], temperature[perm], pick(top_k), pick(top_p), seeds[perm], positions[perm])
    assert torch.equal(permuted[0], tokens[perm])
    assert_close(permuted[1], logprobs[perm], torch.float32, "permuted logprobs")
    for s in (0, 17, S - 1):  # the row alone in its batch
        one = slice(s, s + 1)
        alone = sample(logits[one], temperature[one], None if top_k is None else top_k[one],
                       None if top_p is None else top_p[one], seeds[one], positions[one])
        assert int(alone[0]) == int(tokens[s])


def test_different_seeds_or_positions_change_the_samples(device):
    S, V = 64, 1000
    logits = torch.zeros(S, V, device=device)  # uniform: collisions only by chance (about 2 of 64 rows)
    ones = torch.ones(S, device=device)
    by_seed, _ = sample(logits, ones, None, None, torch.arange(S, device=device), torch.zeros(S, dtype=torch.long,
                                                                                               device=device))
    by_pos, _ = sample(logits, ones, None, None, torch.full((S,), 42, device=device), torch.arange(S, device=device))
    assert len(set(by_seed.tolist())) >= 56
    assert len(set(by_pos.tolist())) >= 56
    assert (by_seed != by_pos).sum() >= 56


# ------------------------------------------------------------------------------------------------ distribution
def _assert_frequencies(tokens: torch.Tensor, p: torch.Tensor, label: str) -> None:
    N = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=p.numel()).double()
    sigma = (N * p * (1 - p)).sqrt()
    z = (counts - N * p) / sigma.clamp(min=1e-12)
    assert bool((counts[p == 0] == 0).all()), f"{label}: drew tokens of probability 0: {counts.tolist()}"
    assert float(z[p > 0].abs().max()) < 5, f"{label}: counts {counts.tolist()} vs expected {(N * p).tolist()}"


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (1.0, 3, 0.9)])
def test_frequencies_match_the_sampled_distribution(device, temperature, top_k, top_p):
    N, V = 4000, 5
    row = torch.tensor([1.0, 0.2, -0.5, 0.7, -1.5])
    logits = row.expand(N, V).contiguous().to(device)
    request_seed = 20240601
    seeds = torch.tensor([child_seed(request_seed, i) for i in range(N)], device=device)
    full = (lambda v, dt: torch.full((N,), v, dtype=dt, device=device))
    tokens, logprobs = sample(logits, full(temperature, torch.float32),
                              full(top_k, torch.long) if top_k else None, full(top_p, torch.float32) if top_p < 1
                              else None, seeds, torch.zeros(N, dtype=torch.long, device=device))
    p = _kept_distribution(row, temperature, top_k, top_p)
    _assert_frequencies(tokens, p, f"T={temperature} k={top_k} p={top_p}")
    assert_close(logprobs.cpu(), p.log()[tokens.cpu()], torch.float32, "logprobs")


def test_frequencies_along_the_positions_of_one_seed(device):
    N, V = 4000, 5
    row = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    tokens, _ = sample(row.expand(N, V).contiguous().to(device), torch.ones(N, device=device), None, None,
                       torch.full((N,), 7, device=device), torch.arange(N, device=device))
    _assert_frequencies(tokens, torch.softmax(row.double(), -1), "positions")


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("truncate", [False, True])
def test_sample_does_not_synchronise_with_the_host(truncate):
    S, V = 64, 32000
    logits = torch.randn(S, V, device="cuda")
    args = _rows(S, 3, "cuda", truncate=truncate)
    sample(logits, *args)  # warm up (lazy inits may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(logits, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_is_the_same_on_cpu_and_cuda():
    seeds, positions = torch.randint(0, 2**62, (16,)), torch.randint(0, 10**6, (16,))
    ids = torch.arange(50000)
    cpu = uniform_noise(seeds, positions, ids)
    assert torch.equal(uniform_noise(seeds.cuda(), positions.cuda(), ids.cuda()).cpu(), cpu)


# ------------------------------------------------------------------------------------------------ seeds
def test_make_seed_is_63_bit_and_follows_its_generator():
    a = [make_seed(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1] and 0 <= a[0] < 2**63
    g = torch.Generator().manual_seed(4)
    draws = {make_seed(g) for _ in range(100)}
    assert len(draws) == 100 and max(draws) > 2**60
    torch.manual_seed(9)
    first = make_seed()
    torch.manual_seed(9)
    assert make_seed(None) == first


def test_child_seeds_are_deterministic_distinct_and_63_bit():
    kids = [child_seed(12345, i) for i in range(4096)]
    assert kids == [child_seed(12345, i) for i in range(4096)]
    assert len(set(kids)) == len(kids) and all(0 <= k < 2**63 for k in kids)
    assert child_seed(12346, 0) not in kids
    assert 0 <= child_seed(-5, 3) < 2**63 and 0 <= child_seed(2**70, 3) < 2**63
    with pytest.raises(ValueError, match="index"):
        child_seed(1, -1)


# ------------------------------------------------------------------------------------------------ SamplingParams
@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, r"SamplingParams\.n must be an int >= 1, got 0"),
    ({"n": 2.0}, r"SamplingParams\.n .*got 2\.0"),
    ({"top_p": 0}, r"SamplingParams\.top_p must be a number in \(0, 1\], got 0"),
    ({"top_p": 1.5}, r"SamplingParams\.top_p .*got 1\.5"),
    ({"top_p": float("nan")}, r"SamplingParams\.top_p"),
    ({"temperature": -1}, r"SamplingParams\.temperature must be a finite number >= 0.*got -1"),
    ({"temperature": float("inf")}, r"SamplingParams\.temperature .*got inf"),
    ({"max_tokens": 0}, r"SamplingParams\.max_tokens must be an int >= 1, got 0"),
    ({"top_k": -2}, r"SamplingParams\.top_k must be an int >= -1 .*got -2"),
    ({"top_k": 3.0}, r"SamplingParams\.top_k"),
    ({"stop_token_ids": [-1]}, r"SamplingParams\.stop_token_ids must be a list of non-negative ints.*got \[-1\]"),
    ({"stop_token_ids": "2"}, r"SamplingParams\.stop_token_ids"),
    ({"seed": 1.5}, r"SamplingParams\.seed must be an int or None, got 1\.5"),
    ({"ignore_eos": 1}, r"SamplingParams\.ignore_eos"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop_token_ids, p.ignore_eos, p.seed) == \
        (1, 1.0, 1.0, 0, 16, None, False, None)
    assert not (p.greedy or p.uses_top_k or p.uses_top_p)
    q = SamplingParams(n=8, temperature=0, top_k=-1, top_p=0.9, stop_token_ids=(3, 4), seed=-7)
    assert q.top_k == 0 and q.stop_token_ids == [3, 4] and isinstance(q.temperature, float)
    assert q.greedy and not q.uses_top_p  # greedy rows need no sort
    r = SamplingParams(top_k=5, top_p=0.5)
    assert r.uses_top_k and r.uses_top_p


# ------------------------------------------------------------------------------------------------ outputs
def test_outputs():
    c = CompletionOutput(index=0, token_ids=[5, 6, 2], logprobs=[-0.5, -1.25, -0.25], finish_reason="stop")
    assert c.cumulative_logprob == -2.0 and c.text is None
    assert CompletionOutput(1, [], [], "length").cumulative_logprob == 0.0
    r = RequestOutput(request_id="a", prompt_token_ids=[1, 2], outputs=[c])
    assert r.finished and r.outputs[0].index == 0
    with pytest.raises(ValueError, match="finish_reason"):
        CompletionOutput(0, [1], [0.0], "eos")
    with pytest.raises(ValueError, match="logprobs must have one entry per token"):
        CompletionOutput(0, [1, 2], [0.0], "stop")


def test_sample_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits must be"):
        sample(torch.zeros(4), torch.ones(4), None, None, torch.zeros(4, dtype=torch.long),
               torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="top_p must have shape"):
        sample(torch.zeros(2, 4), torch.ones(2), None, torch.ones(3), torch.zeros(2, dtype=torch.long),
               torch.zeros(2, dtype=torch.long))


def _fused_backends():
    """The fused samplers to test: Triton (interpreted on the CPU) and the compiled CPU kernel."""
    out = ["triton"] if HAS_TRITON else []
    if _extension.enabled() and not torch.cuda.is_available():
        out.append("cpp")
    return out


@pytest.mark.parametrize("fused", _fused_backends())
@pytest.mark.parametrize("V", [1, 8, 37, 5000])  # 5000: three Triton tiles, the last one partial; 8: one AVX2 vector
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_kernel_draws_what_the_eager_sampler_draws(device, monkeypatch, fused, V, dtype):
    # kernels.race_sample (one pass per row) against the eager spec: the same tokens (the noise is bit-identical),
    # log-probs to float32 rounding; greedy rows, a ladder of temperatures, logits strided inside a bigger tensor
    if fused == "cpp" and not _extension.has_op("race_sample"):
        pytest.fail(f"compiled extension lacks race_sample: {_extension.extension_error()}")
    if fused == "triton" and dtype == torch.float16 and V == 5000:
        pytest.skip("float16 adds nothing for the interpreted Triton kernel; keeps the suite short")
    S = 9
    g = torch.Generator().manual_seed(V)
    big = (torch.randn(S, V + 3, generator=g) * 3).to(dtype).to(device)
    logits = big[:, 1:V + 1]
    temperature = torch.tensor([0.0, 0.3, 0.7, 1.0, 1.0, 1.3, 2.0, 0.0, 1.0], device=device)
    seeds = torch.randint(0, 2**62, (S,), generator=g).to(device)
    positions = torch.randint(0, 10_000, (S,), generator=g).to(device)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "torch")
    tok_ref, lp_ref = sample(logits, temperature, None, None, seeds, positions)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", fused)
    tok, lp = sample(logits, temperature, None, None, seeds, positions)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    assert tok.tolist() == tok_ref.tolist()
    assert_close(lp, lp_ref, torch.float32, "logprobs", scale=10)
