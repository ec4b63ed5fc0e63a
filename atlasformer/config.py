"""YAML -> typed dataclasses: configs/ files, then ``key=value`` overrides; unknown keys are errors.

Nested dataclass fields (``tokenizer.max_seq_len=256``) and dict fields (``model.d_model=64``) are
addressed with dots. A string given for the ``model`` field of a pretraining config names a preset in
``configs/model/`` (``model=small``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration file or override that does not fit its dataclass."""


def configs_root() -> Path:
    """The shipped ``configs/`` folder (``atlasformer.configs`` package data)."""
    return Path(str(files("atlasformer.configs")))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err}).") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of settings.")
    return data


def model_preset(name: str) -> dict:
    """Architecture fields from ``configs/model/<name>.yaml``."""
    path = configs_root() / "model" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (configs_root() / "model").glob("*.yaml"))
        raise ConfigError(f"unknown model preset {name!r}; choose from {known} or give a mapping of fields.")
    return read_yaml(path)


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value.")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}.")
        node[parts[-1]] = value
    return out


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} settings, got {value!r}.")
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}.")
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(hint))}.")
        return value
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _is_number(value):  # YAML 1.1 reads 1e-4 (no dot) as text
        return float(value)
    if hint is int and isinstance(value, bool) is False and isinstance(value, int):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}.")


def build(cls, data: dict, where: str = ""):
    """Instantiate dataclass ``cls`` from a mapping, recursively; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown setting(s) {sorted(unknown)}; known: {sorted(fields)}.")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where + '.' if where else ''}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None):
    """``cls`` from defaults <- ``base`` <- YAML file ``path`` <- ``key=value`` overrides."""
    has_model = "model" in {f.name for f in dataclasses.fields(cls)}
    data: dict = {}
    for layer in (base or {}), read_yaml(path) if path is not None else {}, parse_overrides(overrides or []):
        if has_model and isinstance(layer.get("model"), str):
            layer = {**layer, "model": model_preset(layer["model"])}  # a preset replaces earlier architecture
            data.pop("model", None)
        data = merge(data, layer)
    return build(cls, data)


def to_plain(obj) -> Any:
    """A dataclass as plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
