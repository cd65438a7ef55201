"""The config machinery shared by the three schemas (pretraining ``pretrain.config``, VSE and captioning):
typed building of dataclasses from YAML data with errors that name the key, range checks, ``key=value``
overrides, saving."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, Iterable, List

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and the fix."""


def _yaml_value(text: str, key: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise ConfigError(f"config key '{key}' must be {what}; {text!r} is not valid YAML{where}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number == number and abs(number) != float("inf"):
                return number
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if origin in (list, List):
        if isinstance(value, str):
            value = _yaml_value(value, key, "a list, e.g. [0.9, 0.98]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if origin in (dict, Dict):
        if isinstance(value, str):
            value = _yaml_value(value, key, "a mapping, e.g. {drop_path_rate: 0.1}")
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in (data or {}).items():
        if k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{k}'.{hint} Allowed keys here: {', '.join(sorted(names))}")
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    obj = cls(**kwargs)
    return obj


def check_allowed(cfg: Any, allowed: Dict[str, Any]) -> None:
    """Raise ConfigError unless every dotted key of ``allowed`` holds one of its allowed values."""
    for key, options in allowed.items():
        val = get_key(cfg, key)
        if val not in options:
            raise ConfigError(f"config key '{key}' = {val!r} is not allowed; choose one of {list(options)}")


def check_positive(cfg: Any, keys: Iterable[str]) -> None:
    """Raise ConfigError naming the first dotted key whose value is not > 0."""
    for key in keys:
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get_key(cfg, key)}")


def check_non_negative(cfg: Any, keys: Iterable[str]) -> None:
    """Raise ConfigError naming the first dotted key whose value is not >= 0."""
    for key in keys:
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get_key(cfg, key)}")


def check_unit_interval(cfg: Any, keys: Iterable[str]) -> None:
    """Raise ConfigError naming the first dotted key whose value is outside [0, 1]."""
    for key in keys:
        if not 0.0 <= get_key(cfg, key) <= 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1], got {get_key(cfg, key)}")


def get_key(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set_nested(d: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """``["train.steps=10", "wenlan.queue_size=64"]`` -> nested dict (values parsed as YAML scalars)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_nested(out, key, value)
    return out


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("timm_kwargs", "config_overrides"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, allow_unicode=True)
