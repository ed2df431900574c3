"""Typed options of the PTQ algorithms: one frozen dataclass per algorithm, validated when it is built.

Each field is declared with `option(default, help, ...)`: its type comes from the annotation (int, float, bool,
str, `float | None`, `float | str` for values such as "auto"), its allowed strings from `choices` and its range
from `low`/`high` (inclusive unless `low_open`/`high_open`). `__post_init__` checks every field, so a bad value
fails when the pool is parsed, before any model is loaded, with a message naming the algorithm, the option
and what it accepts. `help_text()` renders the same metadata for `python -m calm.run --list-algorithms`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

from calm.config import CalmUsageError


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field of an options class with its documentation and constraints."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high,
                                                        "low_open": low_open, "high_open": high_open})


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed_types(arg))
    return (type(None),) if annotation is None or annotation is type(None) else (annotation,)


def _type_name(types_: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types_)


def _range_text(meta: dict) -> str:
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        return f"in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f"{'>' if meta['low_open'] else '>='} {low}"
    if high is not None:
        return f"{'<' if meta['high_open'] else '<='} {high}"
    return ""


@dataclasses.dataclass(frozen=True)
class AlgorithmOptions:
    """Base class: subclasses declare their fields with `option(...)`; `algorithm` names them in errors."""

    algorithm: ClassVar[str] = "algorithm"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            self._check_field(f, hints[f.name], getattr(self, f.name))

    def _check_field(self, f: dataclasses.Field, annotation: Any, value: Any) -> None:
        meta = f.metadata
        allowed = _allowed_types(annotation)
        where = f"{self.algorithm} option {f.name}"
        # JSON has no int/float distinction: 1 is a fine float; True is never a number.
        if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
            object.__setattr__(self, f.name, float(value))
            value = float(value)
        ok = any(isinstance(value, t) and not (isinstance(value, bool) and t in (int, float)) for t in allowed)
        if not ok:
            raise CalmUsageError(f"{where} must be {_type_name(allowed)}, got {value!r}")
        if isinstance(value, str) and meta.get("choices") and value not in meta["choices"]:
            raise CalmUsageError(f"{where} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = meta.get("low"), meta.get("high")
            too_low = low is not None and (value <= low if meta["low_open"] else value < low)
            too_high = high is not None and (value >= high if meta["high_open"] else value > high)
            if too_low or too_high:
                raise CalmUsageError(f"{where} must be {_range_text(meta)}, got {value!r}")

    @classmethod
    def parse(cls, values: dict[str, Any]) -> "AlgorithmOptions":
        """Build from user values (a candidate's `key=value` options); unknown names are an error."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise CalmUsageError(f"algorithm {cls.algorithm!r} has no option {', '.join(unknown)}; its options: "
                                 f"{', '.join(known) or 'none'} (python -m calm.run --list-algorithms)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help_text(cls, indent: str = "    ") -> str:
        """One line per option: name, type, default, constraint and meaning."""
        hints = typing.get_type_hints(cls)
        lines = []
        for f in dataclasses.fields(cls):
            meta = f.metadata
            choices = "|".join(meta["choices"]) if meta.get("choices") else ""
            constraint = " or ".join(c for c in (choices if not choices or "|" in choices or not _range_text(meta)
                                                 else choices, _range_text(meta)) if c)
            if choices and not _range_text(meta):
                constraint = f"one of {choices}"
            kind = _type_name(_allowed_types(hints[f.name]))
            lines.append(f"{indent}{f.name} ({kind}, default {f.default!r}{', ' + constraint if constraint else ''}): "
                         f"{meta.get('help', '')}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class NoOptions(AlgorithmOptions):
    """For an algorithm without options."""
