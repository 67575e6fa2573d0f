"""AdamW and the learning-rate schedule (linear warmup, then constant / linear / cosine decay to ``min_lr_ratio``).

Low-precision parameters (bf16/fp16, the default on CUDA, so that the generator reads the trainer's weights in the
dtype it decodes in) get float32 master weights: ``MasterWeightAdamW`` steps float32 copies and writes the rounded
result back. Plain AdamW on bf16 parameters loses every update smaller than half a bf16 ulp of the weight (2**-9
relative): at RL learning rates (1e-6) that is nearly all of them, and the moments themselves would be bf16.
"""

from __future__ import annotations

import math

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on float32 master copies of low-precision model parameters (mixed-precision training as in Micikevicius
    et al. 2018 / DeepSpeed's bf16 optimizer). The model keeps its bf16/fp16 parameters (the generator and the forward
    read them in place); ``step()`` moves their gradients into the float32 masters, runs AdamW there (float32
    moments), and copies the result back, rounded to the parameters' dtype. ``zero_grad`` clears the model's
    gradients too. ``state_dict()`` carries the masters (``"master_weights"``), so a resumed run continues from the
    same float32 values, not from the rounded parameters.

    Build it with the model's parameter groups, as ``torch.optim.AdamW``; float32 parameters in them are stepped
    directly (their master is the parameter itself)."""

    def __init__(self, groups: list[dict], **kwargs):
        self._model_params: list[torch.nn.Parameter] = []
        master_groups = []
        for group in groups:
            masters = []
            for p in group["params"]:
                self._model_params.append(p)
                masters.append(p if p.dtype == torch.float32 else
                               torch.nn.Parameter(p.detach().float().clone(), requires_grad=True))
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)
        self._masters = [m for g in self.param_groups for m in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self._model_params, self._masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        loss = super().step(closure)
        for p, m in zip(self._model_params, self._masters):
            if m is not p:
                p.copy_(m)  # rounded to the parameter's dtype
                m.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for p in self._model_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["master_weights"] = [m.detach().clone() for m in self._masters]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, m, saved in zip(self._model_params, self._masters, masters or [None] * len(self._masters),
                                   strict=True):
                if saved is None:  # a checkpoint without masters: start them from the loaded parameters
                    saved = p.detach()
                m.copy_(saved)
                if m is not p:
                    p.copy_(m)


class NonFiniteWeightsError(RuntimeError):
    """An optimizer step left non-finite parameters although the loss and the gradient norm were finite, and the
    overflow was not foreseen (``update_would_overflow``): the weights are poisoned, the run stops, and no checkpoint
    is written from them."""


def nonfinite_tensors(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors of ``named`` that hold a NaN or an infinity. One fused max-abs reduction
    per dtype group (``torch._foreach_norm(..., inf)``, which propagates NaN) and one host synchronisation. A sharded
    (FSDP) parameter is checked on this rank's shard."""
    local = [(n, t.to_local() if hasattr(t, "to_local") else t) for n, t in named]  # DTensor -> this rank's shard
    floats = [(n, t.detach()) for n, t in local if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    norms = torch.stack([x.float() for x in torch._foreach_norm([t for _, t in floats], float("inf"))])
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    return [floats[i][0] for i in bad]


def _master_targets(optimizer: MasterWeightAdamW):
    """``(group, float32 master, the model parameter's gradient, the parameter's dtype)`` for every parameter with a
    gradient."""
    masters = dict(zip(map(id, optimizer._masters), optimizer._model_params))
    for group in optimizer.param_groups:
        for m in group["params"]:
            p = masters[id(m)]
            if p.grad is not None:
                yield group, m, p.grad, p.dtype


@torch.no_grad()
def update_would_overflow(optimizer: torch.optim.Optimizer) -> list[int]:
    """Positions, among the parameters that have a gradient (in parameter order), of the float16 parameters that the
    next ``optimizer.step()`` would push past float16's range (or to NaN), computed out of place before the step, so
    that a skipped step leaves the weights and the optimizer state exactly as they were. One host synchronisation.

    float16 is the only dtype whose range a finite AdamW update can leave (bf16 has float32's exponent range). The
    update is torch's AdamW (Loshchilov & Hutter 2019) without amsgrad: decay ``p(1 - lr*wd)``, moments ``m, v``,
    bias corrections ``1 - beta^t``, computed in float32: exactly ``MasterWeightAdamW``'s float32 masters, checked
    against the float16 they are rounded to. A plain ``torch.optim.AdamW`` over float16 parameters computes its
    moments in float16, where they underflow (``make_optimizer`` refuses that combination); it and any other
    optimizer get no prediction here, and ``clip_and_step``'s check after the step is the safety net."""
    if not isinstance(optimizer, MasterWeightAdamW):
        return []
    flags = []
    for group, p, grad, dtype in _master_targets(optimizer):
        if dtype != torch.float16 or group.get("amsgrad") or group.get("maximize"):
            flags.append(None)
            continue
        state = optimizer.state.get(p, {})
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(state["step"]) + 1 if "step" in state else 1.0
        g = grad.float()
        m = g * (1 - beta1) + (state["exp_avg"].float() * beta1 if "exp_avg" in state else 0.0)
        v = g * g * (1 - beta2) + (state["exp_avg_sq"].float() * beta2 if "exp_avg_sq" in state else 0.0)
        denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
        new = p.float() * (1 - lr * wd) - (lr / (1 - beta1 ** t)) * m / denom
        flags.append(~(new.abs() <= torch.finfo(dtype).max).all())  # NaN compares False: caught too
    checked = [(i, f) for i, f in enumerate(flags) if f is not None]
    if not checked:
        return []
    verdict = torch.stack([f for _, f in checked]).tolist()  # the one read-back
    return [i for (i, _), overflow in zip(checked, verdict) if overflow]


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with ``cfg`` (an ``OptimConfig``): lr, betas, eps,
    weight_decay (not applied to biases and norm weights, as usual for transformers). When a trainable parameter is
    bf16/fp16 and ``cfg.master_weights`` is on (the default), a ``MasterWeightAdamW`` with float32 master weights.
    Raises ``ValueError`` for float16 parameters with ``cfg.master_weights`` off (float16 moments underflow)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in decay + no_decay)
    if low_precision and getattr(cfg, "master_weights", True):
        return MasterWeightAdamW(groups, **kwargs)
    if any(p.dtype == torch.float16 for p in decay + no_decay):
        raise ValueError("optim.master_weights=false with float16 parameters (model.dtype=float16): AdamW would keep "
                         "its moments in float16, where the squared gradients underflow to 0 and the update divides "
                         "by zero; keep optim.master_weights=true, or train bfloat16 / float32 weights")
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): warmup ``(step+1)/warmup``, then the decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule must be constant, linear or cosine, got {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying ``lr_factor`` with ``cfg`` (an ``OptimConfig``) over ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                                       schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio))


def sync_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each param group's lr to what ``scheduler`` gives at its current step. After a resume the optimizer
    holds the lr saved by the old run, whose schedule may have had another length (a run extended from 2 to 4 steps
    would otherwise take its third step at the old schedule's final lr)."""
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)
