"""Configuration files: YAML loaded into dataclasses, with dotted command-line overrides.

Every component has one config dataclass. A run's YAML file has one section per component;
``key.sub=value`` arguments override single fields (values parsed as YAML scalars, so
``optimizer.lr=3e-4``, ``run.resume=true`` and ``model.layers=[...]`` all work). Unknown keys
fail with the file, the dotted path, and the keys that exist.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
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
        found = "a directory" if path.is_dir() else "nothing"
        raise ConfigError(f"{path}: config file not found (expected a YAML file of sections, "
                          f"found {found})")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: expected UTF-8 text, found byte "
                          f"{err.object[err.start:err.start + 1]!r} at offset {err.start}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: expected YAML, found a syntax error: "
                          f"{' '.join(str(err).split())}") from None
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
            missing = "no '='" if not sep else "no field name before '='"
            raise ConfigError(f"override {item!r}: expected the form section.field=value, "
                              f"found {missing}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: expected {part!r} to be a section, "
                                  f"found the value {child!r}")
            node = child
        node[parts[-1]] = _override_value(item, raw)
    return out


def _override_value(item: str, raw: str) -> Any:
    if raw == "":
        return ""
    try:
        return parse_yaml(raw)
    except yaml.YAMLError as err:
        problem = " ".join(str(getattr(err, "problem", "") or err).split())
        raise ConfigError(f"override {item!r}: expected a YAML value after '=', found {raw!r} "
                          f"({problem}); quote it to pass a string") from None


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
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a mapping of {cls.__name__} fields, found "
                          f"{_found(values)}")
    values = dict(values)
    hints = typing.get_type_hints(cls)
    reject_unknown_fields(cls, values, source, cls.__name__)
    check_field_types(cls, values, source)
    kwargs = {}
    for name, value in values.items():
        nested = _dataclass_type(hints[name])
        if nested is not None and isinstance(value, Mapping):
            value = from_dict(nested, value, f"{source}.{name}")
        item_type = _list_item_dataclass(hints[name])
        if item_type is not None and isinstance(value, (list, tuple)):
            value = [from_dict(item_type, item, f"{source}.{name}[{i}]")
                     if isinstance(item, Mapping) else item for i, item in enumerate(value)]
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{source}: {err}") from err
    except ValueError as err:  # a field's own check; prefixed so the message names the file
        raise ConfigError(f"{source}: {err}") from err


def check_field_types(cls: type, values: Mapping[str, Any], source: str) -> None:
    """Fails on the first value whose type does not fit its field's annotation.

    YAML turns ``steps: ten`` into a string and ``resume: maybe`` into a string that is
    truthy; without this check such values travel until something far away breaks (or,
    worse, nothing does). Integers are accepted for float fields; booleans are not numbers.
    """
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint = hints.get(name, Any)
        if not _fits(value, hint):
            raise ConfigError(f"{source}.{name}: expected {_describe(hint)}, found "
                              f"{_found(value)}")


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any or isinstance(hint, TypeVar):
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, Mapping))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping)
    return True  # annotations this checker does not know are left to the field's own check


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               type(None): "null"}


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    if hint in _KIND_NAMES:
        return _KIND_NAMES[hint]
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return str(hint)


def _found(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


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


def _list_item_dataclass(hint: Any) -> type | None:
    """``Item`` for a ``list[Item]`` annotation whose items are dataclasses."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if (item := _list_item_dataclass(arg)) is not None:
                return item
        return None
    if typing.get_origin(hint) in (list, tuple):
        args = typing.get_args(hint)
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _deep_copy(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _deep_copy(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_deep_copy(v) for v in values]
    return values


def field_docs(cls: type) -> dict[str, str]:
    """Each field's one-line documentation: the comment on its line, or the comment lines just
    above it, in the dataclass's source (as ``simple_parsing`` reads them). The comments are
    the single place a field is documented: ``--help`` is made from them."""
    import ast
    import inspect
    import io
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        inline = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                  if n in comments]
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments.get(n, ""))
            n -= 1
        text = " ".join(inline or above).strip()
        if text:
            docs[node.target.id] = text
    return docs


def type_name(hint: Any) -> str:
    """An annotation as a reader writes it: ``int``, ``str | None``, ``list[str]``."""
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is not None:
        args = ", ".join(type_name(arg) for arg in typing.get_args(hint))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if hint is Any:
        return "Any"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def describe_fields(cls: type, prefix: str, indent: str = "  ") -> list[str]:
    """``prefix.field: type = default`` and the field's documentation, for every field."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    lines = []
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING:
            default = f" = {item.default!r}"
        elif item.default_factory is not dataclasses.MISSING:
            default = f" = {item.default_factory()!r}"
        else:
            default = " (required)"
        lines.append(f"{indent}{prefix}{item.name}: {type_name(hints[item.name])}{default}")
        if item.name in docs:
            lines += textwrap.wrap(docs[item.name], width=92, initial_indent=indent + "    ",
                                   subsequent_indent=indent + "    ")
    return lines
