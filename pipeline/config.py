"""Configuration: frozen dataclasses are the one source of every option, default and help text.

A stage's config class declares its fields with `option(...)` metadata. From those fields
  - `parse_config(cls, table)` builds an instance strictly from a mapping (a TOML table, a
    config.json): an unknown key or a value of the wrong type is an `OptionError` naming the
    field, before the stage's own checks in `__post_init__` run;
  - `click_options(cls)` makes the command line's options (flag, default, help, choices,
    repeatable) so the CLI restates nothing and cannot drift from the API;
  - `job_keys(cls)` is what a job spec accepts for a step of that kind.
Stages speak in field names (`OptionError("adv_fraction", "must be in (0, 1], not 1.5")`); the
CLI shows a field as its flag (`--adv-fraction must be ...`), a job spec as its key
(`models.A.adv_fraction must be ...`), so the library never speaks the CLI's language.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Literal, Mapping

from enspipe.errors import ConfigError

__all__ = ["Option", "OptionError", "click_options", "config_defaults", "config_to_dict", "flag_of",
           "job_keys", "option", "parse_config", "check"]


class OptionError(ConfigError):
    """A configuration value is wrong; `field` names it, `problem` says what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def render(self, name: str) -> str:
        """The message with the field shown as the user typed it (a flag or a job key)."""
        return f"{name} {self.problem}"


@dataclass(frozen=True)
class Option:
    """How a config field appears outside Python."""

    help: str = ""
    flag: str | None = None              # the CLI flag if not --field-name
    cli: bool = True                     # offered on the command line
    job: bool = True                     # accepted in a job spec's step table
    choices: tuple[str, ...] | None = None
    parse: Callable[[Any], Any] | None = None  # str -> value (e.g. eps "16/256"); also used on job values
    metavar: str | None = None
    minimum: float | None = None         # inclusive lower bound checked by parse_config / the CLI


def option(default: Any = MISSING, *, help: str = "", default_factory: Any = MISSING, **kw: Any) -> Any:
    """A dataclass field with its outside appearance (`Option`) attached."""
    meta = {"option": Option(help=help, **kw)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _opt(f: dataclasses.Field) -> Option:
    return f.metadata.get("option", Option())


def flag_of(cls: type, name: str) -> str:
    """The CLI flag of field `name` of `cls` (`--adv-fraction`)."""
    for f in fields(cls):
        if f.name == name:
            return _opt(f).flag or "--" + name.replace("_", "-")
    return "--" + name.replace("_", "-")


def config_defaults(cls: type) -> dict[str, Any]:
    """{field: default} for the fields that have one."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready: tuples become lists (what config.json and results.json record)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        return v
    return {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg)}


def job_keys(cls: type) -> set[str]:
    return {f.name for f in fields(cls) if _opt(f).job}


# --- types -------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _split_optional(tp)
    if typing.get_origin(base) is tuple:
        name = "a list of strings"
    elif typing.get_origin(base) is Literal:
        name = "one of " + ", ".join(map(str, typing.get_args(base)))
    else:
        name = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                dict: "a table"}.get(base, getattr(base, "__name__", str(base)))
    return name


def _coerce(name: str, tp: Any, value: Any, opt: Option) -> Any:
    """`value` checked against the field's type (no silent casts but int -> float)."""
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise OptionError(name, f"must be {_type_name(tp)}, not empty")
    if opt.parse is not None and isinstance(value, str):
        return opt.parse(value)
    origin = typing.get_origin(base)
    ok: bool
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise OptionError(name, f"must be a list, not {type(value).__name__}")
        items = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        if not all(isinstance(v, str) for v in items):
            raise OptionError(name, "must be a list of strings")
        return tuple(items)
    if origin is Literal:
        ok = value in typing.get_args(base)
    elif base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        ok = isinstance(value, str)
    elif base is dict or typing.get_origin(base) is dict:
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        got = type(value).__name__ if not isinstance(value, str) else repr(value)
        raise OptionError(name, f"must be {_type_name(tp)}, not {got}")
    if opt.choices is not None and value not in opt.choices:
        raise OptionError(name, f"must be one of {', '.join(opt.choices)}, not {value!r}")
    return value


def parse_config(cls: type, table: Mapping[str, Any], **extra: Any) -> Any:
    """Build `cls` strictly from `table` (+ `extra`): unknown keys and wrong types are
    OptionErrors naming the field; then the class's own checks run."""
    known = {f.name: f for f in fields(cls)}
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for key, value in {**table, **extra}.items():
        if key not in known:
            raise OptionError(key, f"is not an option (known: {', '.join(sorted(job_keys(cls)))})")
        values[key] = _coerce(key, hints[key], value, _opt(known[key]))
    missing = [f.name for f in known.values()
               if f.default is MISSING and f.default_factory is MISSING and f.name not in values]  # type: ignore[misc]
    if missing:
        raise OptionError(missing[0], "is required")
    return cls(**values)


# --- checks stages use in __post_init__ ----------------------------------------------------

def check(cond: bool, field: str, problem: str) -> None:
    """Raise OptionError(field, problem) unless cond."""
    if not cond:
        raise OptionError(field, problem)


def check_positive(cfg: Any, *names: str, allow_none: bool = False) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is None and allow_none:
            continue
        check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, n, f"must be at least 1, not {v!r}")


def check_fraction(value: float, field: str, *, low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not math.isnan(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    check(ok, field, f"must be in {'(0' if low_open else '[0'}, 1], not {value}")


# --- the command line --------------------------------------------------------------------

def click_options(cls: type, *, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                  defaults: Mapping[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of `cls` (in field order), derived from the
    field's type, default and `Option`. Tuple fields are repeatable; bools are flags."""
    import click

    hints = _hints(cls)
    overrides = dict(defaults or {})

    def decorate(fn: Callable) -> Callable:
        for f in reversed(fields(cls)):
            opt = _opt(f)
            if not opt.cli or f.name in skip or (only is not None and f.name not in only):
                continue
            base, optional = _split_optional(hints[f.name])
            default = overrides.get(f.name, f.default if f.default is not MISSING else None)
            required = f.default is MISSING and f.default_factory is MISSING and f.name not in overrides  # type: ignore[misc]
            kw: dict[str, Any] = {"help": opt.help, "required": required}
            if opt.metavar:
                kw["metavar"] = opt.metavar
            if typing.get_origin(base) is tuple:
                kw.update(multiple=True, default=tuple(default or ()))
            elif base is bool:
                kw.update(is_flag=True, default=bool(default))
            else:
                choices = opt.choices or (typing.get_args(base) if typing.get_origin(base) is Literal else None)
                if opt.parse is not None:
                    kw["type"] = _ParsedType(opt.parse, opt.metavar or f.name.upper())
                elif choices:
                    kw["type"] = click.Choice(list(choices))
                elif base is int:
                    kw["type"] = click.IntRange(min=int(opt.minimum)) if opt.minimum is not None else int
                elif base is float:
                    kw["type"] = click.FloatRange(min=opt.minimum) if opt.minimum is not None else float
                if not required:  # click >= 8.3 takes an explicit None as a default given
                    kw["default"] = default
                kw["show_default"] = default is not None
            fn = click.option(opt.flag or "--" + f.name.replace("_", "-"), f.name, **kw)(fn)
        return fn

    return decorate


class _ParsedType:
    """A click ParamType from a parse function (e.g. eps '16/256' -> 0.0625)."""

    def __new__(cls, parse: Callable[[Any], Any], name: str):
        import click

        class Parsed(click.ParamType):
            def convert(self, value, param, ctx):
                if not isinstance(value, str):
                    return value
                try:
                    return parse(value)
                except ConfigError as e:
                    self.fail(str(getattr(e, "problem", e)), param, ctx)

        t = Parsed()
        t.name = name
        return t
