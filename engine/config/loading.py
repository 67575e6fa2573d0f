"""Reading and writing configs: a YAML/JSON file plus dotted command-line overrides into a config model
(``load_config``), and the resolved config back to a file (``save_config``) or plain dicts (``to_dict``)."""

from __future__ import annotations

import json
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ValidationError

from engine.config.base import ConfigError, config_error

M = TypeVar("M", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading ``1e-5`` as a float (YAML 1.1 wants a dot: ``1.0e-5``)."""


class _Dumper(yaml.SafeDumper):
    """The matching dumper: it quotes strings such as ``'1e5'`` so that they read back as strings."""


_SCI_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _SCI_FLOAT, list("-+0123456789"))


def parse_value(text: str) -> Any:
    """A command-line value as YAML: ``1e-5`` -> 1e-05, ``true`` -> True, ``[a, b]`` -> ['a', 'b'], ``null`` ->
    None, anything else that is not YAML syntax -> the string itself."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:  # a value like "a: b: c" is just a string
        return text


def _read_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} {'is not a file' if p.exists() else 'does not exist'}")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.load(text, Loader=_Loader)  # noqa: S506
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - bad file content, like a parse error
            f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and typing.get_origin(tp) is None and issubclass(tp, BaseModel)


def _field_type(cls: type[BaseModel], parts: list[str], key: str) -> Any:
    """The annotation of the field that the dotted ``parts`` address in ``cls`` (``Any`` inside a dict field)."""
    tp: Any = cls
    for i, part in enumerate(parts):
        if _is_section(tp):
            if part not in tp.model_fields:
                raise ConfigError(".".join(parts[: i + 1]), valid=list(tp.model_fields))
            tp = tp.model_fields[part].annotation
        elif tp is dict or typing.get_origin(tp) is dict:
            return Any
        else:
            name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            raise ConfigError(".".join(parts[:i]), f"is a value of type {name}, not a section: cannot set '{key}'")
    return tp


def _takes_text(tp: Any) -> bool:
    """Whether a field of annotation ``tp`` holds a string (a command-line value for it is kept as typed)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType, typing.Annotated):
        return any(_takes_text(arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return all(isinstance(arg, str) for arg in typing.get_args(tp))
    return tp is str


def apply_overrides(cls: type[BaseModel], data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` of ``overrides`` in the raw mapping ``data`` (in place; returned), with the value
    parsed by ``parse_value``. Keys are checked against ``cls`` (unknown -> ``ConfigError`` listing the valid
    ones); a value for a string field is kept as typed (``model.path=001`` stays ``"001"``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ValueError(f"override {item!r} must have the form 'section.field=value'")
        parts = key.split(".")
        tp, value = _field_type(cls, parts, key), parse_value(text)
        if value is not None and not isinstance(value, str) and _takes_text(tp):
            value = text.strip()
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"must be a mapping to set '{key}', got {child!r} "
                                                            f"({type(child).__name__})")
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[M], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> M:
    """Build the config model ``cls`` from a YAML/JSON file (``.json`` is read as JSON, anything else as YAML;
    None: all defaults) and dotted ``overrides`` (``["grpo.num_generations=4", "optim.betas=[0.9, 0.95]"]``),
    applied in order after the file.

    Raises ``ValueError`` (``ConfigError``) for an unknown key anywhere (the message lists the valid keys of its
    section), a value of the wrong type (naming the field, the expected type and the value) or out of range; the
    message always carries the full dotted key."""
    data = _read_file(path) if path is not None else {}
    apply_overrides(cls, data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise config_error(err, cls) from None


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config as plain nested dicts/lists/scalars (tuples become lists), in field order."""
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | os.PathLike) -> Path:
    """Write the resolved ``cfg`` to ``path`` (YAML, or JSON when the name ends in ``.json``) through a temporary
    file and a rename; ``load_config(type(cfg), path)`` gives back an equal config. Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(cfg)
    if p.suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p
