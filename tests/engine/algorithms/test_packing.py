"""engine.algorithms.packing: the token-budget planner (budget, coverage, oversize rows, balance, determinism, the
lockstep split of torchrun), the packed layout, attention isolation (packed log-probs, entropies, values and gradients
equal the padded ones, through transformers' own packed-sequence masks and through the explicit block mask), and
policy, critic, SFT and PPO steps that are the same with and without packing (CPU, tiny models)."""

import copy
import dataclasses
import math
import types

import pytest
import torch

from engine.algorithms import packing
from engine.algorithms.accumulation import accumulated_step, micro_slices
from engine.algorithms.batching import make_batch, response_logprobs
from engine.algorithms.critic import critic_update, critic_values
from engine.algorithms.packing import (
    PackedBatch,
    micro_batch,
    pack,
    plan_micro_batches,
    split_groups,
    token_groups,
)
from engine.algorithms.policy import policy_update
from engine.algorithms.ppo import ppo_epochs
from engine.algorithms.sft import sft_loss
from engine.models import tiny_model
from engine.models.value_model import value_model_from_causal_lm
from tests._numerics import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"vocab_size": 48, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 64}
# (prompt, response) lengths: a 1-token prompt with a long response, a long prompt with a 1-token response, an empty
# response (a fully masked row), and rows of 2 to 16 tokens
SPEC = [(1, 14), (11, 1), (3, 0), (2, 5), (7, 9), (1, 1), (5, 3)]
LENGTHS = [p + r for p, r in SPEC]  # 15, 12, 3, 7, 16, 2, 8


def _batch(spec=SPEC, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, TINY["vocab_size"], (p,), generator=g).tolist() for p, _ in spec]
    responses = [torch.randint(1, TINY["vocab_size"], (r,), generator=g).tolist() for _, r in spec]
    return make_batch(prompts, responses, pad_id=0, device="cpu")


def _check_groups(groups, lengths, budget):
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths))), "every row exactly once"
    for g in groups:
        tokens = sum(lengths[i] for i in g)
        assert tokens <= budget or len(g) == 1, (g, tokens, budget)


# ------------------------------------------------------------------------------------------------------------ planner
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [1, 40, 700, 2048, 10**6])
def test_token_groups_respect_the_budget_and_cover_every_row(seed, budget):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 900, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
    groups = token_groups(lengths, budget)
    _check_groups(groups, lengths, budget)
    oversize = [i for i, n in enumerate(lengths) if n > budget]
    assert all([i] in groups for i in oversize), "a row over the budget goes alone"
    fitting = [n for n in lengths if n <= budget]
    ffd = packing._ffd(packing._longest_first(range(len(fitting)), fitting), fitting, budget) if fitting else []
    lower = math.ceil(sum(fitting) / budget) if fitting else 0
    assert lower <= len(groups) - len(oversize) <= len(ffd)
    assert token_groups(lengths, budget) == groups, "deterministic"


def test_token_groups_use_as_few_as_first_fit_decreasing():
    # LPT cannot fit 3 groups of 15 here (9+4+3 > 15), first-fit decreasing can: its packing is taken
    lengths = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    groups = token_groups(lengths, 15)
    _check_groups(groups, lengths, 15)
    assert [sum(lengths[i] for i in g) for g in groups] == [15, 15, 15]


def test_token_groups_are_balanced():
    # GSM8K-like rows (prompt + response, 150..640 tokens): LPT's groups are within one row of each other, where
    # first-fit decreasing fills the first groups and leaves the last one light
    lengths = torch.randint(150, 641, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    groups = token_groups(lengths, 4096)
    _check_groups(groups, lengths, 4096)
    loads = [sum(lengths[i] for i in g) for g in groups]
    assert len(groups) == math.ceil(sum(lengths) / 4096)
    assert max(loads) - min(loads) <= max(lengths), loads
    ffd = packing._ffd(packing._longest_first(range(32), lengths), lengths, 4096)
    ffd_loads = [sum(lengths[i] for i in g) for g in ffd]
    assert max(loads) - min(loads) < max(ffd_loads) - min(ffd_loads)
    assert loads == sorted(loads, reverse=True) and all(g == sorted(g) for g in groups)


def test_token_groups_errors_and_edges():
    assert token_groups([], 10) == []
    assert token_groups([5], 1) == [[0]]
    with pytest.raises(ValueError, match="budget"):
        token_groups([1, 2], 0)
    with pytest.raises(ValueError, match=">= 0"):
        token_groups([1, -2], 8)


def test_split_groups_reaches_the_count_within_the_budget():
    lengths = [5, 5, 4, 3, 3, 1]
    groups = split_groups(token_groups(lengths, 100), lengths, 4)
    assert len(groups) == 4
    _check_groups(groups, lengths, 100)
    assert max(sum(lengths[i] for i in g) for g in groups) <= 7
    with pytest.raises(ValueError, match="at least as many rows"):
        split_groups([[0], [1, 2]], [1, 1, 1], 4)


def test_plan_without_a_budget_is_micro_slices():
    batch = _batch()
    assert plan_micro_batches(batch, 3) == list(micro_slices(7, 3))
    assert plan_micro_batches(batch, 3, None) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert micro_batch(batch, slice(0, 3)).input_ids.shape == (3, 16)


def test_plan_with_a_budget_and_a_larger_rank(monkeypatch):
    batch = _batch()
    plan = plan_micro_batches(batch, 3, 20)
    assert all(isinstance(rows, torch.Tensor) and rows.dtype == torch.long for rows in plan)
    _check_groups([rows.tolist() for rows in plan], LENGTHS, 20)
    # under torchrun a rank whose groups are fewer than another rank's splits its own (same number of forwards)
    monkeypatch.setattr(packing, "all_reduce_max", lambda values: {k: v + 2 for k, v in values.items()})
    more = plan_micro_batches(batch, 3, 20)
    assert len(more) == len(plan) + 2
    _check_groups([rows.tolist() for rows in more], LENGTHS, 20)


# ----------------------------------------------------------------------------------------------------- packed layout
def test_pack_lays_the_real_tokens_end_to_end():
    batch = _batch()
    packed = pack(batch)
    N = sum(LENGTHS)
    assert packed.input_ids.shape == packed.position_ids.shape == (1, N)
    assert packed.labels.shape == packed.response_mask.shape == packed.response_index.shape == batch.labels.shape
    assert packed.input_ids[0].tolist() == [t for row, n in zip(batch.input_ids.tolist(), LENGTHS) for t in row[:n]]
    assert packed.position_ids[0].tolist() == [p for n in LENGTHS for p in range(n)]
    m = batch.response_mask
    # the hidden state at response_index predicts the label: the token right after it in the flat row
    assert torch.equal(packed.input_ids[0][packed.response_index[m] + 1], batch.labels[m])
    assert torch.equal(packed.response_index[~m], torch.zeros_like(packed.response_index[~m]))
    assert packed.num_tokens == batch.num_tokens == sum(r for _, r in SPEC)


# ------------------------------------------------------------------------------------------- attention isolation
def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# (attention implementation, how packed sequences are isolated): one causal SDPA per sequence (the default for
# sdpa), transformers' own block-diagonal mask from the restarted position ids, the explicit 4D mask
PATHS = [("sdpa", "segments"), ("sdpa", "transformers"), ("eager", "transformers"), ("sdpa", "explicit"),
         ("eager", "explicit")]


def _use_path(monkeypatch, model, attn, path):
    model.set_attn_implementation(attn)
    monkeypatch.setattr(packing, "SEGMENT_ATTENTION", path == "segments")
    monkeypatch.setattr(packing, "EXPLICIT_MASK", path == "explicit")


@pytest.mark.parametrize("arch, tied", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("attn, path", PATHS)
def test_packed_logprobs_equal_padded(monkeypatch, arch, tied, attn, path):
    """Per sequence, the packed forward is the padded one (float32): attention does not cross sequences, on every
    path (log-probs, entropies, and the gradients of every parameter)."""
    model = tiny_model(arch, seed=0, tie_word_embeddings=tied, **TINY).train()
    _use_path(monkeypatch, model, attn, path)
    batch = _batch()
    padded = response_logprobs(model, batch, temperature=0.7, return_entropy=True)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append(q.shape[2]) or sdpa(q, *a, **kw))
    packed = response_logprobs(model, pack(batch), temperature=0.7, return_entropy=True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    layers = TINY["num_layers"]
    if path == "segments":  # one SDPA per sequence and layer, each on its own tokens
        assert calls == LENGTHS * layers
    elif attn == "sdpa":  # one SDPA per layer on the whole row
        assert calls == [sum(LENGTHS)] * layers
    for name, want, got in zip(("logprobs", "entropy"), padded, packed):
        assert got.shape == want.shape == batch.labels.shape
        assert_close(got, want, torch.float32, name)
    assert bool((packed[0][~batch.response_mask] == 0).all())

    w = torch.randn(batch.labels.shape, generator=torch.Generator().manual_seed(1))
    want = _grads(model, lambda: (response_logprobs(model, batch) * w).sum())
    got = _grads(model, lambda: (response_logprobs(model, pack(batch)) * w).sum())
    assert want.keys() == got.keys()
    for name in want:
        assert_close(got[name], want[name], torch.float32, name)


def test_segment_attention_under_activation_checkpointing(monkeypatch):
    """The sequence bounds reach the attention again when checkpointing recomputes a layer in the backward."""
    model = tiny_model("llama", seed=0, **TINY).train()
    _use_path(monkeypatch, model, "sdpa", "segments")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch()
    w = torch.randn(batch.labels.shape, generator=torch.Generator().manual_seed(1))
    want = _grads(model, lambda: (response_logprobs(model, batch) * w).sum())
    got = _grads(model, lambda: (response_logprobs(model, pack(batch)) * w).sum())
    for name in want:
        assert_close(got[name], want[name], torch.float32, name)


def test_positions_that_do_not_restart_leak_attention():
    """The control: the same flat row read as ONE sequence (positions 0..N-1) gives other log-probs, so the equality
    above does test the isolation. A packed batch without its host bounds finds them in its positions."""
    model = tiny_model("llama", seed=0, **TINY)
    batch = _batch()
    packed = pack(batch)
    one = PackedBatch(packed.input_ids, torch.arange(packed.input_ids.shape[1])[None], packed.response_index,
                      packed.labels, packed.response_mask)
    with torch.no_grad():
        want = response_logprobs(model, batch)
        assert (response_logprobs(model, one) - want).abs().max() > 1e-3
        assert_close(response_logprobs(model, dataclasses.replace(packed, seq_bounds=None)), want, torch.float32)


def test_packed_values_equal_padded():
    critic = value_model_from_causal_lm(tiny_model("qwen2", seed=0, **TINY), seed=0)
    batch = _batch()
    want, got = critic_values(critic, batch), critic_values(critic, pack(batch))
    assert got.shape == want.shape == batch.labels.shape
    assert_close(got, want, torch.float32, "values")


# --------------------------------------------------------------------------------------------- steps, packed or not
def _rollout(seed=0):
    policy = tiny_model("llama", seed=seed, **TINY).train()
    batch = _batch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp = response_logprobs(policy, batch)
    mask = batch.response_mask
    old = torch.where(mask, lp + 0.3 * torch.randn(lp.shape, generator=g), 0.0)  # off-policy: the clip is active
    ref = torch.where(mask, lp + 0.2 * torch.randn(lp.shape, generator=g), 0.0)
    return policy, batch, old, ref, torch.randn(len(SPEC), generator=g)


def _cfg(**overrides):
    return types.SimpleNamespace(**{
        "micro_batch_size": 3, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean",
        "kl_coef": 0.1, "kl_estimator": "k3", "rollout_is": None, "rollout_is_cap": 2.0, "entropy_coef": 0.01,
        "max_tokens_per_micro_batch": None, **overrides})


def _assert_same_step(got, want):
    (got_metrics, got_params), (want_metrics, want_params) = got, want
    assert got_metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        assert got_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for name, p in want_params.items():
        assert_close(got_params[name], p, torch.float32, name)


def _sgd_step(model, step):
    """``step(model, optimizer)`` on a copy with SGD(lr=1): the parameter change is minus the gradient."""
    model = copy.deepcopy(model)
    result = step(model, torch.optim.SGD(model.parameters(), lr=1.0))
    assert result.stepped
    return result.metrics, {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_policy_update_packed_equals_padded(loss_agg_mode):
    policy, batch, old, ref, adv = _rollout()

    def run(**cfg):
        return _sgd_step(policy, lambda model, opt: policy_update(
            model, opt, batch, old, adv, ref_logprobs=ref, temperature=1.0, max_grad_norm=1e9,
            cfg=_cfg(loss_agg_mode=loss_agg_mode, **cfg)))

    want = run()
    for budget in (10, 24, 1000):  # rows of 12, 15, 16 tokens alone; a mix; everything in one pass
        _assert_same_step(run(max_tokens_per_micro_batch=budget), want)


def test_critic_update_packed_equals_padded():
    critic = value_model_from_causal_lm(tiny_model("llama", seed=0, **TINY), seed=0).train()
    batch = _batch()
    g = torch.Generator().manual_seed(2)
    old_values, returns = (torch.randn(batch.labels.shape, generator=g) * batch.response_mask for _ in range(2))

    def run(budget):
        return _sgd_step(critic, lambda model, opt: critic_update(
            model, opt, batch, old_values, returns, cliprange_value=0.2, loss_agg_mode="token-mean",
            micro_batch_size=2, max_grad_norm=1e9, max_tokens_per_micro_batch=budget))

    want = run(None)
    for budget in (10, 24):
        _assert_same_step(run(budget), want)


def test_sft_step_packed_equals_padded():
    model = tiny_model("qwen2", seed=0, tie_word_embeddings=True, **TINY).train()
    batch = _batch()

    def run(budget):  # the SFT trainer's step
        return _sgd_step(model, lambda m, opt: accumulated_step(
            m, opt, plan_micro_batches(batch, 2, budget),
            lambda rows: (sft_loss(m, micro_batch(batch, rows, budget), num_tokens=batch.num_tokens), {}),
            max_grad_norm=1e9))

    want = run(None)
    for budget in (10, 24):
        _assert_same_step(run(budget), want)


def test_ppo_epochs_pass_the_budget_to_both_steps():
    policy, batch, old, ref, _ = _rollout()
    critic = value_model_from_causal_lm(policy, seed=0).train()
    g = torch.Generator().manual_seed(3)
    adv, values = (torch.randn(batch.labels.shape, generator=g) * batch.response_mask for _ in range(2))

    def run(budget):
        p, c = copy.deepcopy(policy), copy.deepcopy(critic)
        metrics = ppo_epochs(p, torch.optim.SGD(p.parameters(), lr=1.0), c, torch.optim.SGD(c.parameters(), lr=1.0),
                             batch, old_logprobs=old, advantages=adv, old_values=values, returns=values + adv,
                             ref_logprobs=ref,
                             cfg=_cfg(mini_batch_size=4, ppo_epochs=1, cliprange_value=0.2,
                                      max_tokens_per_micro_batch=budget),
                             temperature=1.0, max_grad_norm=1e9, generator=torch.Generator().manual_seed(4))
        return metrics, {**{f"p.{k}": v.detach() for k, v in p.named_parameters()},
                         **{f"c.{k}": v.detach() for k, v in c.named_parameters()}}

    _assert_same_step(run(12), run(None))


# ------------------------------------------------------------------------------------------------------- torchrun
def _rank_step(rank, *, budget, rows_of_rank):
    from engine.distributed.fsdp import shard_model

    policy, batch, old, ref, adv = _rollout()
    rows = torch.tensor(rows_of_rank[rank])
    model = shard_model(policy)
    result = policy_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch.rows(rows), old[rows],
                           adv[rows], ref_logprobs=ref[rows], temperature=1.0, max_grad_norm=1e9,
                           cfg=_cfg(max_tokens_per_micro_batch=budget))
    params = {k: p.detach().full_tensor().clone() for k, p in model.named_parameters()}
    return (result.metrics, params) if rank == 0 else None


def test_policy_update_on_two_ranks_with_different_group_counts(tmp_path):
    """Rank 0's short rows fit one pass, rank 1's long rows need three: rank 0 splits its group so that both run
    three forwards and backwards (FSDP's collectives), and the step is the one-process step on all the rows."""
    from tests.engine.distributed.ranks import run_ranks

    rows_of_rank = [[2, 3, 5, 6], [0, 1, 4]]  # 3 + 7 + 2 + 8 = 20 tokens; 15, 12, 16
    policy, batch, old, ref, adv = _rollout()
    order = torch.tensor(rows_of_rank[0] + rows_of_rank[1])  # the rows of the global batch, in rank order
    want = _sgd_step(policy, lambda model, opt: policy_update(
        model, opt, batch.rows(order), old[order], adv[order], ref_logprobs=ref[order], temperature=1.0,
        max_grad_norm=1e9, cfg=_cfg()))
    got = run_ranks(_rank_step, tmp_path, budget=20, rows_of_rank=rows_of_rank)[0]
    _assert_same_step(got, want)
