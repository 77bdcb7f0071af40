"""Configuration files: YAML loaded into dataclasses, with dotted command-line overrides.

Every component has one config dataclass. A run's YAML file has one section per component;
``key.sub=value`` arguments override single fields (values parsed as YAML scalars, so
``optimizer.lr=3e-4``, ``run.resume=true`` and ``model.layers=[...]`` all work). Unknown keys
fail with the file, the dotted path, and the keys that exist.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that does not fit its dataclass."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; learning rates are written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, "
                          f"found {type(data).__name__}")
    return data


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of ``values`` with each ``a.b.c=value`` override applied."""
    out = _deep_copy(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected the form section.field=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = parse_yaml(raw) if raw != "" else ""
    return out


def reject_unknown_fields(cls: type, values: Mapping[str, Any], source: str,
                          what: str = "") -> None:
    """Fails naming the source, the unknown keys and the fields that exist.

    ``what`` names the kind of config in the message ("MoE config", ...).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        kind = f"{what} " if what else ""
        raise ConfigError(f"{source}: unknown {kind}field(s) {unknown}; expected some of "
                          f"{sorted(known)}")


def from_dict(cls: type[T], values: Mapping[str, Any] | None, source: str) -> T:
    """Builds dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    ``source`` names where the values came from (file and section) for error messages.
    """
    values = dict(values or {})
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping, found {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    reject_unknown_fields(cls, values, source)
    kwargs = {}
    for name, value in values.items():
        nested = _dataclass_type(hints[name])
        if nested is not None and isinstance(value, Mapping):
            value = from_dict(nested, value, f"{source}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{source}: {err}") from err
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _dataclass_type(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _deep_copy(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _deep_copy(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_deep_copy(v) for v in values]
    return values
