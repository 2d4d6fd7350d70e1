"""Strict reading of YAML files into frozen dataclasses.

A config is a root dataclass whose fields are sections; each section is a dataclass whose fields are
declared with ``setting(...)``: a default, a one-line help text with the unit, and optional bounds.
Reading is strict, because a typo in a recipe otherwise costs days of training with a default nobody
chose: invalid YAML, a duplicate key, an unknown section or key, a value of the wrong type or out of
range raises ``ConfigError`` naming the file (or the option), the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import yaml

from mbv2train.errors import ConfigError


def setting(default: Any, help: str, *, gt=None, ge=None, lt=None, le=None) -> Any:
    """Declare a config field: its default, what it does (with unit), and the bounds a value must meet."""
    bounds = {name: bound for name, bound in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if bound is not None}
    return field(default=default, metadata={"help": help, "bounds": bounds})


def section_classes(root: type) -> dict[str, type]:
    """Section name -> the dataclass that holds it."""
    hints = typing.get_type_hints(root)
    return {f.name: hints[f.name] for f in dataclasses.fields(root)}


def load(root: type, path: str | Path | None = None, overrides: Sequence[str] = (),
         options: dict[str, tuple[str, Any]] | None = None, base: tuple[str, Any] | None = None
         ) -> tuple[Any, dict[str, str]]:
    """Read ``path`` (or start from the defaults when it is None), apply overrides, validate everything.

    ``overrides`` are ``--set section.key=value`` strings. ``options`` maps a dotted key to the command-line
    option that set it and its value, e.g. {"model.width_mult": ("--width-mult", 0.5)}; they apply last,
    and a None value is skipped. ``base`` = (name, mapping) stands in for the file: an already parsed
    config, such as the one a checkpoint saved.

    Returns (config, origin): origin maps each dotted key that was set to where it was set ("file.yaml",
    "--set model.width_mult=2", ...), so that later checks can name the right source.
    """
    raw: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}  # (section, key) -> where its value came from, for messages
    if base is not None:
        where, sections = base[0], _check_sections(root, base[1], base[0])
    elif path is not None:
        where, sections = str(path), _read_file(root, Path(path))
    else:
        where, sections = "", {}
    for section, values in sections.items():
        raw[section] = dict(values)
        origin.update({(section, key): where for key in values})
    for item in overrides:
        section, key, value = parse_override(root, item)
        raw.setdefault(section, {})[key] = value
        origin[(section, key)] = f"--set {item}"
    for dotted, (option, value) in (options or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
        origin[(section, key)] = f"{option} {value}"
    return _build(root, raw, origin), {f"{section}.{key}": where for (section, key), where in origin.items()}


def parse_override(root: type, item: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` and parse the value as a YAML scalar (so 0.5, true, 1e-4 get their types)."""
    name, sep, text = item.partition("=")
    parts = name.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item}: expected section.key=value, for example model.width_mult=0.75")
    section, key = parts
    _check_name(root, section, key, f"--set {item}")
    try:
        value = yaml.load(text, Loader=StrictLoader) if text.strip() else None
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"--set {item}: value is not valid YAML ({_one_line(exc)})") from None
    return section, key, value


def describe(root: type) -> list[dict[str, Any]]:
    """Every config key with its type, default and help text, for reference tables."""
    rows = []
    for section, cls in section_classes(root).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rows.append({"key": f"{section}.{f.name}", "type": _type_name(hints[f.name]),
                         "default": plain(f.default), "help": f.metadata.get("help", "")})
    return rows


# ----------------------------------------------------------------------------------------------------
# YAML reading


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads 1e-4 as a float, not the string YAML 1.1 makes it."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # resolve "<<" merge keys first, as SafeLoader does
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a name, not a {type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_file(root: type, path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {_one_line(exc)}") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path}: invalid YAML: {_one_line(exc)}") from None
    if data is None:  # an empty file: every default
        return {}
    return _check_sections(root, data, str(path))


def _check_sections(root: type, data: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (like 'model:'), "
                          f"got {_type_name(type(data))}")
    checked = {}
    for section, values in data.items():
        _check_name(root, str(section), None, where)
        if values is None:  # "model:" with nothing under it
            values = {}
        elif not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys, "
                              f"got {_type_name(type(values))} {values!r}")
        for key in values:
            _check_name(root, str(section), str(key), where)
        checked[section] = dict(values)
    return checked


def _one_line(exc: Exception) -> str:
    """YAML and OS errors span several lines; a user gets one."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


# ----------------------------------------------------------------------------------------------------
# Validation


# a dotted key as a message names it: "train.epochs"
_KEY_IN_TEXT = re.compile(r"\b[a-z_]+\.[a-z0-9_]+\b")


def clash_error(key: str, message: str, origin: dict[str, str], default_where: str) -> ConfigError:
    """ConfigError for a check on ``key`` that involves the other keys its ``message`` names. The command-line
    options that set any of them are blamed, since they came last and made the clash (``--set train.epochs=1``
    against a recipe's warmup), else wherever ``key`` was set; an involved key set elsewhere says where."""
    involved = [key, *(k for k in dict.fromkeys(_KEY_IN_TEXT.findall(message)) if k != key)]
    sources = {k: origin[k] for k in involved if k in origin}  # keys left at their default have none
    typed = list(dict.fromkeys(where for where in sources.values() if where.startswith("--")))
    blamed = typed or [sources.get(key, default_where)]
    elsewhere = [f"{k} from {where}" for k, where in sources.items() if where not in blamed]
    return ConfigError(f"{', '.join(blamed)}: {key}: {message}" + (f" ({'; '.join(elsewhere)})" if elsewhere else ""))


def _check_name(root: type, section: str, key: str | None, where: str) -> None:
    sections = section_classes(root)
    if section not in sections:
        owners = [name for name, cls in sections.items() if section in {f.name for f in dataclasses.fields(cls)}]
        if key is None and owners:  # a key written at the top level instead of under its section
            raise ConfigError(f"{where}: unknown section '{section}' (did you mean '{owners[0]}.{section}', "
                              f"written under '{owners[0]}:'?)")
        raise ConfigError(f"{where}: unknown section '{section}'{_suggest(section, sections)}")
    if key is not None:
        keys = [f.name for f in dataclasses.fields(sections[section])]
        if key not in keys:
            raise ConfigError(f"{where}: unknown key '{section}.{key}'"
                              f"{_suggest(key, keys, prefix=section + '.')}")


def _suggest(name: str, valid: Iterable[str], prefix: str = "") -> str:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid: {', '.join(prefix + v for v in valid)})"


def _build(root: type, raw: dict[str, dict[str, Any]], origin: dict[tuple[str, str], str]) -> Any:
    sections = {}
    for section, cls in section_classes(root).items():
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw.get(section, {}):
                continue
            where = origin[(section, f.name)]
            key = f"{section}.{f.name}"
            value = _coerce(raw[section][f.name], hints[f.name], f"{where}: {key}")
            _check_bounds(value, f.metadata.get("bounds", {}), f"{where}: {key}")
            values[f.name] = value
        sections[section] = cls(**values)
    return root(**sections)


def _coerce(value: Any, expected: Any, what: str) -> Any:
    """Return ``value`` as the annotated type, or raise ConfigError. Ints widen to floats, nothing else."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], what)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{what}: must be one of {', '.join(map(str, args))}; got {_short(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{what}: expected a list, got {_type_name(type(value))} {_short(value)}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{what}[{i}]") for i, v in enumerate(value))
    if expected is Any:
        return value
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{what}: must be a finite number, got {_short(value)}")
        return number
    if expected in (int, str, bool) and type(value) is expected:
        return value
    raise ConfigError(f"{what}: expected {_type_name(expected)}, got {_type_name(type(value))} {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_bounds(value: Any, bounds: dict[str, float], what: str) -> None:
    if value is None:
        return
    tests = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="),
             "lt": (lambda v, b: v < b, "<"), "le": (lambda v, b: v <= b, "<=")}
    for name, bound in bounds.items():
        ok, symbol = tests[name]
        for v in value if isinstance(value, tuple) else (value,):
            if not ok(v, bound):
                raise ConfigError(f"{what}: must be {symbol} {bound}, got {_short(value)}")


def _type_name(t: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "a mapping", type(None): "nothing (null)"}
    if t in names:
        return names[t]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(t, "__name__", str(t))


def plain(value: Any) -> Any:
    """Nested dicts and lists only (tuples become lists), fit for YAML, JSON and checkpoints."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
