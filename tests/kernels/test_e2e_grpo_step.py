"""End-to-end: a few GRPO updates of a tiny policy built only from our kernels (fused LM head -> log-probs, group
advantages, fused GRPO loss with k3 KL), once with the PyTorch reference and once with the Triton kernels. The two
runs must agree step by step (loss, metrics) and in their final parameters, and the surrogate loss must go down."""

import pytest
import torch

from kernels._backend import HAS_TRITON
from kernels.advantages import group_advantages
from kernels.fused_linear_logprobs import fused_linear_logprobs
from kernels.ppo_loss import grpo_loss
from tests._numerics import assert_close

B, G, T, H, V = 8, 4, 6, 16, 40  # 2 prompts x 4 samples, 6 response tokens


def rollout(seed=0):
    """A fixed batch: response tokens, a right-padded mask and a scripted reward (how often token 7 appears)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[::3, :3] = 7
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    scores = ((tokens == 7) & mask).float().sum(1) / lengths
    return tokens, mask, scores


def train(backend, monkeypatch, device, steps=5):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", backend)
    torch.manual_seed(0)
    embed = torch.nn.Embedding(V, H).to(device)
    head = torch.nn.Linear(H, V, bias=False).to(device)
    opt = torch.optim.AdamW([*embed.parameters(), *head.parameters()], lr=0.05)
    tokens, mask, scores = (t.to(device) for t in rollout())
    # the "context" of token t is the token before it (a bigram policy), the first sees token 0
    context = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), tokens[:, :-1]], dim=1)
    labels = tokens.masked_fill(~mask, -100)

    def logprobs():
        hidden = embed(context).reshape(B * T, H)
        return fused_linear_logprobs(hidden, head.weight, labels.reshape(-1), chunk_size=16).reshape(B, T)

    with torch.no_grad():
        old = logprobs()
    ref = old.clone()
    adv = group_advantages(scores, G)
    history = []
    for _ in range(steps):
        loss, metrics = grpo_loss(logprobs(), old, adv, mask, ref_logprobs=ref, kl_coef=0.04,
                                  clip_ratio_high=0.28)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.detach(), {k: v.clone() for k, v in metrics.items()}))
    return history, [p.detach().clone() for p in (*embed.parameters(), *head.parameters())]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_grpo_steps_agree_across_backends_and_decrease_the_loss(monkeypatch, device):
    hist_torch, params_torch = train("torch", monkeypatch, device)
    hist_triton, params_triton = train("triton", monkeypatch, device)
    for step, ((l_a, m_a), (l_b, m_b)) in enumerate(zip(hist_torch, hist_triton)):
        assert_close(l_b, l_a, torch.float32, f"loss at step {step}", scale=10)
        for name in m_a:
            assert_close(m_b[name], m_a[name], torch.float32, f"{name} at step {step}", scale=10)
    for i, (a, b) in enumerate(zip(params_torch, params_triton)):
        # five AdamW steps amplify float32 summation-order differences of the gradients a little
        assert_close(b, a, torch.float32, f"parameter {i}", scale=50)
    assert hist_torch[-1][0] < hist_torch[0][0]
    assert hist_torch[-1][1]["kl"] > 0  # the policy moved away from the reference
