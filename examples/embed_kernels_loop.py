"""Our kernels as the loss of a hand-written GRPO loop on a Hugging Face causal LM, in plain PyTorch.

    python examples/embed_kernels_loop.py                              # tiny random Qwen2 on the CPU, a few seconds
    python examples/embed_kernels_loop.py --model /path/to/Qwen2.5-0.5B-Instruct --steps 5 --lr 1e-6

One step reads as its phases: rollout (``G`` completions per prompt; the engine's ``Generator`` on the model's own
weights) -> a rule reward -> group advantages (``kernels.group_advantages``) -> per-token log-probs from the decoder's
hidden states through the fused LM head (``kernels.fused_linear_logprobs``: the ``[N, V]`` logits never exist) ->
``kernels.grpo_loss`` over micro-batches, each normalised by the whole batch's token and sequence counts, so the summed
gradient is the full-batch one -> AdamW. The task is a toy (random prompts; reward: the share of even token ids in a
completion); the point is the loss. An on-policy GRPO loss is about 0 (a group's advantages
average 0; the ratio is 1), its gradient is not: watch the reward (0.5 -> 1.0 in 20 steps by default). Letters: ``B`` rows (prompts x G), ``T`` response tokens, ``L`` prompt + response,
``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import kernels as K
from engine import CompletionOutput, Generator, SamplingParams
from engine.algorithms import TokenBatch, make_batch


def build_model(path: str | None = None, seed: int = 0):
    """A checkpoint (float32), or a tiny random Qwen2 (vocab 128, hidden 64, 2 layers) built with transformers."""
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def reward(completion: CompletionOutput) -> float:
    """The toy verifier: the share of even token ids in the completion (its stop token not counted; 0 if empty)."""
    tokens = completion.token_ids[:-1] if completion.finish_reason == "stop" else completion.token_ids
    return sum(t % 2 == 0 for t in tokens) / len(tokens) if tokens else 0.0


def token_logprobs(model, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """``[B, T]`` float32 log-probs of the response tokens (0 where padded), differentiable in the parameters.

    The decoder body (``model.model``) gives ``[B, L, H]`` hidden states; the state before each response token is
    gathered (``batch.response_index``) and the LM head is applied chunk by chunk inside the kernel, at the sampling
    temperature (it must be the one the completions were drawn at). ``labels`` are -100 where padded."""
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    B, T = batch.labels.shape
    picked = hidden.gather(1, batch.response_index[..., None].expand(B, T, hidden.shape[-1]))  # [B, T, H]
    head = model.get_output_embeddings()
    logprobs = K.fused_linear_logprobs(picked.reshape(B * T, -1), head.weight.to(picked.dtype),
                                       batch.labels.reshape(-1), bias=head.bias, temperature=temperature)
    return logprobs.reshape(B, T)


def grpo_backward(model, batch: TokenBatch, advantages: torch.Tensor, *, micro_batch_size: int,
                  temperature: float, clip_ratio: float = 0.2) -> float:
    """Accumulate the gradient of the batch's GRPO loss into ``.grad``, ``micro_batch_size`` rows at a time; returns
    the loss. ``advantages``: ``[B]`` float32, one per completion.

    Every micro-batch's loss is divided by the whole batch's counts (``global_num_tokens``: response tokens;
    ``global_num_seqs``: rows with at least one), so the micro-batch losses and gradients sum to the full batch's,
    whatever the split. One update per rollout: the old policy is this one (ratio 1, TRL's ``num_iterations=1``);
    for several updates, compute ``old_logprobs`` once under ``torch.no_grad()`` before the first."""
    mask = batch.response_mask
    denominators = {"global_num_tokens": max(int(mask.sum()), 1), "global_num_seqs": max(int(mask.any(-1).sum()), 1)}
    total = 0.0
    for start in range(0, mask.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        mb = batch.rows(rows)
        logprobs = token_logprobs(model, mb, temperature)
        loss, _metrics = K.grpo_loss(logprobs, logprobs.detach(), advantages[rows], mb.response_mask,
                                     clip_ratio_low=clip_ratio, clip_ratio_high=clip_ratio,
                                     kl_coef=0.0,  # no reference model; pass ref_logprobs and a kl_coef for k3 KL
                                     **denominators)
        loss.backward()
        total += loss.item()
    return total


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a local HF checkpoint (Llama / Qwen2 / Qwen3 / Mistral); default: tiny random")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per forward/backward")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 for the tiny model, torch's otherwise)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the loop; returns ``{"model", "losses", "rewards", "grad_norms"}`` (one entry per step). The thread count
    is restored on return (a tiny model runs on one: more only add OpenMP overhead, 10x and worse on a busy CPU)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (threads if args.model else 1))
    try:
        return train(args)
    finally:
        torch.set_num_threads(threads)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(args.model, args.seed).to(device)  # before the Generator: it reads the parameters there
    generator = Generator(model, kv_cache_memory=16 << 20)  # reads the parameters in place: no copy, no sync
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    params = SamplingParams(n=args.num_generations, temperature=args.temperature, max_tokens=args.max_tokens)
    vocab = model.config.vocab_size
    history: dict[str, list[float]] = {"losses": [], "rewards": [], "grad_norms": []}
    for step in range(args.steps):
        start = time.perf_counter()
        prompts = [torch.randint(2, vocab, (int(n),)).tolist() for n in torch.randint(3, 9, (args.prompts,))]
        model.eval()
        outputs = generator.generate(prompts, params)  # rows g*G .. g*G+G-1 are prompt g's group
        rows = [(out.prompt_token_ids, c) for out in outputs for c in out.outputs]
        rewards = torch.tensor([reward(c) for _, c in rows])
        advantages = K.group_advantages(rewards, args.num_generations).to(device)
        batch = make_batch([p for p, _ in rows], [c.token_ids for _, c in rows], pad_id=0, device=device)
        model.train()
        loss = grpo_backward(model, batch, advantages, micro_batch_size=args.micro_batch_size,
                             temperature=args.temperature)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step:3d}  loss {loss:+.4f}  reward {rewards.mean():.3f}  grad_norm {grad_norm:.3f}  "
              f"tokens {batch.num_tokens}  {time.perf_counter() - start:.2f} s")
        for key, value in (("losses", loss), ("rewards", float(rewards.mean())), ("grad_norms", grad_norm)):
            history[key].append(value)
    return {"model": model, **history}


if __name__ == "__main__":
    main()
