"""Typed configs: nested dataclasses built from YAML, strictly.

Loading fails on unknown keys and wrong types, naming the dotted key; `--a.b=value` overrides are parsed as YAML
scalars; the resolved config is written back as YAML into the run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ttt_speech.errors import ConfigError

T = TypeVar("T")

__all__ = ["ConfigError", "apply_overrides", "check_value", "from_dict", "load_config", "save_config", "to_dict"]


def _w(where: str) -> str:
    """The message prefix naming the file; "" for a dataclass checked inside another's `__post_init__`."""
    return f"{where}: " if where else ""


class _Mismatch(ConfigError):
    """The value at `key` itself has the wrong type or value (as opposed to a nested key or a check failing):
    a Union reports these by what it expected, and the others with their own message."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def _check(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, tp, key, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Mismatch(f"{_w(where)}{key} must be a mapping ({tp.__name__}), got {value!r}", key)
        return from_dict(tp, value, where, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _Mismatch(f"{_w(where)}{key} must be a list, got {value!r}", key)
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"{_w(where)}{key} must be a mapping, got {value!r}", key)
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise _Mismatch(f"{_w(where)}{key} must be one of {list(typing.get_args(tp))}, got {value!r}", key)
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Mismatch(f"{_w(where)}{key} must be a number, got {value!r}", key)
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _Mismatch(f"{_w(where)}{key} must be an integer, got {value!r}", key)
    if tp in (str, bool) and not isinstance(value, tp):
        raise _Mismatch(f"{_w(where)}{key} must be {tp.__name__}, got {value!r}", key)
    return value


def _check_union(value: Any, tp: Any, key: str, where: str) -> Any:
    """The first member of `tp` that `value` fits. When none does, an alternative that failed deeper than `key`
    itself (a nested key: `ttt.chunk_sise`, `ttt.layers[1]`; or a dataclass's own check) is the reason: its
    message is raised (all of them, each with its alternative, when several did); otherwise the message lists
    what `key` may be."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    failures = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _check(value, arg, key, where)
        except ConfigError as e:
            failures.append((arg, e))
    deep = [(arg, e) for arg, e in failures if not (isinstance(e, _Mismatch) and e.key == key)]
    if len(deep) == 1:
        raise deep[0][1]
    if deep:
        reasons = "; ".join(f"as {_describe(arg)}: {str(e).removeprefix(_w(where))}" for arg, e in deep)
        raise ConfigError(f"{_w(where)}{key} fits none of {_name(tp)}: {reasons}")
    raise _Mismatch(f"{_w(where)}{key} must be {_name(tp)}, got {value!r}", key)


def _describe(tp: Any) -> str:
    """What a config value of type `tp` looks like, in the words of a YAML user."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin is dict:
        return "a mapping"
    if origin is list:
        return "a list"
    names = {float: "a number", int: "an integer", str: "a string", bool: "a boolean (true/false)"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _name(tp: Any) -> str:
    """The members of Union `tp` described, joined as "A, B or C"."""
    items = [_describe(a) for a in typing.get_args(tp)]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def check_value(value: Any, tp: Any, key: str, where: str = "") -> Any:
    """`value` checked against type `tp` (a dataclass, a Union, a Literal, a list, a number, ...) as `from_dict`
    checks a field, mappings built into their dataclasses; a `ConfigError` naming `key`."""
    return _check(value, tp, key, where)


def _did_you_mean(cls: type, unknown: list[str], fields: dict[str, Any], prefix: str) -> str:
    """A known field close to each unknown key, or the class's `__config_unknown__` note for a key it refuses
    on purpose."""
    notes = getattr(cls, "__config_unknown__", {})
    close = {k: difflib.get_close_matches(str(k), list(fields), n=1) for k in unknown if k not in notes}
    hints = [f"{prefix}{m[0]} for {prefix}{k}" for k, m in close.items() if m]
    said = "".join(f"; {prefix}{k}: {notes[k]}" for k in unknown if k in notes)
    return (f" (did you mean {', '.join(hints)}?)" if hints else "") + said


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise `ConfigError` naming the key.

    A field whose schema depends on other fields (`TrainConfig.ttt` on `model.family`) is named in the class's
    `__config_types__`, a mapping from the field to a function of the other fields, checked already, that gives its
    type; such fields are checked last, against that type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_w(where)}{prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_w(where)}unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + k for k in unknown)}; {cls.__name__} has {', '.join(fields)}"
                          f"{_did_you_mean(cls, unknown, fields, prefix)}")
    dependent = getattr(cls, "__config_types__", {})
    hints = typing.get_type_hints(cls)
    kwargs = {name: _check(value, hints[name], prefix + name, where) for name, value in data.items()
              if name not in dependent}
    for name, schema in dependent.items():
        if name in data:
            kwargs[name] = _check(data[name], schema(kwargs), prefix + name, where)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{_w(where)}missing required key{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a ConfigError names its dotted key, as a rule; name the section if not
        section = prefix.rstrip(".")
        if isinstance(e, ConfigError) or section:
            named = not section or re.search(rf"(?<![\w.]){re.escape(section)}(?=[.:\[\s]|$)", str(e))
            raise ConfigError(f"{_w(where)}{'' if named else section + ': '}{e}") from e
        raise ConfigError(f"{_w(where)}{cls.__name__}: {e}") from e


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` (or `--key.sub=value`) overrides; values are parsed as YAML scalars."""
    data = dict(data)
    for item in overrides:
        text = item.removeprefix("--")
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --key.sub=value")
        key, raw = text.split("=", 1)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if part in node and not isinstance(child, dict):
                # a value that is not a section ('from_checkpoint', null: off) is not silently replaced by one
                at = ".".join(parts[: i + 1])
                raise ConfigError(f"override {item!r}: {at} is {child!r}, not a section; set {at} itself "
                                  f"(--{at}={{...}}) to replace it")
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read YAML `path`, apply `overrides`, and build `cls` strictly."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from e
    return from_dict(cls, apply_overrides(data, overrides or []), where=str(path))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_config(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    return path
