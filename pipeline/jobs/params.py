"""Job parameters: `[params]` in a spec, `${NAME}` in its values, `--set NAME=VALUE` to override.

A spec that depends on where things are on one machine (ImageNet's validation folder, local
weight files) declares those places once, with defaults:

    [params]
    imagenet = "/data/imagenet"
    [data]
    dataset = "imagefolder:${imagenet}"

`enspipe run SPEC --set imagenet=/scratch/in1k` (repeatable) overrides a declared parameter;
an undeclared one is an error, so a typo never runs the defaults silently. A value that is
exactly "${NAME}" takes the parameter's own type (`image_size = "${size}"` stays an integer);
inside a longer string it is substituted as text. `--set` values are read as TOML values when
they parse as one (`--set size=96` is an integer) and as text otherwise. Parameters merge over
includes like every other table, and are substituted before anything is checked, so a step's
key hashes the substituted values: two jobs given the same parameters share their steps.
"""
from __future__ import annotations

import re
import tomllib
from typing import Any, Callable, Mapping

from enspipe.util.errors import ConfigError

__all__ = ["parse_set", "substitute"]

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["name=value", ...]` (the command line's `--set`) -> {name: value}."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"a parameter setting is NAME=VALUE, not {item!r}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a path or a bare word: text
        out[name] = value
    return out


def substitute(raw: dict[str, Any], overrides: Mapping[str, Any] | None,
               where: Callable[[tuple[str, ...], str | None], str]) -> dict[str, Any]:
    """`raw` (a merged spec) with `[params]` applied and removed. `where(table, key)` gives
    the 'FILE:LINE: ' of a table or key, for messages."""
    declared = raw.get("params", {})
    if not isinstance(declared, dict):
        raise ConfigError(where(("params",), None) + "[params] must be a table of NAME = default")
    for name, value in declared.items():
        if isinstance(value, dict):
            raise ConfigError(where(("params",), name) + f"params.{name} must be a value, not a table")
    unknown = sorted(set(overrides or {}) - set(declared))
    if unknown:
        have = ", ".join(sorted(declared)) or "none"
        raise ConfigError(f"parameter {unknown[0]!r} is not declared in the job's [params] (declared: {have})")
    values = {**declared, **(overrides or {})}

    def sub(v: Any, table: tuple[str, ...], key: str) -> Any:
        if isinstance(v, dict):
            return {k: sub(x, (*table, key) if key else table, k) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x, table, key) for x in v]
        if not isinstance(v, str) or "${" not in v:
            return v
        for name in _REF.findall(v):
            if name not in values:
                raise ConfigError(where(table, key) + f"{'.'.join((*table, key))} uses ${{{name}}}, but [params] "
                                  f"declares no {name!r}")
        whole = _REF.fullmatch(v)
        if whole:
            return values[whole.group(1)]
        return _REF.sub(lambda m: str(values[m.group(1)]), v)

    return {table: sub(body, (table,), "") if isinstance(body, dict) else body
            for table, body in raw.items() if table != "params"}
