"""Typed configuration, declared once: a dataclass field's annotation is its type, `checked(...)` adds its range
or choices, and `build` validates a YAML mapping against the class.  A new field is validated the moment it is
declared; there is no second list of keys or types to keep in step.

Every problem raises `ConfigError(source, field, message)`: one line naming the file (or the command line) and
the dotted field, e.g. `run.yaml: perf.concurrency[0]: must be at least 1, got -1`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from .errors import ConfigError

_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Rule:
    low: Optional[float] = None
    high: Optional[float] = None
    above: Optional[float] = None  # exclusive lower bound
    below: Optional[float] = None  # exclusive upper bound
    choices: tuple[Any, ...] = ()
    nonempty: bool = False  # a list or string given must not be empty
    # Further checks or a conversion after the type's: parse(value, source, where) -> value (e.g. a mapping of
    # its own schema, such as the judge's); it raises ConfigError itself.
    parse: Optional[Callable[[Any, str, str], Any]] = None


def checked(default: Any = _MISSING, *, default_factory: Any = _MISSING, **rule: Any) -> Any:
    """A dataclass field with a validation rule (see `Rule`) beside its type."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rule": Rule(**rule)})


def _type_name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def convert(value: Any, tp: Any, rule: Optional[Rule], source: str, where: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, Optional, tuple[X, ...], dict, a dataclass), checked
    against `rule`; tuples arrive as YAML lists."""
    tp, optional = _optional(tp)
    if value is None and dataclasses.is_dataclass(tp):  # an empty section (`perf:`) keeps the defaults
        return tp()
    if value is None:
        if optional:
            return None
        raise ConfigError(source, where, f"expected {_type_name(tp)}, got nothing")
    origin = typing.get_origin(tp)
    wrong = ConfigError(source, where, f"expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        out = value
    elif tp is bool:
        if not isinstance(value, bool):
            raise wrong
        out = value
    elif tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong
        out = value
    elif tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise wrong
        out = value  # an int stays one: 0 and 0.0 hash differently in cache keys that older runs hold
    elif tp is str:
        if not isinstance(value, str):
            raise wrong
        out = value
    elif origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise wrong
        item_type = typing.get_args(tp)[0]
        out = tuple(convert(v, item_type, None, source, f"{where}[{i}]") for i, v in enumerate(value))
        if rule:  # the rule's range applies to each element, emptiness to the list
            for i, v in enumerate(out):
                _check_rule(dataclasses.replace(rule, nonempty=False), v, source, f"{where}[{i}]")
            if rule.nonempty and not out:
                raise ConfigError(source, where, "must not be empty")
        return out
    elif origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise wrong
        out = dict(value)
    elif dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong
        return tp(**build(tp, value, source, f"{where}."))
    else:
        raise TypeError(f"schema: no conversion for {tp!r} ({where})")
    if rule:
        _check_rule(rule, out, source, where)
        if rule.parse:
            out = rule.parse(out, source, where)
    return out


def _check_rule(rule: Rule, value: Any, source: str, where: str) -> None:
    if rule.choices and value not in rule.choices:
        raise ConfigError(source, where, f"must be one of {', '.join(map(str, rule.choices))}, got {value!r}")
    if rule.nonempty and not value:
        raise ConfigError(source, where, "must not be empty")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lower = (f"[{_num(rule.low)}", value >= rule.low) if rule.low is not None else \
            (f"({_num(rule.above)}", value > rule.above) if rule.above is not None else None
        upper = (f"{_num(rule.high)}]", value <= rule.high) if rule.high is not None else \
            (f"{_num(rule.below)})", value < rule.below) if rule.below is not None else None
        if lower and upper and not (lower[1] and upper[1]):
            raise ConfigError(source, where, f"must lie in {lower[0]}, {upper[0]}, got {value!r}")
        if lower and not lower[1]:
            bound = f"at least {_num(rule.low)}" if rule.low is not None else f"greater than {_num(rule.above)}"
            raise ConfigError(source, where, f"must be {bound}, got {value!r}")
        if upper and not upper[1]:
            bound = f"at most {_num(rule.high)}" if rule.high is not None else f"less than {_num(rule.below)}"
            raise ConfigError(source, where, f"must be {bound}, got {value!r}")


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def build(cls: type, raw: Mapping[str, Any], source: str, prefix: str = "",
          skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The validated keyword arguments for `cls(...)` from a mapping; unknown keys are refused.  Fields in `skip`
    are left to the caller (fields that need more than a type and a range, e.g. serve specs by name)."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}
    for key in raw:
        if key not in known:
            raise ConfigError(source, f"{prefix}{key}", f"unknown field (known: {', '.join(sorted(known))})")
    return {name: convert(value, hints[name], known[name].metadata.get("rule"), source, f"{prefix}{name}")
            for name, value in raw.items() if name not in skip}
