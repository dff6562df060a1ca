"""Issue 25, item 7: a job spec's includes are parsed once per file, and capped.

A diamond (each level's two files both include both files of the next level) reaches the
bottom along 2^depth paths; parsing per path made 24 levels ~2^24 parses (hours, tens of GiB).
The oracle is the count of files, known from how the test builds them."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from enspipe.jobs import spec as jobspec
from enspipe.util.errors import ConfigError
from enspipe.jobs import load_job

from .processes import ENV, REPO

LEAF = """
[job]
name = "diamond"

[data]
dataset = "digits"
train_limit = 64

[models.static]
arch = "D"
seed = 1
"""


def _diamond(root: Path, depth: int) -> Path:
    """top.toml -> {a1, b1} -> {a2, b2} -> ... -> {a_depth, b_depth} -> leaf.toml: 2*depth + 2 files."""
    (root / "leaf.toml").write_text(LEAF)
    below = ["leaf.toml"]
    for level in range(depth, 0, -1):
        for side in "ab":
            (root / f"{side}{level}.toml").write_text(f"[job]\ninclude = {below!r}\n\n[models.m{level}{side}]\narch = \"D\"\n"
                                                       f"seed = {level}\n")
        below = [f"a{level}.toml", f"b{level}.toml"]
    (root / "top.toml").write_text(f"[job]\nname = \"diamond\"\ninclude = {below!r}\n")
    return root / "top.toml"


def test_a_diamond_of_includes_parses_each_file_once(tmp_path, monkeypatch):
    depth = 6
    top = _diamond(tmp_path, depth)
    parses = []
    real = tomllib.loads
    monkeypatch.setattr(jobspec.tomllib, "loads", lambda text, **kw: parses.append(text) or real(text, **kw))
    job = load_job(top)
    assert len(parses) == 2 * depth + 2  # per path it was 2^(depth+1) - 1 + ... = 127 + 1 here
    # Every file's tables arrive once, whatever the number of paths to it.
    assert {s.name for s in job.steps} == {"static", *(f"m{lvl}{side}" for lvl in range(1, depth + 1) for side in "ab")}


def test_a_diamond_of_24_levels_loads_at_once(tmp_path):
    """The issue's case: 50 small files. A generous timeout, far above the ~0.1 s it takes;
    per path it was ~9 hours."""
    top = _diamond(tmp_path, 24)
    r = subprocess.run([sys.executable, "-c", "import sys; from enspipe.jobs import load_job; "
                        "print(len(load_job(sys.argv[1]).steps))", str(top)],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == 1 + 2 * 24


def test_includes_are_capped(tmp_path):
    n = jobspec.MAX_INCLUDES + 5
    (tmp_path / f"c{n}.toml").write_text(LEAF)
    for i in range(n - 1, -1, -1):
        (tmp_path / f"c{i}.toml").write_text(f"[job]\ninclude = [\"c{i + 1}.toml\"]\n")
    with pytest.raises(ConfigError, match=f"includes more than {jobspec.MAX_INCLUDES} files"):
        load_job(tmp_path / "c0.toml")


def test_an_include_loop_is_still_found(tmp_path):
    (tmp_path / "a.toml").write_text('[job]\ninclude = ["b.toml"]\n')
    (tmp_path / "b.toml").write_text('[job]\ninclude = ["c.toml", "a.toml"]\n')
    (tmp_path / "c.toml").write_text(LEAF)
    with pytest.raises(ConfigError, match="include loop: a.toml -> b.toml -> a.toml"):
        load_job(tmp_path / "a.toml")
