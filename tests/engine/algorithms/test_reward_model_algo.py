"""The pair batch layout and the reward-model algorithm (engine/algorithms/reward_model.py): the Bradley-Terry loss
against a float64 hand computation, gradients into the head and the body, held-out metrics, and a tiny reward model
learning a separable synthetic preference."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from engine.algorithms.batching import make_pair_batch
from engine.algorithms.reward_model import pairwise_metrics, reward_model_loss, score_pairs
from engine.data.preferences import TokenizedPair
from engine.models import tiny_model
from engine.models.value_model import value_model_from_causal_lm

PAD = 0
TOKEN_GOOD, TOKEN_BAD = 5, 6  # the synthetic preference: chosen responses hold token 5, rejected ones token 6
VOCAB = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def Pair(prompt_ids, chosen_ids, rejected_ids):
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, pair=None)


def make_rm(seed: int = 0):
    lm = tiny_model("llama", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=64, seed=seed)
    return value_model_from_causal_lm(lm, seed=seed)


def random_pairs(n: int, seed: int) -> list[Pair]:
    """Pairs whose chosen response contains TOKEN_GOOD and rejected one TOKEN_BAD, among random filler tokens."""
    rng = random.Random(seed)
    filler = list(range(7, VOCAB))

    def response(marker: int) -> list[int]:
        body = [rng.choice(filler) for _ in range(rng.randint(1, 5))]
        body.insert(rng.randint(0, len(body)), marker)
        return body

    return [Pair([rng.choice(filler) for _ in range(rng.randint(1, 4))], response(TOKEN_GOOD), response(TOKEN_BAD))
            for _ in range(n)]


def pair_batch(pairs: list[Pair]):
    return make_pair_batch([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs],
                           [p.rejected_ids for p in pairs], PAD, "cpu")


def test_make_pair_batch_layout_and_errors():
    prompts, chosen, rejected = [[1, 2], [3]], [[4, 5, 6], [7]], [[8], [9, 10, 11, 12]]
    batch = make_pair_batch(prompts, chosen, rejected, PAD, "cpu")
    assert batch.input_ids.shape == (4, 5) and batch.labels.shape == (4, 4)
    rows = [prompts[0] + chosen[0], prompts[1] + chosen[1], prompts[0] + rejected[0], prompts[1] + rejected[1]]
    responses = chosen + rejected
    for b, row in enumerate(rows):
        assert batch.input_ids[b].tolist() == row + [PAD] * (5 - len(row)), b
        assert batch.attention_mask[b].tolist() == [1] * len(row) + [0] * (5 - len(row)), b
        assert int(batch.attention_mask[b].sum()) - 1 == len(row) - 1  # the row's last token
        assert batch.input_ids[b, len(row) - 1].item() == row[-1]
        n = len(responses[b])
        assert batch.response_mask[b].tolist() == [True] * n + [False] * (4 - n), b
        assert batch.labels[b, :n].tolist() == responses[b]
        # the hidden state that predicts response token t sits one position before it
        assert batch.response_index[b, :n].tolist() == list(range(len(row) - n - 1, len(row) - 1))
    with pytest.raises(ValueError, match="pair up"):
        make_pair_batch(prompts, chosen, rejected[:1], PAD, "cpu")
    with pytest.raises(ValueError, match="pair up"):
        make_pair_batch(prompts[:1], chosen, rejected, PAD, "cpu")
    with pytest.raises(ValueError, match="at least one pair"):
        make_pair_batch([], [], [], PAD, "cpu")


def hand_scores_f64(model, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores in float64, one unpadded sequence at a time: the head at the last token of prompt + response."""
    m64 = copy.deepcopy(model).double()
    head = m64.score

    def score(ids):
        hidden = m64.base_model(input_ids=torch.tensor([ids])).last_hidden_state
        return head(hidden[0, -1]).squeeze()

    chosen = torch.stack([score(p.prompt_ids + p.chosen_ids) for p in pairs])
    rejected = torch.stack([score(p.prompt_ids + p.rejected_ids) for p in pairs])
    return chosen, rejected


@pytest.mark.parametrize("margin,center", [(None, None), (0.5, None), ("tensor", 0.01)])
def test_reward_model_loss_matches_float64_hand_computation(margin, center):
    model = make_rm()
    pairs = random_pairs(5, seed=1)
    if margin == "tensor":
        margin = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.25])
    loss, metrics = reward_model_loss(model, pair_batch(pairs), margin=margin, center_rewards_coefficient=center)
    rc, rr = hand_scores_f64(model, pairs)
    m = 0.0 if margin is None else (margin.double() if isinstance(margin, torch.Tensor) else margin)
    expected = -F.logsigmoid(rc - rr - m).mean()
    if center is not None:
        expected = expected + center * (rc + rr).square().mean()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["accuracy"].double(), (rc > rr).double().mean())
    torch.testing.assert_close(metrics["margin"].double(), (rc - rr).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["rewards/chosen"].double(), rc.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["rewards/rejected"].double(), rr.mean(), rtol=1e-5, atol=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_reward_model_loss_gradients_reach_head_and_body_and_odd_rows_fail():
    model = make_rm()
    batch = pair_batch(random_pairs(4, seed=2))
    loss, _ = reward_model_loss(model, batch)
    loss.backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    body = model.base_model
    for name, p in [("embed", body.embed_tokens.weight), ("mlp", body.layers[0].mlp.down_proj.weight),
                    ("attn", body.layers[0].self_attn.q_proj.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="2B > 0 rows"):
        reward_model_loss(model, batch.rows(slice(0, 3)))


def test_score_pairs_matches_the_loss_scores_and_restores_mode():
    model = make_rm().train()
    pairs = random_pairs(5, seed=3)
    chosen, rejected = score_pairs(model, pairs, pad_id=PAD, device="cpu", batch_size=2)
    assert model.training
    assert chosen.shape == rejected.shape == (5,) and chosen.dtype == torch.float32 and chosen.device.type == "cpu"
    rc, rr = hand_scores_f64(model, pairs)
    torch.testing.assert_close(chosen.double(), rc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rejected.double(), rr, rtol=1e-5, atol=1e-6)
    model.eval()
    score_pairs(model, pairs[:1], pad_id=PAD, device="cpu")
    assert not model.training
    empty = score_pairs(model, [], pad_id=PAD, device="cpu")
    assert empty[0].shape == empty[1].shape == (0,)


def test_pairwise_metrics_on_hand_made_scores():
    chosen = torch.tensor([1.0, 2.0, 0.0, 3.0])
    rejected = torch.tensor([0.0, 2.0, 1.0, 1.0])  # win, tie, loss, win -> 2.5 / 4
    m = pairwise_metrics(chosen, rejected)
    assert m["eval/accuracy"] == pytest.approx(0.625)
    assert m["eval/margin"] == pytest.approx(0.5)
    diffs = torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    assert m["eval/loss"] == pytest.approx(float(-F.logsigmoid(diffs).mean()))
    assert m["eval/num_pairs"] == 4
    assert 0.0 <= m["eval/accuracy_ci_low"] < m["eval/accuracy"] < m["eval/accuracy_ci_high"] <= 1.0
    # 8 wins out of 10: the 95% Wilson interval is [0.4902, 0.9433] (Wilson 1927; e.g. Brown, Cai & DasGupta 2001)
    m = pairwise_metrics(torch.arange(10.0), torch.tensor([-1.0] * 8 + [100.0] * 2))
    assert m["eval/accuracy"] == pytest.approx(0.8)
    assert m["eval/accuracy_ci_low"] == pytest.approx(0.4902, abs=1e-4)
    assert m["eval/accuracy_ci_high"] == pytest.approx(0.9433, abs=1e-4)
    perfect = pairwise_metrics(torch.ones(3), torch.zeros(3))
    assert perfect["eval/accuracy"] == 1.0 and perfect["eval/accuracy_ci_high"] == pytest.approx(1.0)
    assert 0.0 < perfect["eval/accuracy_ci_low"] < 1.0
    ties = pairwise_metrics(torch.zeros(6), torch.zeros(6))
    assert ties["eval/accuracy"] == 0.5 and ties["eval/loss"] == pytest.approx(0.6931471805599453)
    with pytest.raises(ValueError, match="at least one pair"):
        pairwise_metrics(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match=r"\[P\]"):
        pairwise_metrics(torch.zeros(3), torch.zeros(4))


def test_rm_loss_decreases_and_accuracy_beats_chance_on_separable_preferences():
    torch.manual_seed(0)
    model = make_rm(seed=0).train()
    train, held_out = random_pairs(64, seed=10), random_pairs(64, seed=11)
    batch = pair_batch(train)
    before = pairwise_metrics(*score_pairs(model, held_out, pad_id=PAD, device="cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, metrics = reward_model_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    assert metrics["accuracy"].item() == 1.0
    after = pairwise_metrics(*score_pairs(model, held_out, pad_id=PAD, device="cpu"))
    assert after["eval/accuracy"] >= 0.9, (before, after)
    assert after["eval/accuracy_ci_low"] > 0.5
    assert after["eval/loss"] < before["eval/loss"] / 3, (before, after)
