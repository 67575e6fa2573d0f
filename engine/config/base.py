"""The base of every config section (``Section``, a pydantic model), the field types shared by the sections, and
``ConfigError``: the one error a bad config raises, pydantic's ``ValidationError`` rendered as one line that names
the dotted key, what it must be and what was given (``grpo.clip_ratio_low must be >= 0, got -0.1``)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A bad config value or key. ``key`` is the dotted path of the field (``"grpo.clip_ratio_low"``), relative to
    the config being built; ``str(err)`` is the message for the user.

    With ``valid`` given, the error is an unknown key and the message lists the valid keys of its section."""

    def __init__(self, key: str, problem: str = "", valid: Sequence[str] | None = None):
        self.key, self.problem, self.valid = key, problem, None if valid is None else list(valid)
        super().__init__(self._render())

    def _render(self) -> str:
        if self.valid is None:
            return f"{self.key} {self.problem}"
        parent, _, leaf = self.key.rpartition(".")
        where = f"of '{parent}'" if parent else "at the top level"
        close = difflib.get_close_matches(leaf, self.valid, n=1)
        hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
        return f"unknown config key '{self.key}'{hint}; valid keys {where}: {', '.join(self.valid)}"

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` prepended to its key."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.problem, self.valid)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


Int = Annotated[int, BeforeValidator(_integral)]
"""An int field; it takes an integral float too (YAML reads ``1e3`` as a float)."""
Text = Annotated[str, AfterValidator(_nonempty)]
"""A string field that must hold more than whitespace."""

# pydantic's error type -> what the value must be (filled from the error's ctx); the *_type errors show the type given
_MUST = {
    "int_type": "be of type int", "float_type": "be of type float", "bool_type": "be of type bool (true/false)",
    "string_type": "be of type str", "list_type": "be a list", "tuple_type": "be a list", "dict_type": "be a mapping",
    "model_type": "be a mapping (section {class_name})", "greater_than": "be > {gt}",
    "greater_than_equal": "be >= {ge}", "less_than": "be < {lt}", "less_than_equal": "be <= {le}",
    "finite_number": "be a finite number", "literal_error": "be {expected}", "missing": "be given",
    "string_pattern_mismatch": "match '{pattern}'", "too_short": "have at least {min_length} element(s)",
    "too_long": "have at most {max_length} elements",
}


def _dotted(loc: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def config_error(err: ValidationError, cls: type[BaseModel]) -> ConfigError:
    """pydantic's first error (an unknown key before any other) as a ``ConfigError`` naming the dotted key."""
    errors = err.errors(include_url=False)
    e = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc, kind, ctx, value = e["loc"], e["type"], e.get("ctx") or {}, e["input"]
    if kind == "extra_forbidden":
        section = cls
        for part in loc[:-1]:
            section = section.model_fields[str(part)].annotation
        return ConfigError(_dotted(loc), valid=list(section.model_fields))
    cause = ctx.get("error")
    if isinstance(cause, ConfigError):  # a section's cross-field rule names its own field
        return cause.under(_dotted(loc))
    if cause is not None:
        problem = str(cause)
    elif kind in _MUST:
        problem = "must " + _MUST[kind].format(**{k: f"{v:g}" if isinstance(v, float) else v for k, v in ctx.items()})
    else:
        problem = f"is invalid ({e['msg']})"
    got = f"{value!r} ({type(value).__name__})" if kind.endswith("_type") else repr(value)
    return ConfigError(_dotted(loc), f"{problem}, got {got}")


class Section(BaseModel):
    """Base of the config sections and run configs: unknown keys are refused, types checked strictly (an int is not a
    bool, a number not a string; an int is a float), values validated on construction and on assignment, and a bad
    value raises ``ConfigError``. Each field's docstring is its documentation (and its pydantic description)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True,
                              use_attribute_docstrings=True, ser_json_inf_nan="constants")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise config_error(err, type(self)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise config_error(err, type(self)) from None
