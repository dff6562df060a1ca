"""fileio: atomic writes keep the old file on error, leave no temporary, follow the umask."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from enspipe.util.fileio import atomic_target, atomic_write, atomic_write_json


def test_replaces_whole_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    atomic_write(p, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_target(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert p.read_text() == "old\n"
    atomic_write_json(p, {"x": 1})
    assert p.read_text() == '{\n  "x": 1\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_strict_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "m.json", {"x": float("nan")}, strict=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_process_umask(tmp_path, umask, mode):
    # A fresh interpreter: the module reads the umask once, at import.
    code = ("import os, sys; os.umask(int(sys.argv[1], 8)); from enspipe.util.fileio import atomic_target, atomic_write\n"
            "atomic_write(sys.argv[2] + '/a', b'x')\n"
            # a writer that creates its file 0600 itself, as safetensors does
            "with atomic_target(sys.argv[2] + '/b') as t: os.close(os.open(t, os.O_WRONLY | os.O_CREAT, 0o600))\n")
    subprocess.run([sys.executable, "-c", code, oct(umask)[2:], str(tmp_path)], check=True)
    for name in ("a", "b"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
