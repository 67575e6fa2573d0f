"""``fuse_projections``: one GEMM for q/k/v and one for gate/up over concatenated weight copies must sample what the
separate projections sample (Llama, Qwen2 with q/k/v biases, Qwen3), on the eager rows path and the static-buffer
path, and must follow the trainer's weights: an in-place update (an optimizer step) refreshes the copies, in place,
before the next forward; nothing is copied when nothing changed."""

from __future__ import annotations

import pytest
import torch

from engine.generation import Generator, SamplingParams
from engine.generation.model_runner import LlamaFamilyModel
from engine.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5], [20, 21, 22, 23, 24]]


def small(arch):
    return tiny_model(arch, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64)


def samples(gen):
    outs = gen.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=4))
    return [(c.token_ids, c.logprobs) for o in outs for c in o.outputs]


def assert_same(a, b):
    for (ta, la), (tb, lb) in zip(a, b):
        assert ta == tb
        assert la == pytest.approx(lb, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("enforce_eager", [None, False], ids=["rows", "static"])
def test_fused_projections_sample_what_separate_ones_sample(arch, enforce_eager):
    model = small(arch)
    plain = samples(Generator(model, attention_backend="torch", enforce_eager=enforce_eager))
    fused = Generator(model, attention_backend="torch", enforce_eager=enforce_eager, fuse_projections=True)
    assert_same(samples(fused), plain)


def test_the_copies_follow_in_place_weight_updates():
    model = small("qwen2")
    fused = Generator(model, attention_backend="torch", fuse_projections=True)
    before = samples(fused)
    lm = fused.model
    addresses = [t.data_ptr() for layer in lm._fused for w, b in layer.values() for t in (w, b) if t is not None]
    assert not lm.sync_fused_weights()  # nothing changed since the last forward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.tensor([PROMPTS[0]])).logits.sum().backward()
    optimizer.step()  # in place, as the trainer's optimizers update
    after = samples(fused)
    assert_same(after, samples(Generator(model, attention_backend="torch")))  # the new weights, not the copies'
    assert after != before
    assert addresses == [t.data_ptr() for layer in lm._fused for w, b in layer.values() for t in (w, b)
                         if t is not None]  # refreshed in place: a captured CUDA graph still reads them


def test_without_fusion_nothing_is_copied():
    lm = LlamaFamilyModel(small("llama"))
    assert not lm.sync_fused_weights() and lm._fused == []
