"""The machinery under every config section: :class:`ConfigError`, the declared bounds of numeric fields
(:func:`limited`, :func:`check_limits`) and reading a value from YAML, JSON or a dotted override by its field's type
(:func:`coerce`, :func:`parse_value`).

Every numeric field (int, float, optional float, list of numbers) declares what it accepts next to its default,
``field(metadata={"limits": Limits(...)})`` through :func:`limited`; :func:`check_limits`, called first by every
section's ``__post_init__``, refuses a non-finite number or one outside its bounds with one line that names the
field, the value and the range. ``tests/test_faults_config.py`` checks that every numeric field declares some.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = ["ConfigError", "Bounds", "Limits", "limited", "maps_only", "MAPS_ONLY", "check_number", "check_limits",
           "check_low_high", "coerce", "parse_value"]


class ConfigError(ValueError):
    """A configuration value a user must change; the message says which and how."""


@dataclass(frozen=True)
class Bounds:
    """The numbers one value may take: finite, and within ``low`` / ``high`` (None: no bound on that side;
    ``*_open``: the bound itself excluded). ``Bounds.parse`` reads ``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ``"finite"``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Bounds":
        spec = spec.strip()
        if spec == "finite":
            return cls()
        for op, kwargs in ((">=", {}), (">", {"low_open": True})):
            if spec.startswith(op):
                return cls(low=float(spec[len(op):]), **kwargs)
        for op, kwargs in (("<=", {}), ("<", {"high_open": True})):
            if spec.startswith(op):
                return cls(high=float(spec[len(op):]), **kwargs)
        if spec[:1] in "[(" and spec[-1:] in "])":
            low, high = (float(v) for v in spec[1:-1].split(","))
            return cls(low, high, spec[0] == "(", spec[-1] == ")")
        raise ValueError(f"cannot read bounds {spec!r}")

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, integer: bool, words: bool = True) -> str:
        """E.g. ``> 0``, ``in [0, 1)``, ``at least 1`` (a whole number, ``words``), ``from 0 to 9`` (whole numbers)."""
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(x)

        low, high = self.low, self.high
        if low is not None and high is not None:
            if integer and not (self.low_open or self.high_open):
                return f"from {num(low)} to {num(high)}"
            return f"in {'(' if self.low_open else '['}{num(low)}, {num(high)}{')' if self.high_open else ']'}"
        if low is not None:
            if integer and words and not self.low_open and low >= 1:
                return f"at least {num(low)}"
            return f"{'>' if self.low_open else '>='} {num(low)}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {num(high)}"
        return ""


@dataclass(frozen=True)
class Limits:
    """What a numeric field accepts: ``bounds`` for the value, or for every item of a list (one per item when it
    holds several); ``length``: a list's exact length (``items`` names them); ``unit`` follows a whole-number lower
    bound ("at least 2 prototypes"); ``what`` says what the value is ("x=5 is {what} and must be ..."); ``note``
    ends the message in parentheses (what special values mean)."""

    bounds: tuple[Bounds, ...]
    note: str = ""
    what: str = ""
    unit: str = ""
    length: int | None = None
    items: str = ""


def limited(default: Any, spec: str | tuple[str, ...], *, note: str = "", what: str = "", unit: str = "",
            length: int | None = None, items: str = "", maps_only: bool = False) -> Any:
    """A dataclass field with default ``default`` (a callable: its factory) whose numbers must satisfy ``spec``
    (one :meth:`Bounds.parse` string, or one per list item). ``maps_only``: see :func:`maps_only`."""
    specs = (spec,) if isinstance(spec, str) else tuple(spec)
    if length is None and len(specs) > 1:
        length = len(specs)
    metadata = {"limits": Limits(tuple(Bounds.parse(s) for s in specs), note, what, unit, length, items),
                MAPS_ONLY: maps_only}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


# Field metadata key: a field of a section other than ``model`` that only model kinds with concept maps read (the map
# loss terms, dead-concept revival). :func:`ivpt.config.config_changes` ignores a change in it for the other kinds.
MAPS_ONLY = "maps_only"


def maps_only(default: Any) -> Any:
    """A dataclass field (not a number) with default ``default`` that only kinds with concept maps read."""
    return field(default=default, metadata={MAPS_ONLY: True})


def _number_kind(hint: Any) -> tuple[type, bool, bool] | None:
    """(int or float, is a list, may be None) of a numeric field's type hint; None for any other field."""
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    is_list = typing.get_origin(hint) is list
    if is_list:
        (hint,) = typing.get_args(hint)
    return (hint, is_list, optional) if hint in (int, float) else None


def check_number(key: str, value: Any, bounds: Bounds, *, integer: bool = False, what: str = "", unit: str = "",
                 note: str = "") -> None:
    """Refuse ``value`` (of the setting ``key``) unless it is a finite number (a whole one when ``integer``) within
    ``bounds``: one line naming ``key``, the value and the range."""
    head = f"{key}={value}" + (f" is {what} and" if what else "")
    tail = f" ({note})" if note else ""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not whole):
        kind = "a whole number" if integer else "a finite number"
        req = bounds.describe(integer, words=False)
        raise ConfigError(f"{head} must be {kind}{' ' + req if req else ''}{tail}")
    if not bounds.holds(value):
        req = bounds.describe(integer) + (f" {unit}" if unit else "")
        if not math.isfinite(value):
            req = "a finite number" + (f" {req}" if req.strip() else "")
        elif integer and bounds.low is not None and bounds.high is not None:
            req = f"a whole number {req}"
        raise ConfigError(f"{head} must be {req}{tail}")


def check_limits(section: Any, name: str | None = None) -> None:
    """Refuse the first numeric field of the config ``section`` (a dataclass instance) that breaks its declared
    :class:`Limits`; ``name``: the section's name in messages (default: the class name without ``Config``)."""
    name = name or type(section).__name__.removesuffix("Config").lower()
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        limits = f.metadata.get("limits")
        if limits is None:
            continue
        key, value = f"{name}.{f.name}", getattr(section, f.name)
        kind, is_list, optional = _number_kind(hints[f.name]) or (float, False, False)
        integer = kind is int
        if value is None and optional:
            continue
        if not is_list:
            check_number(key, value, limits.bounds[0], integer=integer, what=limits.what, unit=limits.unit,
                         note=limits.note)
            continue
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list of numbers, e.g. {key}="
                              + ",".join(str(v) for v in f.default_factory()))  # type: ignore[misc]
        if limits.length is not None and len(value) != limits.length:
            raise ConfigError(f"{key}={list(value)} must be {limits.length} numbers"
                              + (f" ({limits.items})" if limits.items else "") + f", e.g. {key}="
                              + ",".join(str(v) for v in f.default_factory()))  # type: ignore[misc]
        for i, item in enumerate(value):
            bounds = limits.bounds[i if len(limits.bounds) > 1 else 0]
            check_number(f"{key}[{i}]", item, bounds, integer=integer, what=limits.what, unit=limits.unit,
                         note=limits.note)


def check_low_high(key: str, pair: list[float], example: str) -> None:
    if pair[0] > pair[1]:
        raise ConfigError(f"{key}={pair} must be two numbers low <= high, e.g. {key}={example}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from YAML, JSON or an override) as the field type ``hint``, or a :class:`ConfigError` naming
    ``key``, the value and the expected type. YAML 1.1 reads ``1e-3`` as a string: numeric strings become numbers;
    a fractional number for an integer field (``epochs: 1.5``) is refused."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)

    def refuse(expected: str, example: str) -> ConfigError:
        return ConfigError(f"{key}={value!r} ({type(value).__name__}) must be {expected}, e.g. {key}={example}")

    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise refuse(f"a list of {_type_name(inner)}", "[1, 2]" if inner is int else "[0.5, 1.0]")
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise refuse("a mapping", "{depth: 4}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise refuse("true or false", "true")
        return value
    if hint is int:
        number = _number_or_none(value)
        if number is None or not float(number).is_integer():
            raise refuse("a whole number", str(round(number)) if number is not None and math.isfinite(number) else "5")
        return int(number)
    if hint is float:
        number = _number_or_none(value)
        if number is None:
            raise refuse("a number", "0.001")
        return float(number)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise refuse("a string", "auto")
        return str(value)
    return value


def _number_or_none(value: Any) -> float | int | None:
    """``value`` as an int or float (numeric strings parsed, booleans refused), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


def parse_value(raw: str, hint: Any, item: str) -> Any:
    """The text ``raw`` of the override ``item`` (``section.field=raw``) as the field type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        hint, origin = args[0], typing.get_origin(args[0])
    try:
        if origin is list:
            (inner,) = typing.get_args(hint)
            text = raw.strip("[]")
            return [parse_value(v.strip(), inner, item) for v in text.split(",") if v.strip()]
        if origin is dict:
            import yaml

            value = yaml.safe_load(raw)
            if not isinstance(value, dict):
                raise ValueError("expected a mapping such as {a: 1}")
            return value
        if hint is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        return raw
    except ValueError as exc:
        expected = {int: "a whole number, e.g. 5", float: "a number, e.g. 0.001"}.get(hint, str(exc))
        raise ConfigError(f"override {item!r}: cannot read {raw!r} as {getattr(hint, '__name__', hint)}; give "
                          f"{expected}") from None

