"""Rewrite references to moved enspipe modules and files: `python tools/rewrite_imports.py MAP FILES...`.

MAP has one move a line, `old new` (blank lines and `#` comments ignored): dotted module names
(`enspipe.jobspec enspipe.jobs.spec`) or file paths (`tests/test_x.py tests/train/test_x.py`).
A module's file moves with it (pipeline/jobspec.py -> pipeline/jobs/spec.py) unless a path line
says where it went (a module become a package: `pipeline/train.py pipeline/train/__init__.py`).

Rewritten, in every FILE given: `import enspipe.x`, `from enspipe.x import ...`, `from enspipe import x`
(split per new parent package), relative imports inside pipeline/ (`from .x import`, `from ..x import`,
resolved against the file's old place and written absolute), dotted strings such as monkeypatch
targets `"enspipe.x.func"`, and file paths such as tests/mutations.py's `pipeline/x.py`. In place;
prints the files it changed.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path


def read_map(path: str) -> tuple[dict[str, str], dict[str, str]]:
    modules, paths = {}, {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].split()
        if len(line) == 2:
            (paths if "/" in line[0] else modules)[line[0]] = line[1]
    for old, new in modules.items():  # a module's file moves with it, unless a path line says otherwise
        paths.setdefault("pipeline/" + old[len("enspipe."):].replace(".", "/") + ".py",
                         "pipeline/" + new[len("enspipe."):].replace(".", "/") + ".py")
    return modules, paths


def sub_all(text: str, table: dict[str, str], boundary: str) -> str:
    """Replace each key by its value where it stands whole (longest keys first)."""
    if not table:
        return text
    keys = sorted(table, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w./])(" + "|".join(map(re.escape, keys)) + r")" + boundary)
    return pattern.sub(lambda m: table[m.group(1)], text)


def split_from_package(text: str, modules: dict[str, str]) -> str:
    """`from enspipe import a, b` where a moved: one import line per new parent package."""
    def fix(m: re.Match) -> str:
        indent, pkg, names = m.group(1), m.group(2), m.group(3).strip("()")
        groups: dict[str, list[str]] = {}
        for item in filter(None, (n.strip() for n in names.replace("\n", " ").split(","))):
            name, _, alias = (p.strip() for p in item.partition(" as "))
            new = modules.get(f"{pkg}.{name}", f"{pkg}.{name}")
            parent, _, last = new.rpartition(".")
            alias = alias or (name if last != name else "")
            groups.setdefault(parent, []).append(f"{last} as {alias}" if alias else last)
        return "\n".join(f"{indent}from {p} import {', '.join(ns)}" for p, ns in groups.items())
    pattern = re.compile(r"^([ \t]*)from (enspipe(?:\.[\w.]+)?) import (\([^)]*\)|[^\n#]+?)[ \t]*$", re.M)
    return pattern.sub(lambda m: fix(m) if any(f"{m.group(2)}.{n.split(' as ')[0].strip()}" in modules
                                              for n in m.group(3).strip("()").replace("\n", " ").split(","))
                       else m.group(0), text)


def absolute_relatives(text: str, module: str, is_package: bool, moved: bool, modules: dict[str, str]) -> str:
    """`from .x import` / `from ..x import` in module `module` (its old name) -> `from enspipe.... import`,
    where the file or what it imports moved."""
    package = module.split(".") if is_package else module.split(".")[:-1]

    def fix(m: re.Match) -> str:
        target = ".".join(package[:len(package) - (len(m.group(2)) - 1)] + ([m.group(3)] if m.group(3) else []))
        if not moved and target not in modules and not any(f"{target}.{n.split(' as ')[0].strip()}" in modules
                                                           for n in m.group(4).strip("()").split(",")):
            return m.group(0)
        return f"{m.group(1)}from {target} import {m.group(4)}"
    return re.sub(r"^([ \t]*)from (\.+)([\w.]*) import (\([^)]*\)|[^\n]*)", fix, text, flags=re.M)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        return print(__doc__.splitlines()[0], file=sys.stderr) or 2
    modules, paths = read_map(argv[0])
    new_to_old = {new: old for old, new in paths.items()}
    for name in argv[1:]:
        path = Path(name)
        text = original = path.read_text()
        rel = (path.resolve().relative_to(Path.cwd()) if path.is_absolute() else path).as_posix()
        if rel.startswith("pipeline/") and rel.endswith(".py"):
            old = new_to_old.get(rel, rel)
            dotted = "enspipe." + old[len("pipeline/"):-len(".py")].replace("/", ".")
            text = absolute_relatives(text, dotted.removesuffix(".__init__"), dotted.endswith(".__init__"),
                                      old != rel, modules)
        text = split_from_package(text, modules)
        text = sub_all(text, modules, r"(?![\w])")
        text = sub_all(text, paths, r"(?![\w.])")
        if text != original:
            path.write_text(text)
            print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
