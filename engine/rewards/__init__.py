"""Rule-based rewards with TRL's reward-function signature, a registry, and the weighted combination.

A reward function is ``fn(prompts, completions, **columns) -> list[float | None]``: ``prompts`` and ``completions``
are lists of ``B`` strings (or of chat-message lists, TRL's conversational format), each dataset column arrives as a
keyword argument holding a list of ``B`` values (``answer=[...]``), and ``None`` means "no reward for this row from
this function" (for example a math checker shown a code prompt). Functions should accept ``**kwargs`` so that new
columns do not break them. ``async def`` functions are run to completion.

``load_reward("accuracy")`` returns a built-in; ``load_reward("my_pkg.rewards:length_penalty")`` (or the dotted
``my_pkg.rewards.length_penalty``, as TRL accepts) imports a user's function.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from math import isnan  # (not "import math": the submodule engine.rewards.math takes that name here)
from typing import Any

from engine.rewards.format import answer_tag_reward, format_reward
from engine.rewards.length import overlong_penalty
from engine.rewards.math import accuracy_reward, answers_match, extract_answer, normalize_number
from engine.rewards.text import completion_text

RewardFn = Callable[..., Sequence[float | None]]

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "answer_tag": answer_tag_reward,
}

__all__ = [
    "REWARDS", "RewardFn", "accuracy_reward", "answer_tag_reward", "answers_match", "completion_text",
    "compute_rewards", "extract_answer", "format_reward", "load_reward", "normalize_number", "overlong_penalty",
    "reward_name", "score_records",
]


def load_reward(spec: str | RewardFn) -> RewardFn:
    """The reward function named by ``spec``.

    Args:
        spec: a registry name (``REWARDS``: ``"accuracy"``, ``"format"``, ``"answer_tag"``), ``"pkg.module:attr"``
            (``attr`` may be dotted: ``"pkg.module:Class.method"``), ``"pkg.module.function"``, or a callable
            (returned as is). Importing a module runs its code: a config naming one is code, trust it as such
            (TRL's ``trust_remote_code`` warning applies).

    Raises:
        ValueError: an empty spec, or a bare name that is neither registered nor a dotted path (the message lists the
            registry).
        ModuleNotFoundError: the module does not exist (an import error *inside* the module propagates unchanged,
            so a missing dependency of the user's module is reported as such).
        AttributeError: the module has no such attribute.
        TypeError: the attribute is not callable.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward spec must be a registry name or 'module:function', got {spec!r}")
    spec = spec.strip()
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
    elif "." in spec:
        module_name, _, attr_path = spec.rpartition(".")
    else:
        raise ValueError(f"unknown reward {spec!r}: not one of the built-ins {sorted(REWARDS)} and not an import "
                         "path such as 'my_pkg.rewards:my_reward'")
    if not module_name or not attr_path:
        raise ValueError(f"reward spec {spec!r} must have the form 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name != err.name and not module_name.startswith(err.name + "."):
            raise  # the module exists but one of its own imports is missing
        raise ModuleNotFoundError(f"reward {spec!r}: cannot import module {module_name!r} ({err}); is it on "
                                  "PYTHONPATH / installed?", name=module_name) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a callable")
    return obj


def reward_name(fn: RewardFn) -> str:
    """The name a reward function's metrics are logged under (``rewards/<name>/mean``): its ``__name__`` (that of
    the wrapped function for a ``functools.partial``), else its class name."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def _call(fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any],
          columns: Mapping[str, Sequence[Any]]) -> Any:
    out = fn(prompts=prompts, completions=completions, **columns)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    return out


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _as_reward(value: Any, name: str, i: int) -> float | None:
    if value is None:
        return None
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"reward function {name!r} returned {value!r} (a {type(value).__name__}) for row {i}; "
                        "expected a float or None") from None
    return None if isnan(r) else r


def compute_rewards(fns: Sequence[RewardFn | str], weights: Sequence[float] | None, prompts: Sequence[Any],
                    completions: Sequence[Any], columns: Mapping[str, Sequence[Any]] | None = None,
                    ) -> tuple[list[float], dict[str, list[float | None]]]:
    """Run every reward function on a batch and combine them: ``total[i] = sum_j weights[j] * r_j[i]``.

    Args:
        fns: ``(F,)`` reward functions, or specs for ``load_reward``.
        weights: ``(F,)`` weights, or ``None`` for all 1.0.
        prompts: ``(B,)`` prompts, one per completion (a group's prompt repeated ``G`` times).
        completions: ``(B,)`` completions.
        columns: dataset columns, each a list of ``B`` values, passed as keyword arguments.

    Returns:
        totals: ``(B,)`` floats. ``None`` (and NaN) rewards are skipped in the sum, as TRL's ``nansum`` does: a row
            for which *every* function returned ``None`` gets 0.0 and still counts in means and group statistics
            (a warning is issued; return 0.0 yourself if that is what you mean).
        per_fn: ``{name: (B,) list of float | None}`` per function, ``None`` kept, in the order of ``fns``; named by
            ``reward_name`` (a repeated name gets a suffix ``_2``, ``_3``, ...).

    Raises ``ValueError`` when ``weights``/``fns``, ``prompts``/``completions`` or a column/``completions`` differ in
    length, or when a function returns a different number of rewards than completions (naming the function and both
    counts); ``TypeError`` when a function returns something that is not a list of floats/``None``.
    """
    columns = dict(columns or {})
    fns = [load_reward(fn) for fn in fns]
    weights = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
    if len(weights) != len(fns):
        raise ValueError(f"{len(fns)} reward functions but {len(weights)} weights")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts but {n} completions (repeat each prompt once per completion)")
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values but there are {n} completions")
    per_fn: dict[str, list[float | None]] = {}
    totals = [0.0] * n
    seen = [False] * n
    for fn, weight in zip(fns, weights):
        name = base = reward_name(fn)
        suffix = 2
        while name in per_fn:
            name, suffix = f"{base}_{suffix}", suffix + 1
        out = _call(fn, prompts, completions, columns)
        try:
            out = list(out.tolist() if hasattr(out, "tolist") else out)
        except TypeError:
            raise TypeError(f"reward function {name!r} returned a {type(out).__name__}; expected a list of "
                            f"{n} floats") from None
        if len(out) != n:
            raise ValueError(f"reward function {name!r} returned {len(out)} rewards for {n} completions")
        rewards = [_as_reward(r, name, i) for i, r in enumerate(out)]
        per_fn[name] = rewards
        for i, r in enumerate(rewards):
            if r is not None:
                totals[i] += weight * r
                seen[i] = True
    if fns and not all(seen):
        missing = [i for i, s in enumerate(seen) if not s]
        warnings.warn(f"every reward function returned None for rows {missing[:8]}{'...' if len(missing) > 8 else ''}"
                      "; their total reward is 0.0", RuntimeWarning, stacklevel=2)
    return totals, per_fn


def score_records(fns: Sequence[RewardFn | str], weights: Sequence[float] | None, records: Sequence[Mapping[str, Any]],
                  completions: Sequence[Any]) -> tuple[list[float], dict[str, list[float | None]]]:
    """``compute_rewards`` for completions of dataset records (one record per completion, a group's record repeated):
    the prompts are the records' ``prompt`` and every other column is passed to the functions by name (TRL's
    convention: ``answer``, ``solution``, ...). Returns ``(totals, per_fn)`` as ``compute_rewards``, with its errors;
    ``ValueError`` when ``records`` is empty."""
    if not records:
        raise ValueError("score_records needs at least one record")
    columns = {key: [r.get(key) for r in records] for key in records[0] if key != "prompt"}
    return compute_rewards(fns, weights, [r["prompt"] for r in records], completions, columns)
