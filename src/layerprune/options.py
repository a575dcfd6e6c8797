"""Plain values <-> config objects: what turns YAML, JSON and command-line flags into the frozen
dataclasses of config.py and back. Generic over any (nested) dataclass whose fields carry their
help text and flag in `metadata`; it knows nothing of layerprune's options themselves."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from .errors import LayerpruneError


def flag_of(cls, name: str) -> str:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_none(kind):
    """`X | None` -> (X, True); X -> (X, False)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def coerce(kind, value, where: str):
    """A YAML or flag value as the field's type: tuples from lists or comma-separated text."""
    kind, optional = _strip_none(kind)
    if value is None:
        if optional:
            return None
        raise LayerpruneError(f"{where} cannot be empty", f"give a value for {where}")
    try:
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            parts = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
            return tuple(coerce(item, part, where) for part in parts)
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, str) and kind is not str:
            return kind(value)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (kind, int) if kind is float else kind):
            raise TypeError(value)
        return kind(value)
    except (TypeError, ValueError) as err:
        raise LayerpruneError(f"{where} must be {getattr(kind, '__name__', kind)}, got {value!r}",
                              f"give {where} a value of that type") from err


def expand_shorthands(cls, values):
    """A section given as one value (`data: embedded:news`) means what the flag of that name
    means (`--data`, the section's field whose flag it is): `data: {source: embedded:news}`.
    One level: `from_dict` applies it again inside each section."""
    if not isinstance(values, dict):
        return values
    hints = field_types(cls)
    expanded = {}
    for name, value in values.items():
        kind = hints.get(name)
        if kind is not None and dataclasses.is_dataclass(kind):
            if value is not None and not isinstance(value, dict):
                owner = [f.name for f in dataclasses.fields(kind) if flag_of(kind, f.name) == "--" + name]
                if not owner:
                    raise LayerpruneError(f"config section {name} is not a mapping", "write key: value lines under it")
                value = {owner[0]: value}
        expanded[name] = value
    return expanded


def from_dict(cls, values: dict, where: str = ""):
    """Build a (nested) config from plain values, as read from YAML or JSON; unknown keys are errors."""
    if not isinstance(values, dict):
        raise LayerpruneError(f"config section {where or 'top'} is not a mapping", "write key: value lines")
    values = expand_shorthands(cls, values)
    hints = field_types(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise LayerpruneError(f"unknown config key(s) {unknown}{' in ' + where if where else ''}",
                              f"use the keys of {cls.__name__}: {', '.join(hints)}")
    built = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            built[name] = from_dict(hints[name], value or {}, f"{where}{name}.")
        else:
            built[name] = coerce(hints[name], value, f"{where}{name}")
    return cls(**built)


def to_dict(config) -> dict:
    """Plain values (tuples as lists), the form written to config.yaml and history.json."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def merge_values(base: dict, override: dict) -> dict:
    """`override` on top of `base`, section by section."""
    out = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_values(out[key], value) if both else value
    return out


def read_yaml(path: str) -> dict:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise LayerpruneError(f"cannot read config file {path} ({err.strerror or err})", "check the --config path") \
            from err
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise LayerpruneError(f"{path} is not valid YAML ({str(err).splitlines()[0]})", "fix the file") from err
    if not isinstance(values, dict):
        raise LayerpruneError(f"{path} does not hold a mapping of options", "write one `key: value` per line")
    return values


def to_yaml(config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def changes_result(field: dataclasses.Field) -> bool:
    """Whether an option changes the pruned model or a recorded figure (config.opt's `result`)."""
    return field.metadata.get("result", True)


def result_free(cls) -> dict:
    """The options of `cls` declared `result=False`, as {name: None}, nested configs as their own
    dict of such names: what resume lets change and the card's "default recipe" ignores."""
    found: dict = {}
    for field in dataclasses.fields(cls):
        nested = field.default_factory if dataclasses.is_dataclass(field.default_factory) else None
        if not changes_result(field):
            found[field.name] = None
        elif nested is not None and result_free(nested):
            found[field.name] = result_free(nested)
    return found
