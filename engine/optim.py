"""AdamW and the learning-rate schedule (linear warmup, then constant / linear / cosine decay to ``min_lr_ratio``)."""

from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with ``cfg`` (an ``OptimConfig``): lr, betas, eps,
    weight_decay (not applied to biases and norm weights, as usual for transformers)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


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
