"""FSDP2 on one GPU (a world of 1, NCCL): the sharding path of ``engine.distributed`` with bf16 mixed precision
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``) against the same model unsharded under bf16
autocast: log-probs through the fused LM head in the root's forward, their gradients, and the tokens the generator
samples from the gathered weights. Multi-GPU collectives need a multi-GPU machine; this checks the rest on CUDA.

    python bench/fsdp_check.py --out fsdp.json            # --device cpu runs it with gloo (a logic check)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.distributed as dist

from engine.algorithms.batching import make_batch, response_logprobs
from engine.algorithms.accumulation import mixed_precision
from engine.distributed import shard_model, unsharded
from engine.generation import Generator, SamplingParams
from engine.models import tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
    device = torch.device(args.device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    low = torch.bfloat16 if device.type == "cuda" else None
    model = tiny_model("qwen2", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                       intermediate_size=512, seed=0).to(device)
    ref = copy.deepcopy(model)
    shard_model(model, param_dtype=low)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 4096, (n,), generator=g).tolist() for n in (17, 40, 9, 33)]
    responses = [torch.randint(1, 4096, (n,), generator=g).tolist() for n in (25, 7, 31, 16)]
    batch = make_batch(prompts, responses, 0, device)
    lp = response_logprobs(model, batch)
    (lp * batch.response_mask).sum().backward()
    with mixed_precision(device.type, low):
        lp_ref = response_logprobs(ref, batch)
    (lp_ref * batch.response_mask).sum().backward()
    m = batch.response_mask
    grads = {n: p.grad.full_tensor().float() for n, p in model.named_parameters()}
    grad_rel = max(float((grads[n] - p.grad.float()).norm() / p.grad.float().norm().clamp_min(1e-12))
                   for n, p in ref.named_parameters())
    params = [SamplingParams(temperature=1.0, max_tokens=32, seed=7 + i) for i in range(4)]
    model.eval()
    t0 = time.perf_counter()
    with unsharded(model):
        ours = Generator(model, enforce_eager=True, attention_backend=None).generate(prompts, params)
    t_gen = time.perf_counter() - t0
    ref_model = copy.deepcopy(ref).to(low or torch.float32).eval()
    theirs = Generator(ref_model, enforce_eager=True, attention_backend=None).generate(prompts, params)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(ours, theirs))
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "shapes": "qwen2 h256 l4 v4096, 4 rows of prompt 9-40 + response 7-31",
        "logprob_max_abs_diff": float((lp - lp_ref).detach().abs().masked_select(m).max()),
        "grad_max_relative_norm_diff": grad_rel,
        "rollout_sequences_identical": f"{same}/4", "rollout_seconds_gathered": t_gen,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
