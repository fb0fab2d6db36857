"""Reading a config: YAML (+ one level of `_base_`) <- `key=value` overrides, built strictly into the schema.

An unknown key is an error that names the key and the nearest valid one, a value of the wrong type names the key,
the value and the type expected, a choice outside its `Literal` names the allowed values, and a numeric key outside
its RANGES entry names the range. `dump_config` writes YAML that `load_config` reads back to an equal object.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rtda.config.schema import AUGMENTATIONS, Config


class ConfigError(ValueError):
    """A config file, key or value that is not what the schema expects."""


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (its `_base_` files first), apply `section.key=value` overrides, validate."""
    path = Path(path)
    raw = _read_yaml(path)
    merged: dict = {}
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: `_base_` must be a list of YAML paths, got {bases!r}")
    for base in bases:
        base_path = (path.parent / base).resolve()
        base_raw = _read_yaml(base_path)
        if "_base_" in base_raw:
            raise ConfigError(f"{base_path}: a `_base_` file cannot have a `_base_` of its own (one level only)")
        _deep_merge(merged, base_raw)
    _deep_merge(merged, raw)
    for item in overrides:
        _apply_override(merged, item)
    merged.setdefault("name", path.stem)
    return from_dict(merged, source=str(path))


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Validate a plain nested dict against the schema (types, choices, value ranges) and build the Config."""
    cfg = _build(Config, raw, prefix="", source=source)
    check_ranges(cfg, source)
    return cfg


# Allowed values of numeric keys as intervals: `[` `]` inclusive, `(` `)` exclusive; a null value is not checked.
RANGES = {
    "train.epochs": "[1, inf)", "train.iters": "[1, inf)", "train.batch_size": "[1, inf)",
    "train.lr": "[0, inf)", "train.momentum": "[0, 1)", "train.weight_decay": "[0, inf)",
    "train.head_lr_mult": "(0, inf)", "train.poly_power": "[0, inf)", "train.warmup_iters": "[0, inf)",
    "train.poly_horizon": "[1, inf)",
    "train.workers": "[0, inf)", "train.log_interval": "[1, inf)", "train.eval_interval": "[0, inf)",
    "train.checkpoint_interval": "[1, inf)", "train.vis_images": "[0, inf)", "train.accumulate": "[1, inf)",
    "train.keep_every": "[0, inf)",
    "eval.batch_size": "[1, inf)", "model.num_classes": "[1, inf)", "model.aux_weight": "[0, inf)",
    "model.ohem_thresh": "(0, 1]", "model.ohem_min_kept": "[1, inf)",
    "adapt.lambda_adv": "[0, inf)", "adapt.lambda_adv_aux": "[0, inf)", "adapt.d_lr": "[0, inf)",
    "adapt.beta": "[0, 0.5)", "adapt.entropy_weight": "[0, inf)", "adapt.entropy_start": "[0, inf)",
    "adapt.pseudo_weight": "[0, inf)", "adapt.pseudo_percentile": "[0, 1]", "adapt.pseudo_cap": "[0, 1]",
    "adapt.mix_fraction": "(0, 1]", "adapt.ema_alpha": "[0, 1]", "adapt.pseudo_threshold": "[0, 1]",
    "adapt.jitter_p": "[0, 1]", "adapt.blur_p": "[0, 1]", "adapt.mix_weight": "[0, inf)",
    "adapt.kd_lambda": "[0, inf)", "adapt.kd_temperature": "(0, inf)",
    "data.synthetic.num_source": "[1, inf)", "data.synthetic.num_target": "[1, inf)",
    "data.synthetic.num_val": "[1, inf)", "data.synthetic.height": "[8, inf)", "data.synthetic.width": "[8, inf)",
    **{f"data.augment.{p}": "[0, 1]" for p in AUGMENTATIONS},
}


def check_ranges(cfg: Config, source: str = "<dict>") -> None:
    """Every key of RANGES within its range: an error names the key, the value and the range."""
    for key, interval in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        low, high = (float(v) for v in interval[1:-1].split(","))
        too_low = value < low if interval[0] == "[" else value <= low
        too_high = value > high if interval[-1] == "]" else value >= high
        if too_low or too_high:
            raise ConfigError(f"{source}: `{key}` = {value!r} is out of range: expected a value in {interval}")
    if cfg.train.max_wall_time is not None:
        try:
            parse_duration(cfg.train.max_wall_time)
        except ValueError as exc:
            raise ConfigError(f"{source}: `train.max_wall_time` = {cfg.train.max_wall_time!r}: {exc}") from None


def parse_duration(value: str | float) -> float:
    """Seconds in a duration: a number of seconds, or text such as "3h30m", "90m", "45s", "1h"."""
    if isinstance(value, str):
        try:
            value = float(value)  # PyYAML reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", value)
        if not match or not any(match.groups()):
            raise ValueError("expected seconds or a duration such as 3h30m, 90m or 45s")
        h, m, sec = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * h + 60 * m + sec
    if seconds <= 0:
        raise ValueError("expected a positive duration")
    return seconds


def to_dict(cfg: Any) -> dict:
    """The config (or one of its sections) as plain nested dicts and lists, in field order."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML in field order; `load_config(path)` reads it back to an equal Config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: key `{key}` appears twice in one section (lines {seen[key]} "
                                  f"and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    """The top-level mapping of a YAML file ({} for an empty file); a missing file or bad YAML is ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")  # whatever the locale: configs are shared between machines
    except UnicodeDecodeError as exc:
        bom = " (a UTF-16 byte-order mark)" if path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}{bom}; "
                          "expected a UTF-8 file (re-save it as UTF-8)") from None
    data = _parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return copy.deepcopy(data)  # the caller merges into it; the cached parse stays as read


@functools.lru_cache(maxsize=512)
def _parse_yaml(text: str, name: str) -> Any:
    """The YAML document in `text` (read from file `name`), cached by content: the pure-Python strict loader costs
    milliseconds a file, and tools that load every config (gpu-check, the tables, the tests) read each `_base_` file
    dozens of times."""
    try:
        loader = _StrictLoader(text)
        loader.name = name
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: not valid YAML ({exc})") from None


def _deep_merge(into: dict, new: dict) -> None:
    """Merge `new` into `into` in place: sections merge key by key, any other value replaces the old one."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _apply_override(raw: dict, item: str) -> None:
    """Set `section.key=value` in the raw nested dict; the value is read as YAML, an empty one is null."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-3")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key!r} is a value, not a section")
    node[keys[-1]] = yaml.safe_load(text) if text.strip() else None


# --------------------------------------------------------------------------------------- validation
def _build(cls: type, raw: Any, prefix: str, source: str):
    """The dataclass `cls` from the mapping `raw`, every value checked; unknown keys name the nearest valid one."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or 'config'}` must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean `{prefix}{near[0]}`?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key `{prefix}{key}`{hint}")
        kwargs[key] = _check(hints[key], value, f"{prefix}{key}", source)
    return cls(**kwargs)


def _check(hint: Any, value: Any, key: str, source: str):
    """`value` converted to the schema type `hint` (a float from an int or a number-like string), or ConfigError."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(option, value, key, source)
            except ConfigError:
                continue
        raise _type_error(key, value, " or ".join(_type_name(o) for o in options), source)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
            hint_text = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: `{key}` = {value!r} is not one of {', '.join(map(repr, allowed))}{hint_text}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, _type_name(hint), source)
        return [_check(item_type, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return _check_scalar(hint, value, key, source)


def _check_scalar(hint: Any, value: Any, key: str, source: str):
    """`value` as the bool, int, float or str `hint` asks for (a bool is never a number), or ConfigError."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, "bool", source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, value, "int", source)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, value, "float", source)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, "str", source)
    raise ConfigError(f"{source}: `{key}` has an unsupported schema type {hint!r}")


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _type_error(key: str, value: Any, expected: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: `{key}` = {value!r} has type {type(value).__name__}, expected {expected}")
