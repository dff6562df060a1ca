"""The package's layout keeps its promises: imports run one way between floors, no module imports
itself back through a cycle, every module over 400 lines says why at its top, and README's layout
section names files and folders that exist. Read from the source with `ast` (nothing imported)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "pipeline"

# Floors, lowest first: a module may import (at module level) its own floor and the floors below.
FLOORS = [
    {"(root)", "util", "config"},                      # ground: helpers, option declarations
    {"attack_records", "precision", "report"},         # torch-free vocabularies; result and metrics files
    {"configs"},                                       # the stage configs (torch-free)
    {"data", "models", "attacks", "sampling", "stores", "paths"},  # the core, and storage beside it
    {"stream"},                                        # clean images joined with stored directions
    {"train", "precompute", "evaluate", "diagnostics"},  # the stages
    {"jobs", "cli", "__main__"},                       # what calls the stages
]
CORE, STORAGE, STAGES = {"data", "models", "attacks"}, {"stores"}, {"train", "precompute", "evaluate", "diagnostics"}


def _modules() -> dict[str, Path]:
    found = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        found[".".join(["enspipe", *(parts[:-1] if parts[-1] == "__init__" else parts)])] = p
    return found


MODULES = _modules()


def _imports(module: str, *, module_level: bool) -> set[str]:
    """The enspipe modules `module` imports (at module level only, or anywhere in it)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = set()
    for node in (tree.body if module_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _group(module: str) -> str:
    return module.split(".")[1] if "." in module else "(root)"


def _floor(module: str) -> int:
    return next(i for i, groups in enumerate(FLOORS) if _group(module) in groups)


def test_every_module_sits_on_a_floor():
    assert not [m for m in MODULES if not any(_group(m) in g for g in FLOORS)]


def test_module_level_imports_never_go_up_a_floor():
    upward = [f"{m} -> {t}" for m in MODULES for t in _imports(m, module_level=True) if _floor(t) > _floor(m)]
    assert not upward, upward


def test_no_module_level_import_cycles():
    graph = {m: _imports(m, module_level=True) for m in MODULES}
    # A package imports its own submodules (its face); a submodule importing its package back is
    # the cycle this looks for, so package -> own submodule edges stay in.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_core_knows_no_storage_and_stores_know_no_producer_and_report_no_stage():
    """README's rules, for every import (those inside functions too)."""
    bad = []
    for m in MODULES:
        targets = {_group(t) for t in _imports(m, module_level=False)}
        g = _group(m)
        if g in CORE and targets & (STORAGE | STAGES | {"jobs", "cli", "stream"}):
            bad.append(f"{m} -> {sorted(targets & (STORAGE | STAGES | {'jobs', 'cli', 'stream'}))}")
        if g in STORAGE and targets & (STAGES | {"jobs", "cli", "stream"}):
            bad.append(f"{m} -> {sorted(targets & (STAGES | {'jobs', 'cli', 'stream'}))}")
        if g == "report" and targets & (STAGES | {"jobs", "cli", "stream", "models", "attacks", "data"}):
            bad.append(f"{m} -> {sorted(targets & (STAGES | {'jobs', 'cli', 'stream', 'models', 'attacks', 'data'}))}")
        if g in STAGES and targets & (STAGES - {g}):
            bad.append(f"{m} -> {sorted(targets & (STAGES - {g}))}")
    assert not bad, bad


def test_every_module_over_400_lines_says_why_at_its_top():
    """The project's rule: no module over 400 lines without its reason in its top docstring."""
    silent = []
    for m, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > 400:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if not re.search(r"over 400 lines", doc, re.I):
                silent.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
    assert not silent, silent


def _layout_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_the_readme_layout_names_what_exists():
    """Every file or folder README's layout section names exists (under pipeline/ for the lines
    inside it, at the repository root for the others), and every module and package of pipeline/
    is named there."""
    missing, named = [], set()
    inside = False
    for line in _layout_block().splitlines():
        if not line.strip():
            continue
        top = not line.startswith(" ")
        if not top and line.startswith("   "):
            continue                                  # a description's continuation line
        first = line.strip().split("   ")[0].strip()
        if top:
            inside = first == "pipeline/"
            if not (REPO / first).exists():
                missing.append(first)
            continue
        if not inside:
            continue
        for name in first.split():
            if not re.fullmatch(r"[\w./]+", name):
                continue
            named.add(name.rstrip("/"))
            if not (PKG / name).exists():
                missing.append(f"pipeline/{name}")
    assert not missing, missing
    # Every top-level module, package and subpackage of pipeline/ is in the section (a subpackage
    # may be named in its package's description: "wds/").
    present = {p.relative_to(PKG).as_posix() for p in PKG.iterdir() if not p.is_symlink()  # the schemas' link
               and ((p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists()))}
    present |= {p.parent.relative_to(PKG).as_posix() for p in PKG.glob("*/*/__init__.py")}
    block = _layout_block()
    unnamed = {n for n in present - named if not ("/" in n and f" {n.rsplit('/', 1)[1]}/" in block)}
    assert not unnamed, sorted(unnamed)


TESTS = REPO / "tests"


def test_tests_sit_in_folders_by_floor_with_unique_names():
    """Test files live in folders (tests/train/, tests/stores/, ...; tests/reliability is a package)
    and no two share a basename: the suite imports them by basename from every folder."""
    at_top = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert not at_top, at_top
    names = [p.name for p in TESTS.rglob("test_*.py") if "fixtures" not in p.parts]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_command_line_tests_share_one_runner():
    """Outside tests/reliability (whose processes.py is the machinery), a test runs `enspipe`
    through tests/cli_runner.py: no test spells its own `python -m enspipe` or imports the
    reliability processes directly."""
    own = []
    for p in TESTS.rglob("test_*.py"):
        if "reliability" in p.parts or p == Path(__file__).resolve():
            continue
        text = p.read_text()
        for bad in ('sys.executable, "-m", "enspipe"', "from reliability.processes import"):
            if bad in text:
                own.append(f"{p.relative_to(REPO)}: {bad}")
    assert not own, own
