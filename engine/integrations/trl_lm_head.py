"""Our ``kernels.fused_linear_logprobs`` as the fused LM head of TRL's ``GRPOTrainer``: the per-token log-probs and
entropies its loss uses, from the last hidden states and the head, without the ``[N, V]`` logits.

    from engine.integrations.trl import make_rollout_func, use_fused_logprobs

    trainer = GRPOTrainer(..., rollout_func=make_rollout_func())   # our Generator for the rollouts (optional)
    use_fused_logprobs(trainer)                                    # our kernel for the log-probs, before train()
    trainer.train()

**The seam.** ``GRPOTrainer.__init__`` gives its model (and its reference model, when ``beta > 0``) TRL's fused LM
head, ``trl.trainer.utils.add_fused_lm_head``: an instance-level ``forward`` whose contract TRL documents. Called as
``model(..., labels=labels, fused_lm_head=True)`` it runs the backbone, then the head on the positions whose
next-token label is not -100, and returns a ``FusedCausalLMOutput``: ``log_probs`` and ``entropy`` ``[B, L - 1]``
(``[B, L]`` with ``shift_labels``), zero where the label is -100, ``loss`` (the mean NLL, or its sum over
``num_items_in_batch``) and ``label_mask``. Every log-prob of TRL's GRPO loss (policy, old, reference) comes through
that call (``GRPOTrainer._get_per_token_logps_and_entropies``). ``use_fused_logprobs`` replaces that ``forward`` with
one that keeps the contract and runs ``kernels.fused_linear_logprobs`` (Triton on CUDA, the C++/PyTorch path on the
CPU; log-probs and entropy of ``softmax(z / temperature)``, float32, gradients into the hidden states, the head's
weight and bias). Any other call (generation, evaluation, ``fused_lm_head=False``) goes to the forward it replaces,
unchanged. TRL's source is not patched; its loss (``_compute_loss``: clipping, ``loss_type``, masks, metrics) is
TRL's own.

**Numerics.** The same math as TRL's head: log-probs agree to float32 rounding (the test: <= 1e-5 on the values,
gradients to float32 tolerance). Under autocast (``bf16=True`` on a GPU) the head's operands are cast to the autocast
dtype, as TRL's matmul under autocast is, and accumulated in float32; with ``cast_lm_head_to_fp32`` both are float32.

**Refused** (``ValueError`` at the call, naming each): a head that is not an ``nn.Linear`` (a LoRA-wrapped head: merge
it first); logit soft-capping or scaling in the config (Gemma 2, Cohere, Granite, ...: TRL's head applies them, ours
does not); MoE router logits (``output_router_logits``); FSDP / DeepSpeed (a sharded head); a model without TRL's
fused head installed (not a TRL >= 1.16 ``GRPOTrainer``).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch
from torch import nn
from trl.trainer.utils import FusedCausalLMOutput

from kernels import fused_linear_logprobs

if TYPE_CHECKING:
    from trl import GRPOTrainer

__all__ = ["use_fused_logprobs"]

_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _check_model(model: nn.Module, name: str) -> list[str]:
    problems = []
    if "forward" not in vars(model):
        problems.append(f"{name} has no fused LM head installed (TRL's GRPOTrainer installs one on its model and "
                        "reference model: call use_fused_logprobs(trainer) on a constructed trl.GRPOTrainer)")
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        problems.append(f"{name}'s output embedding is a {type(head).__name__}, not an nn.Linear (merge LoRA "
                        "adapters of the head first)")
    config = model.config.get_text_config()
    scales = {key: getattr(config, key) for key in _SCALES if getattr(config, key, None) not in (None, 1, 1.0)}
    if scales:
        problems.append(f"{name}'s config scales or caps its logits ({scales}): TRL's head applies that, ours not")
    if getattr(config, "output_router_logits", False):
        problems.append(f"{name} returns MoE router logits (output_router_logits): the load-balancing loss is TRL's")
    return problems


def use_fused_logprobs(trainer: GRPOTrainer) -> None:
    """Make ``trainer`` (a constructed TRL ``GRPOTrainer``) compute its per-token log-probs and entropies with
    ``kernels.fused_linear_logprobs``, on its model and its reference model (when it has one); idempotent. Call it
    before ``trainer.train()``. Raises ``ValueError`` listing every setting it cannot honour (module docstring)
    before changing anything."""
    args = trainer.args
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    targets = [(model, "model", ("log_probs", "entropy"))]
    if getattr(trainer, "ref_model", None) is not None:
        targets.append((trainer.ref_model, "ref_model", ("log_probs",)))
    problems = [p for target, name, _ in targets for p in _check_model(target, name)]
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        problems.append("FSDP / DeepSpeed (the head's weight is sharded)")
    if problems:
        raise ValueError("use_fused_logprobs cannot honour: " + "; ".join(problems))
    for target, _, outputs in targets:
        if not getattr(target.forward, "_rlhf_engine_fused_head", False):
            _install(target, trainer.temperature, args.cast_lm_head_to_fp32, "entropy" in outputs)


def _install(model: nn.Module, temperature: float, cast_to_fp32: bool, with_entropy: bool) -> None:
    previous = model.forward  # TRL's fused forward: its unfused path is the model's own forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            return previous(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                            **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        device = hidden.device.type
        if cast_to_fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(device):  # as TRL's matmul under autocast: operands in the autocast dtype
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = weight.dtype
        with torch.autocast(device, enabled=False):  # the kernel accumulates in float32 itself
            out = fused_linear_logprobs(hidden[mask].to(dtype), weight.to(dtype), labels[mask],
                                        bias=None if bias is None else bias.to(dtype), temperature=temperature,
                                        return_entropy=with_entropy)
        lp, ent = out if with_entropy else (out, None)
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero), as TRL's
        log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        entropy = None if ent is None else ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   label_mask=mask)

    forward._rlhf_engine_fused_head = True
    model.forward = types.MethodType(forward, model)
