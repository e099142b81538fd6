"""YAML files and dotted overrides -> a nested dict -> typed dataclasses.

Nothing here knows the schema: :mod:`vp2o.config` passes its dataclasses and its table of moved
keys. What the loader guarantees:

- malformed YAML, text that is not UTF-8 and a key given twice in one mapping are refused with
  the file, line and column (plain YAML keeps the last of two equal keys without a word);
- ``defaults: [a.yaml, b.yaml]`` at the top of a file merges those files first, in order (paths
  relative to the including file; mappings merge key by key, anything else is replaced), then
  the including file on top; an include cycle or a missing file is refused naming the file;
- overrides ``section.key=value`` (values parsed as YAML) apply after the files;
- every key is known and every value has its field's type (``from_dict``), and a key that moved
  is refused with its new name;
- :func:`where` tells which file and line set a key, so a check that fails on a value read from
  a file (often a base file several includes away) names that place.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vp2o.config.errors import ConfigError

Origins = dict[str, str]
"""Dotted key -> ``"file:line"`` of the YAML line that set it (keys set by overrides have none)."""


# --------------------------------------------------------------------------------------------
# YAML files
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping and records the line of
    every key (``key_lines``, by the id of the mapping that holds it)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.key_lines: dict[int, dict[Any, int]] = {}
        self.mappings: list[dict] = []  # keeps every recorded mapping (and its id) alive


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise yaml.constructor.ConstructorError(
                None, None, "merge keys (<<) are not supported; share settings with defaults: "
                "(a list of YAML files this one extends)", key_node.start_mark)
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in lines
        except TypeError:  # an unhashable key: construct_mapping below says so with its line
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        lines[key] = key_node.start_mark.line + 1
    mapping = loader.construct_mapping(node, deep=deep)
    loader.key_lines[id(mapping)] = lines
    loader.mappings.append(mapping)
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _parse(path: Path) -> tuple[dict, Origins]:
    """One YAML file's top-level mapping and the origin of each of its keys."""
    try:
        data = path.read_bytes()
    except OSError as e:  # unreadable (permissions), or gone since the check
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - data.rfind(b"\n", 0, e.start)  # of the byte, from 1
        raise ConfigError(f"{path}:{line}:{column}: not valid UTF-8 text ({e.reason})") from None
    loader = None
    try:
        loader = _Loader(text)  # its reader refuses unprintable characters already
        loaded = loader.get_single_data()
    except yaml.reader.ReaderError as e:  # a control character: no mark, a character offset
        line = text[: e.position].count("\n") + 1
        column = e.position - text.rfind("\n", 0, e.position)
        raise ConfigError(f"{path}:{line}:{column}: malformed YAML: control character "
                          f"#x{e.character:04x} is not allowed") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context, at = getattr(e, "context", None), getattr(e, "context_mark", None)
        since = f" ({context} at line {at.line + 1})" if context and at else ""
        raise ConfigError(f"{where}: malformed YAML: {getattr(e, 'problem', e)}{since}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if loaded is None:  # an empty file (or only comments): most likely not the file meant
        raise ConfigError(f"{path}: holds no settings (empty, or only comments); expected a "
                          "mapping of sections such as 'model:' (leave out --config to run on "
                          "the defaults)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    origins: Origins = {}

    def walk(node: dict, prefix: str) -> None:
        lines = loader.key_lines.get(id(node), {})
        for key, value in node.items():
            if key in lines:
                origins[f"{prefix}{key}"] = f"{path}:{lines[key]}"
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(loaded, "")
    return loaded, origins


def read_yaml(path: str | Path, _including: tuple[Path, ...] = ()) -> tuple[dict, Origins]:
    """The merged mapping of ``path`` and of the files its ``defaults:`` names, with origins.

    Raises:
        ConfigError: a missing file, malformed YAML, a ``defaults`` entry that is not a file
            name, or an include cycle, naming the file (and line where there is one).
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {what}")
    own, own_origins = _parse(path)
    merged: dict = {}
    origins: Origins = {}
    if "defaults" in own:
        includes = own.pop("defaults")
        at = own_origins.pop("defaults")
        if isinstance(includes, str):
            includes = [includes]
        if not (isinstance(includes, list) and all(isinstance(i, str) and i for i in includes)):
            raise ConfigError(f"{at}: defaults = {includes!r}: expected a list of YAML files "
                              f"(paths relative to {path.name})")
        chain = (*_including, path)
        for name in includes:
            child = path.parent / name
            if any(child.resolve() == p.resolve() for p in chain):
                cycle = " -> ".join(str(p) for p in (*chain, child))
                raise ConfigError(f"{at}: defaults include a cycle: {cycle}")
            if not child.is_file():
                raise ConfigError(f"{at}: defaults: {name!r} does not exist (looked for {child})")
            data, data_origins = read_yaml(child, chain)
            merge(merged, data)
            origins.update(data_origins)
    merge(merged, own)
    origins.update(own_origins)
    return merged, origins


def merge(base: dict, update: dict) -> dict:
    """Merge ``update`` into ``base`` in place: mappings key by key, anything else replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


# --------------------------------------------------------------------------------------------
# Overrides, moved keys, origins
# --------------------------------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: list[str], origins: Origins) -> None:
    """Set each ``section.key=value`` (the value parsed as YAML; text that is not YAML is kept
    as a string) in ``raw``; the keys it sets no longer come from a file.

    Raises:
        ConfigError: an item without ``=``, a path through a value that is not a section, or
            ``defaults`` (includes are read from files only).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, _, text = item.partition("=")
        key = key.strip()
        if key == "defaults":
            raise ConfigError(f"override {item!r}: defaults is read from YAML files only "
                              "(write a file that includes the others)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
        for k in [k for k in origins if k == key or k.startswith(key + ".")]:
            del origins[k]


def refuse_moved(raw: dict, moved: dict[str, str]) -> None:
    """Refuse a key of an older schema, naming where it went (``moved``: old dotted key or
    section -> the message, e.g. ``"moved to loss.kl_coeff"``). Keys are looked up before
    sections, so a known old key gets its own message and any other key of a removed section the
    section's.

    Raises:
        ConfigError: ``"<old key>: <message>"``.
    """
    for old in sorted(moved, key=lambda k: -k.count(".")):
        node: Any = raw
        for part in old.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            raise ConfigError(f"{old}: {moved[old]}", key=old)


def where(error: ConfigError, origins: Origins) -> ConfigError:
    """``error`` with the file and line that set its key in front, when a file set it."""
    key = (error.key or "").split("[")[0]
    if key not in origins:
        return error
    return ConfigError(f"{origins[key]}: {error}", key=error.key)


# --------------------------------------------------------------------------------------------
# Typed dataclasses
# --------------------------------------------------------------------------------------------


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type.

    Raises:
        ConfigError: an unknown key (with the known ones) or a value of the wrong type.
    """
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}",
                          key=prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        bad = unknown[0]
        if isinstance(bad, str) and not bad:
            raise ConfigError(f"{prefix or 'config'}: an empty key; expected one of: "
                              f"{', '.join(sorted(names))}", key=prefix.rstrip(".") or None)
        close = difflib.get_close_matches(str(bad), sorted(names), n=1, cutoff=0.75)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(
            f"{prefix}{bad}: unknown key; {hint}expected one of: {', '.join(sorted(names))}",
            key=f"{prefix}{bad}",
        )
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for logging, wandb and checkpoints)."""
    return dataclasses.asdict(cfg)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                shaped = (typing.get_origin(arg) is list) == isinstance(value, list)
                errors.append((shaped, e))
        shaped = [e for ok, e in errors if ok]
        if len(shaped) == 1 and isinstance(value, list):  # the list member's own reason: which item
            raise shaped[0]
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}", key=key)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(map(repr, args))}",
                          key=key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list", key=key)
        (item_tp,) = args or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    if tp is str and isinstance(value, str):
        return value
    if tp in _NAMES:
        raise ConfigError(f"{key} = {value!r}: expected {_NAMES[tp]}", key=key)
    raise ConfigError(f"{key}: unsupported field type {tp!r}", key=key)  # pragma: no cover


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_name(tp: Any) -> str:
    """What a union field takes, in words: ``an integer or null``."""
    names = []
    for a in typing.get_args(tp):
        if a is type(None):
            continue
        if typing.get_origin(a) is list:
            names.append("a list")
        elif typing.get_origin(a) is Literal:
            names.append("one of " + ", ".join(map(repr, typing.get_args(a))))
        else:
            names.append(_NAMES.get(a, getattr(a, "__name__", str(a))))
    if type(None) in typing.get_args(tp):
        names.append("null")
    return " or ".join(names)
