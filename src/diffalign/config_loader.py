"""Typed configs from YAML files and ``--key=value`` overrides, for any dataclass.

One dataclass is the config (TRL style): each field has a type, a default and a help string in
``field(metadata={"help": ...})``. The same class serves Python, a YAML recipe and the command line::

    cfg = load_config(TrainConfig, "configs/sd15_dpo.yaml", ["--learning_rate=1e-6", "seed=3"])
    dump_config(cfg, "runs/x/config.yaml")   # what ran, loadable again
    print(config_help(TrainConfig))          # key, type, default, help

Keys are flat (no nesting). Later sources win: defaults < YAML < overrides (in order). Every mistake a
user can make is a :class:`~diffalign.errors.UserError` naming the key and where it came from.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``Optional[X]``
(``none``/``null`` on the command line) and ``tuple[X, ...]`` / ``list[X]`` of the scalar types
(comma-separated, or a YAML flow list such as ``["a, b", c]`` when items contain commas).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from diffalign.errors import UserError

T = TypeVar("T")

COMMAND_LINE = "the command line"
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~")


class _Invalid(Exception):
    """A value that does not fit a type; carries the reason shown to the user."""


# ----------------------------------------------------------------------------------------------- types


def _is_optional(tp) -> tuple[bool, Any]:
    """(True, X) for Optional[X] / X | None, else (False, tp)."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            if len(args) != 1:
                raise TypeError(f"only Optional[X] unions are supported, got {tp!r}")
            return True, args[0]
        raise TypeError(f"only Optional[X] unions are supported, got {tp!r}")
    return False, tp


def _sequence_item(tp):
    """The item type of tuple[X, ...] / list[X], or None if tp is not a sequence type."""
    origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0]
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"only tuple[X, ...] is supported, got {tp!r}")
        return args[0]
    return None


def type_name(tp) -> str:
    """A short, user-facing name of a field type: ``float``, ``int or none``, ``list of str``, ``one of a|b``."""
    optional, inner = _is_optional(tp)
    item = _sequence_item(inner)
    if item is not None:
        name = f"list of {type_name(item)}"
    elif typing.get_origin(inner) is Literal:
        name = "one of " + "|".join(str(c) for c in typing.get_args(inner))
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def _coerce_scalar(value, tp, *, parse: bool):
    """``value`` as the scalar type ``tp``; strings are parsed only if ``parse`` (YAML and the command line)."""
    is_str = isinstance(value, str)
    text = value.strip() if is_str else None
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):  # mixed choices: "auto", True, False
            return value
        if isinstance(value, bool) and parse:  # YAML 1.1 reads an unquoted no/off/yes/on as a bool
            for choice in choices:
                if str(choice).lower() in (_TRUE if value else _FALSE):
                    return choice
        if is_str and parse:
            for choice in choices:
                if str(choice).lower() == text.lower():
                    return choice
        allowed = ", ".join(str(c) for c in choices)
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _Invalid(f"expected one of {allowed}, got {_short(value)}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if parse and is_str and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        if parse and type(value) is int and value in (0, 1):
            return bool(value)
        raise _Invalid(f"expected bool (true/false, yes/no, 1/0), got {_short(value)}")
    if tp is int:
        if type(value) is int:
            return value
        if parse and is_str:
            try:
                return int(text)
            except ValueError:
                pass
            try:  # "2e3" is a fine way to write 2000
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Invalid(f"expected int, got {_short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if parse and is_str:
            try:  # YAML 1.1 reads 1e-6 (no dot) as a string: parse it here
                return float(text)
            except ValueError:
                pass
        raise _Invalid(f"expected float, got {_short(value)}")
    if tp is str:
        if is_str:
            return value
        hint = " (quote it in YAML)" if isinstance(value, (int, float, bool)) else ""
        raise _Invalid(f"expected str, got {_short(value)}{hint}")
    raise TypeError(f"unsupported config field type {tp!r}")


def coerce_value(value, tp, *, parse: bool = True):
    """``value`` converted to the field type ``tp``; raises ``ValueError`` with a user-facing reason.

    ``parse=True`` (YAML values and command-line strings) reads strings as numbers, bools, ``none`` and
    comma-separated lists; ``parse=False`` (Python objects) only accepts values already of the type
    (ints are accepted for floats, lists for tuples).
    """
    try:
        return _coerce(value, tp, parse=parse)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


def _coerce(value, tp, *, parse: bool):
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise _Invalid(f"expected {type_name(tp)}, got none")
    if optional and parse and isinstance(value, str) and value.strip().lower() in _NONE:
        return None
    item = _sequence_item(inner)
    if item is None:
        return _coerce_scalar(value, inner, parse=parse)
    if isinstance(value, str) and parse:
        text = value.strip()
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise _Invalid(f"cannot read {_short(text)} as a list: {str(exc).splitlines()[0]}") from None
            if not isinstance(value, list):
                raise _Invalid(f"expected a list, got {_short(text)}")
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    elif not isinstance(value, (list, tuple)):
        raise _Invalid(f"expected {type_name(tp)}, got {_short(value)}")
    try:
        items = [_coerce_scalar(v, item, parse=parse) for v in value]
    except _Invalid as exc:
        raise _Invalid(f"expected {type_name(tp)}, got {_short(value)}: item {exc}") from None
    return list(items) if typing.get_origin(inner) is list else tuple(items)


def _field_types(cls) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


# ----------------------------------------------------------------------------------------------- loading


def _unknown_key(key: str, known, source: str) -> UserError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UserError(f"unknown config key {_short(key)} {source}{hint} (--help-config lists every key)")


def _short(value, limit: int = 120) -> str:
    """repr(value) cut to `limit` characters, so an error message stays one readable line whatever the value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain PyYAML keeps the last one silently), and
    refuses aliases (`*name`): a config has no use for them, and nested aliases expand exponentially (526 bytes
    of YAML made 2.6 GB of lists, issue 22)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{_short(event.anchor, 40)[1:-1]}, line {event.start_mark.line + 1}) is not "
                "allowed in a config file; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: PyYAML reports it itself
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _NoAliasDumper(yaml.SafeDumper):
    """What we write is read back by a loader that refuses aliases: never write one (a value shared by two keys
    is written twice)."""

    def ignore_aliases(self, data):
        return True


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a YAML file" if p.is_dir() else "does not exist"
        raise UserError(f"config file '{p}' {what}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise UserError(f"config file '{p}' is not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file '{p}': {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{p}' must be a mapping of key: value lines, got a {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise UserError(f"config file '{p}': key {key!r} is not a string")
    return data


def parse_overrides(overrides: list[str] | tuple[str, ...], bool_keys=()) -> list[tuple[str, str]]:
    """``["--a=1", "b=2", "--c", "3", "--flag"]`` -> ``[("a", "1"), ("b", "2"), ("c", "3"), ("flag", "true")]``.

    A bare ``--key`` is ``true`` when ``key`` is in ``bool_keys`` (argparse's ``store_true`` habit); any
    other bare ``--key`` takes the next argument as its value. Dashes in keys become underscores.
    """
    pairs: list[tuple[str, str]] = []
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = str(args[i])
        i += 1
        body = arg[2:] if arg.startswith("--") else arg
        if "=" in body:
            key, value = body.split("=", 1)
        elif arg.startswith("--"):
            key = body
            norm = key.strip().replace("-", "_")
            if norm in bool_keys and (i >= len(args) or str(args[i]).startswith("--")):
                value = "true"
            elif i < len(args) and not str(args[i]).startswith("--"):
                value = str(args[i])
                i += 1
            else:
                raise UserError(f"override {arg!r} on {COMMAND_LINE} needs a value: write {arg}=VALUE")
        else:
            raise UserError(f"cannot read override {arg!r} on {COMMAND_LINE}: write --key=value")
        key = key.strip().replace("-", "_")
        if not key:
            raise UserError(f"override {arg!r} on {COMMAND_LINE} has no key: write --key=value")
        pairs.append((key, value))
    return pairs


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults, the YAML file ``path`` (optional) and ``overrides`` (later wins).

    Raises :class:`UserError` for a missing or malformed file, an unknown key (with a did-you-mean), a
    value of the wrong type (naming the key, the expected type and the value) and missing required keys.
    """
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    sources: list[tuple[str, list[tuple[str, Any]]]] = []
    if path is not None:
        sources.append((f"in '{path}'", [(k.replace("-", "_"), v) for k, v in _read_yaml(path).items()]))
    if overrides:
        bool_keys = {k for k, tp in types_.items() if _is_optional(tp)[1] is bool}
        sources.append((f"on {COMMAND_LINE}", parse_overrides(overrides, bool_keys)))
    translate = getattr(cls, "translate_key", None)  # keys of other tools a config class maps to its own
    for source, given in sources:
        pairs = []
        for key, raw in given:
            translated = translate(key, raw, source) if translate is not None and key not in types_ else None
            pairs += translated if translated is not None else [(key, raw)]
        for key, raw in pairs:
            if key not in types_:
                raise _unknown_key(key, types_, source)
            try:
                values[key] = _coerce(raw, types_[key], parse=True)
            except _Invalid as exc:
                raise UserError(f"config key {key!r} {source}: {exc}") from None
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.init and f.name not in values
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        keys = ", ".join(missing)
        flags = " ".join(f"--{k}=..." for k in missing)
        raise UserError(f"missing required config key(s) {keys}: set them in the YAML file or pass {flags}")
    return cls(**values)


def check_types(cfg) -> None:
    """Raise :class:`UserError` naming the first field whose value does not fit its type.

    For configs built in Python (``TrainConfig(learning_rate="1e-5")`` is refused: no string parsing here).
    """
    for key, tp in _field_types(type(cfg)).items():
        value = getattr(cfg, key)
        try:
            _coerce(value, tp, parse=False)
        except _Invalid as exc:
            raise UserError(f"config key {key!r}: {exc}") from None


# ----------------------------------------------------------------------------------------------- output


def config_to_dict(cfg) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples become lists), in field order."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def dump_config(cfg, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML to ``path`` (parents created); ``load_config`` reads it back equal."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved {type(cfg).__name__}: every key, as it ran. Load it again with --config {p.name}\n"
    data = config_to_dict(cfg)
    body = yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True, default_flow_style=None,
                     width=1000)
    if yaml.safe_load(body) != data:
        # PyYAML writes a few characters (NEL, LS, PS, ...) raw that its reader then folds as line breaks:
        # escape everything non-ASCII instead, so what ran is what loads back.
        body = yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=False, default_flow_style=None,
                         width=1000)
    from .fsutil import atomic_write_text

    atomic_write_text(p, header + body)  # a run killed while writing it never leaves half a config
    return p


def _show_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "[]"
    return str(value)


def config_help(cls, width: int = 100) -> str:
    """A plain-text table of every key: name, type and default on one line, the help wrapped below it."""
    types_ = _field_types(cls)
    rows = [
        (f.name, type_name(types_[f.name]), _show_default(f), str(f.metadata.get("help", "")))
        for f in dataclasses.fields(cls) if f.init
    ]
    w_key = max(len(r[0]) for r in rows) + 2
    w_type = min(36, max(len(r[1]) for r in rows))
    lines = [f"{'key':<{w_key}}  {'type':<{w_type}}  default", "-" * width]
    for key, tname, default, text in rows:
        lines.append(f"{'--' + key:<{w_key}}  {tname:<{w_type}}  {default}".rstrip())
        lines.extend(textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


__all__ = [
    "COMMAND_LINE",
    "check_types",
    "coerce_value",
    "config_help",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
    "type_name",
]
