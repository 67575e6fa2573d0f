"""The DPO algorithm (engine/algorithms/dpo.py): loss and policy gradient against a float64 implementation of the
formulas written here, precomputed reference log-probs, and a few DPO steps that raise the reward accuracy."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from engine.algorithms.batching import make_pair_batch
from engine.algorithms.dpo import dpo_step_loss, evaluate_dpo, reference_logprobs, sequence_logprobs
from engine.data.preferences import TokenizedPair
from engine.models import tiny_model

PAD = 0
VOCAB = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def Pair(prompt_ids, chosen_ids, rejected_ids):
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, pair=None)


def make_lm(seed: int = 0):
    return tiny_model("llama", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, seed=seed)


def random_pairs(n: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)

    def tokens(lo, hi):
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return [Pair(tokens(1, 4), tokens(1, 6), tokens(1, 6)) for _ in range(n)]


def pair_batch(pairs: list[Pair]):
    return make_pair_batch([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs],
                           [p.rejected_ids for p in pairs], PAD, "cpu")


def logp_f64(model64, prompt: list[int], response: list[int], average: bool) -> torch.Tensor:
    """log p(response | prompt) in float64 from the full logits of one unpadded sequence."""
    logits = model64(input_ids=torch.tensor([prompt + response])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    token_logps = logp[positions, torch.tensor(response)]
    return token_logps.mean() if average else token_logps.sum()


def dpo_loss_f64(pc, pr, rc, rr, beta, loss_type, eps):
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)).square().mean()
    u = beta * h
    if loss_type == "sigmoid":
        return (-(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)).mean()
    return ((-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)).mean()  # robust


@pytest.mark.parametrize("loss_type,eps,average", [("sigmoid", 0.0, False), ("sigmoid", 0.2, False),
                                                   ("robust", 0.1, False), ("ipo", 0.0, True)])
def test_dpo_step_loss_and_gradient_match_float64(loss_type, eps, average):
    beta = 0.1
    policy = make_lm(seed=0)
    pairs = random_pairs(5, seed=1)
    ref_c, ref_r = reference_logprobs(make_lm(seed=1), pairs, pad_id=PAD, device="cpu", average=average)
    policy64 = copy.deepcopy(policy).double()

    loss, metrics = dpo_step_loss(policy, pair_batch(pairs), ref_c, ref_r, beta=beta, loss_type=loss_type,
                                  label_smoothing=eps, average=average)
    loss.backward()

    pc = torch.stack([logp_f64(policy64, p.prompt_ids, p.chosen_ids, average) for p in pairs])
    pr = torch.stack([logp_f64(policy64, p.prompt_ids, p.rejected_ids, average) for p in pairs])
    rc, rr = ref_c.double(), ref_r.double()
    expected = dpo_loss_f64(pc, pr, rc, rr, beta, loss_type, eps)
    expected.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        cr, rj = beta * (pc - rc), beta * (pr - rr)
        want = {"rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(), "rewards/accuracies": (cr > rj).double()
                .mean(), "rewards/margins": (cr - rj).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    assert set(metrics) == set(want)
    for name, value in want.items():
        assert not metrics[name].requires_grad
        torch.testing.assert_close(metrics[name].double(), value, rtol=1e-4, atol=1e-5, msg=name)

    named64 = dict(policy64.named_parameters())
    norm32 = norm64 = 0.0
    for name, p in policy.named_parameters():
        g64 = named64[name].grad
        assert p.grad is not None and g64 is not None, name
        torch.testing.assert_close(p.grad.double(), g64, rtol=1e-3, atol=1e-5, msg=name)
        norm32 += float(p.grad.double().square().sum())
        norm64 += float(g64.square().sum())
    assert norm64 > 0
    assert abs(norm32 ** 0.5 - norm64 ** 0.5) <= 1e-3 * norm64 ** 0.5


def test_dpo_step_loss_errors():
    policy = make_lm()
    batch = pair_batch(random_pairs(3, seed=2))
    ref = torch.zeros(3)
    with pytest.raises(ValueError, match="2B > 0 rows"):
        dpo_step_loss(policy, batch.rows(slice(0, 5)), ref, ref, beta=0.1, loss_type="sigmoid")
    with pytest.raises(ValueError, match=r"ref_rejected_logps must have shape \(3,\)"):
        dpo_step_loss(policy, batch, ref, torch.zeros(4), beta=0.1, loss_type="sigmoid")
    with pytest.raises(ValueError, match="loss_type"):
        dpo_step_loss(policy, batch, ref, ref, beta=0.1, loss_type="hinge-ish")


def test_reference_logprobs_match_sequence_logprobs_per_pair():
    model = make_lm(seed=3).train()
    pairs = random_pairs(5, seed=4)
    ref_c, ref_r = reference_logprobs(model, pairs, pad_id=PAD, device="cpu", batch_size=2)
    avg_c, avg_r = reference_logprobs(model, pairs, pad_id=PAD, device="cpu", batch_size=3, average=True)
    assert model.training  # the mode is restored
    assert ref_c.shape == ref_r.shape == (5,) and ref_c.dtype == torch.float32 and ref_c.device.type == "cpu"
    model.eval()
    for i, p in enumerate(pairs):
        with torch.no_grad():
            one = sequence_logprobs(model, pair_batch([p]))
        torch.testing.assert_close(ref_c[i], one[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref_r[i], one[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(avg_c[i], ref_c[i] / len(p.chosen_ids), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(avg_r[i], ref_r[i] / len(p.rejected_ids), rtol=1e-5, atol=1e-6)
    assert bool((ref_c < 0).all() and (ref_r < 0).all())
    empty = reference_logprobs(model, [], pad_id=PAD, device="cpu")
    assert empty[0].shape == empty[1].shape == (0,)


@pytest.mark.parametrize("loss_type,eps,average", [("sigmoid", 0.1, False), ("ipo", 0.0, True)])
def test_evaluate_dpo_matches_float64(loss_type, eps, average):
    policy, ref = make_lm(seed=5).train(), make_lm(seed=6)
    pairs = random_pairs(7, seed=8)
    ref_c, ref_r = reference_logprobs(ref, pairs, pad_id=PAD, device="cpu", average=average)
    got = evaluate_dpo(policy, pairs, ref_c, ref_r, pad_id=PAD, device="cpu", beta=0.3, loss_type=loss_type,
                       label_smoothing=eps, average=average, batch_size=3)
    assert policy.training  # the mode is restored
    p64, r64 = copy.deepcopy(policy).double().eval(), copy.deepcopy(ref).double().eval()
    with torch.no_grad():
        pc, pr, rc, rr = (torch.stack([logp_f64(m, p.prompt_ids, getattr(p, side), average) for p in pairs])
                          for m, side in ((p64, "chosen_ids"), (p64, "rejected_ids"), (r64, "chosen_ids"),
                                          (r64, "rejected_ids")))
    margins = (pc - rc) - (pr - rr)
    assert got["eval/loss"] == pytest.approx(float(dpo_loss_f64(pc, pr, rc, rr, 0.3, loss_type, eps)), rel=1e-4)
    assert got["eval/rewards/accuracies"] == pytest.approx(float((margins > 0).double().mean()))
    assert got["eval/rewards/margins"] == pytest.approx(float(0.3 * margins.mean()), rel=1e-4, abs=1e-6)
    assert got["eval/rewards/accuracies_ci_low"] <= got["eval/rewards/accuracies"] <= got[
        "eval/rewards/accuracies_ci_high"]
    assert got["eval/num_pairs"] == 7
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(7,\)"):
        evaluate_dpo(policy, pairs, ref_c[:3], ref_r, pad_id=PAD, device="cpu", beta=0.3, loss_type=loss_type)


def test_a_few_dpo_steps_raise_the_reward_accuracy():
    torch.manual_seed(0)
    policy = make_lm(seed=5).train()
    pairs = random_pairs(8, seed=6)
    ref_c, ref_r = reference_logprobs(copy.deepcopy(policy), pairs, pad_id=PAD, device="cpu")
    batch = pair_batch(pairs)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    history = []
    for _ in range(8):
        loss, metrics = dpo_step_loss(policy, batch, ref_c, ref_r, beta=0.1, loss_type="sigmoid")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append((loss.item(), metrics["rewards/accuracies"].item(), metrics["rewards/margins"].item()))
    assert history[0][0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: -log sigmoid(0)
    assert history[0][1] == 0.0  # ties are not counted as correct
    with torch.no_grad():
        _, final = dpo_step_loss(policy, batch, ref_c, ref_r, beta=0.1, loss_type="sigmoid")
    assert final["rewards/accuracies"].item() >= 0.875, history
    assert final["rewards/margins"].item() > 0.1, history
