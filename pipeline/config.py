"""Configuration: frozen dataclasses are the one source of every option, default and help text.

(Over 400 lines on purpose: field -> flag -> job key, and strict parsing from the command
line, TOML files and config.json, are one contract and stay in one file.)

A stage's config class declares its fields with `option(...)` metadata. From those fields
  - `parse_config(cls, table)` builds an instance strictly from a mapping (a TOML table, a
    config.json): an unknown key or a value of the wrong type is an `OptionError` naming the
    field, before the stage's own checks in `__post_init__` run;
  - `click_options(cls)` makes the command line's options (flag, default, help, choices,
    repeatable) so the CLI restates nothing and cannot drift from the API;
  - `job_keys(cls)` is what a job spec accepts for a step of that kind.
Stages speak in field names (`OptionError("adv_fraction", "must be in (0, 1], not 1.5")`); the
CLI shows a field as its flag (`--adv-fraction must be ...`), a job spec as its key
(`models.A.adv_fraction must be ...`), so the library never speaks the CLI's language. Any
message may also *mention* another field in backticks (`` `weights` ``): `speak` shows each
mention the same way (a flag on the command line, a key in a job spec).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
import warnings
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Literal, Mapping

from enspipe.util.errors import ConfigError, EnspipeError

__all__ = ["DeclaredError", "Option", "OptionError", "check", "check_declared", "click_options", "config_defaults", "config_to_dict",
           "flag_of", "help_text", "job_keys", "normalize", "option", "parse_config", "read_toml", "renamed",
           "runtime_fields", "speak", "toml_line"]

_MENTION = re.compile(r"`([a-z][a-z0-9_]*)`")


def speak(text: str, name_of: Callable[[str], str] | None = None) -> str:
    """`text` with every mentioned field (`` `data_root` ``) shown as `name_of(field)` would
    show it (`--data-root` on the command line, `data.data_root` in a job spec)."""
    return _MENTION.sub(lambda m: (name_of or (lambda f: f))(m.group(1)), text)


class OptionError(ConfigError):
    """A configuration value is wrong; `field` names it, `problem` says what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def render(self, name: str, name_of: Callable[[str], str] | None = None) -> str:
        """The message with the field shown as the user typed it (a flag or a job key), and
        the fields the problem mentions shown by `name_of`."""
        return f"{name} {speak(self.problem, name_of)}"


class DeclaredError(OptionError):
    """A value outside what its field declares (`choices`, a range): a usage error on the command
    line (exit 2, as click's own choice and range checks), the same message everywhere else."""


@dataclass(frozen=True)
class Option:
    """How a config field appears outside Python."""

    help: str | Callable[[], str] = ""   # a callable is read when --help is made (names from a registry)
    flag: str | None = None              # the CLI flag if not --field-name
    cli: bool = True                     # offered on the command line
    job: bool = True                     # accepted in a job spec's step table
    choices: tuple[str, ...] | None = None  # enforced by check_declared (each item of a list field)
    parse: Callable[[Any], Any] | None = None  # str -> value (e.g. eps "16/256"); also used on job values
    metavar: str | None = None
    minimum: float | None = None         # inclusive lower bound, enforced by check_declared
    above: float | None = None           # exclusive lower bound (0: a positive number)
    maximum: float | None = None         # inclusive upper bound
    hidden: bool = False                 # a flag kept out of --help (internal / audit switches)
    sep: str | None = None               # list fields: the CLI also splits each value on sep ("fgsm,pgd")
    path: str | None = None              # the CLI checks the path: "dir" (not a file), "existing", "any"
    runtime: bool = False                # how a run goes (worker counts, a scheduler, logs), never what it
                                         # computes: a job step's cache key and a resume's check leave it out


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


def runtime_fields(cls: type) -> set[str]:
    """The fields declared `runtime=True`: how a run goes, not what it computes (a job step's
    cache key and a resumed run's identity check leave them out)."""
    return {f.name for f in fields(cls) if _opt(f).runtime}


def renamed(**old_to_new: str) -> Callable[[type], type]:
    """Class decorator: fields renamed for one vocabulary keep their old names for a release.
    `Cls(old=...)` warns (DeprecationWarning) and sets the new field; `obj.old` reads it;
    `parse_config` maps old keys of a saved config (config.json) to the new ones."""
    def decorate(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kw: Any) -> None:
            for old, new in old_to_new.items():
                if old in kw:
                    warnings.warn(f"{cls.__name__}({old}=...) is deprecated: use {new}=", DeprecationWarning,
                                  stacklevel=2)
                    if new in kw:
                        raise TypeError(f"{cls.__name__}() got both {old}= and its new name {new}=")
                    kw[new] = kw.pop(old)
            init(self, *args, **kw)

        cls.__init__ = __init__  # type: ignore[method-assign]
        for old, new in old_to_new.items():
            setattr(cls, old, property(lambda self, _n=new: getattr(self, _n),
                                       doc=f"Deprecated name of `{new}`."))
        cls.__renamed__ = {**getattr(cls, "__renamed__", {}), **old_to_new}  # type: ignore[attr-defined]
        return cls

    return decorate


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
        try:
            return opt.parse(value)
        except OptionError:
            raise
        except EnspipeError as e:  # the parser's own error: the field's problem
            problem = str(e)
            raise OptionError(name, problem[len(name) + 1:] if problem.startswith(name + " ") else problem) from None
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
    old_names = getattr(cls, "__renamed__", {})
    for key, value in {**table, **extra}.items():
        key = old_names.get(key, key)
        if key not in known:
            raise OptionError(key, f"is not an option (known: {', '.join(sorted(job_keys(cls)))})")
        values[key] = _coerce(key, hints[key], value, _opt(known[key]))
    missing = [f.name for f in known.values()
               if f.default is MISSING and f.default_factory is MISSING and f.name not in values]  # type: ignore[misc]
    if missing:
        raise OptionError(missing[0], "is required")
    return cls(**values)


# --- checks stages use in __post_init__ ----------------------------------------------------

def normalize(cfg: Any, *, paths: tuple[str, ...] = (), path_lists: tuple[str, ...] = ()) -> None:
    """In a frozen config's __post_init__: path fields accept str or os.PathLike and keep str
    (lists of them a tuple of str; one bare string is refused), and a field with a parser
    given text (eps "16/256") keeps the parsed value, so a config compares, hashes and saves
    as JSON the same however it was written."""
    for name in path_lists:
        value = getattr(cfg, name)
        if isinstance(value, (str, os.PathLike)):
            raise OptionError(name, "must be a list of paths or names, not one string")
        object.__setattr__(cfg, name, tuple(os.fspath(v) for v in value))
    for name in paths:
        if isinstance(getattr(cfg, name), os.PathLike):
            object.__setattr__(cfg, name, os.fspath(getattr(cfg, name)))
    for f in fields(cfg):
        parse = _opt(f).parse
        if parse is not None and isinstance(getattr(cfg, f.name), str):
            object.__setattr__(cfg, f.name, _coerce(f.name, str, getattr(cfg, f.name), _opt(f)))


def check_declared(cfg: Any) -> None:
    """In a config's __post_init__: every field's declared `choices` (each item of a list field)
    and range (`minimum`, `above`, `maximum`; a bounded number must be finite; None passes: it
    means "unset" for an optional field), as OptionErrors naming the field. The class's own checks then keep only what no single declaration says."""
    for f in fields(cfg):
        opt, value = _opt(f), getattr(cfg, f.name)
        if value is None:
            continue
        if opt.choices is not None:
            if isinstance(value, (tuple, list)):  # a list field: each item ("attacks": an unknown attack)
                for item in value:
                    if item not in opt.choices:
                        raise DeclaredError(f.name, f"names an unknown {f.name.removesuffix('s')} {item!r}: use one "
                                          f"of {', '.join(opt.choices)}")
            elif value not in opt.choices:
                raise DeclaredError(f.name, f"must be one of {', '.join(opt.choices)}, not {value!r}")
        if opt.minimum is not None or opt.above is not None or opt.maximum is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DeclaredError(f.name, f"must be a number, not {value!r}")
            ok = (math.isfinite(value) and (opt.minimum is None or value >= opt.minimum)
                  and (opt.above is None or value > opt.above) and (opt.maximum is None or value <= opt.maximum))
            if not ok:
                raise DeclaredError(f.name, f"must be {_bounds(opt)}, not {value!r}")


def _bounds(opt: Option) -> str:
    """The declared range in words: "at least 1", "0 or more", "a positive number", "in (0, 1]"."""
    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    low = opt.above if opt.above is not None else opt.minimum
    if opt.maximum is not None:
        return f"in {'(' if opt.above is not None else '['}{num(low) if low is not None else '-inf'}, {num(opt.maximum)}]"
    if opt.above is not None:
        return "a positive number" if opt.above == 0 else f"above {num(opt.above)}"
    assert opt.minimum is not None
    return f"{num(opt.minimum)} or more" if opt.minimum == 0 else f"at least {num(opt.minimum)}"


def help_text(opt: Option) -> str:
    """The option's help (a callable help is asked now)."""
    return opt.help() if callable(opt.help) else opt.help


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
                  defaults: Mapping[str, Any] | None = None, require: bool = True,
                  required: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of `cls` (in field order), derived from the
    field's type, default and `Option`. Tuple fields are repeatable (and split on `sep`);
    bools are flags. `require=False` leaves required fields to `parse_config` (a command
    that also reads a config file); `required` names optional fields the command requires."""
    import click

    hints = _hints(cls)
    overrides = dict(defaults or {})
    required_ = set(required)

    def decorate(fn: Callable) -> Callable:
        for f in reversed(fields(cls)):
            opt = _opt(f)
            if not opt.cli or f.name in skip or (only is not None and f.name not in only):
                continue
            base, optional = _split_optional(hints[f.name])
            default = overrides.get(f.name, f.default if f.default is not MISSING else None)
            required = require and (f.name in required_ or f.default is MISSING and f.default_factory is MISSING
                                     and f.name not in overrides)  # type: ignore[misc]
            kw: dict[str, Any] = {"help": help_text(opt), "required": required, "hidden": opt.hidden}
            if opt.metavar:
                kw["metavar"] = opt.metavar
            if typing.get_origin(base) is tuple:
                kw.update(multiple=True, default=tuple(default or ()))
                if opt.sep:
                    kw["callback"] = functools.partial(_split_values, opt.sep)
            elif base is bool:
                kw.update(is_flag=True, default=bool(default))
            else:
                choices = opt.choices or (typing.get_args(base) if typing.get_origin(base) is Literal else None)
                if opt.parse is not None:
                    kw["type"] = _ParsedType(opt.parse, opt.metavar or f.name.upper())
                elif opt.path is not None:
                    kw["type"] = click.Path(file_okay=opt.path != "dir", exists=opt.path == "existing")
                elif choices:
                    kw["type"] = click.Choice(list(choices))
                elif base in (int, float):
                    # No click range: `minimum` is the config's check_declared, which says it the
                    # same way to the command line, a job spec and the API.
                    kw["type"] = base
                if not required:  # click >= 8.3 takes an explicit None as a default given
                    kw["default"] = default
                kw["show_default"] = default is not None
            fn = click.option(opt.flag or "--" + f.name.replace("_", "-"), f.name, **kw)(fn)
        return fn

    return decorate


def _split_values(sep: str, ctx: Any, param: Any, value: tuple[str, ...]) -> tuple[str, ...]:
    """`--attacks fgsm,pgd --attacks iter_ll` -> ("fgsm", "pgd", "iter_ll")."""
    return tuple(v.strip() for item in value for v in str(item).split(sep) if v.strip())


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
                except EnspipeError as e:
                    self.fail(str(getattr(e, "problem", e)), param, ctx)

        t = Parsed()
        t.name = name
        return t


# --- TOML files: line numbers for messages --------------------------------------------------

def toml_line(text: str, table: str | tuple[str, ...] | None, key: str | None = None) -> int | None:
    """The line where `[table]` (or `key` inside it; `table=None`: a top-level key) is
    written, for messages that say file:line. A table given as a tuple of its parts may
    hold names with dots (`("models", "v1.2")` is `[models."v1.2"]`)."""
    lines = text.splitlines()
    key_re = re.compile(r"^\s*" + re.escape(key) + r"\s*=") if key else None
    if table is None:
        for j, line in enumerate(lines):
            if line.lstrip().startswith("["):
                break
            if key_re and key_re.match(line):
                return j + 1
        return None
    parts = [re.escape(p) for p in (table.split(".") if isinstance(table, str) else table)]
    quoted = [r"(?:" + p + r'|"' + p + r'"|\'' + p + r"\')" for p in parts]
    header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(quoted) + r"\s*\]\s*(#.*)?$")
    for i, line in enumerate(lines):
        if header.match(line):
            if key_re is None:
                return i + 1
            for j in range(i + 1, len(lines)):
                if lines[j].lstrip().startswith("["):
                    break
                if key_re.match(lines[j]):
                    return j + 1
            return i + 1
    return None


def read_toml(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file of `cls`'s fields (top-level keys: those the command line offers), e.g.
    `train --config FILE.toml`.
    Unknown keys and wrong types are ConfigErrors naming FILE:LINE and the key; the values
    are returned for `parse_config` (so that flags can override them first)."""
    import tomllib

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        table = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    known = {f.name: f for f in fields(cls)}
    hints = _hints(cls)
    old_names = getattr(cls, "__renamed__", {})
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = old_names.get(key, key)
        try:
            if name not in known or not _opt(known[name]).cli:
                allowed = sorted(f.name for f in fields(cls) if _opt(f).cli)
                raise OptionError(key, f"is not an option (known: {', '.join(allowed)})")
            out[name] = _coerce(key, hints[name], value, _opt(known[name]))
        except OptionError as e:
            line = toml_line(text, None, key)
            raise ConfigError(f"{path}:{line}: {e}" if line else f"{path}: {e}") from None
    return out
