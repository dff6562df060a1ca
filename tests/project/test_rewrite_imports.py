"""tools/rewrite_imports.py rewrites every form of a reference to a moved module or file, as the
lead runs it over code written against the old layout. Oracle: the rewritten text written out
by hand below."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

MAP = """\
# a comment, then moves
enspipe.errors enspipe.util.errors
enspipe.jobspec enspipe.jobs.spec
enspipe.stores.wds_store enspipe.stores.wds.store
pipeline/train.py pipeline/train/__init__.py
tests/test_first_hour.py tests/cli/test_newcomer_mistakes.py
"""

OLD_TEST = '''\
import enspipe.errors
from enspipe.errors import ConfigError
from enspipe import errors, jobspec as js, train
from enspipe.stores import wds_store
monkeypatch.setattr("enspipe.jobspec.load_job", fake)
Mutation("x", "bug", "pipeline/train.py", "a", "b", ("tests/test_first_hour.py::test_it",))
keep = "enspipe.errorsx and pipeline/train.pyc and tests/test_first_hour.pyx"
'''
NEW_TEST = '''\
import enspipe.util.errors
from enspipe.util.errors import ConfigError
from enspipe.util import errors
from enspipe.jobs import spec as js
from enspipe import train
from enspipe.stores.wds import store as wds_store
monkeypatch.setattr("enspipe.jobs.spec.load_job", fake)
Mutation("x", "bug", "pipeline/train/__init__.py", "a", "b", ("tests/cli/test_newcomer_mistakes.py::test_it",))
keep = "enspipe.errorsx and pipeline/train.pyc and tests/test_first_hour.pyx"
'''

# A module that moved (stores/wds_store.py -> stores/wds/store.py) keeps its relative imports'
# meaning: they are resolved against its old place and written absolute.
OLD_MOVED = '''\
from .base import StoreReader
from . import manifest
from .wds_bounds import max_tar_bytes
'''
NEW_MOVED = '''\
from enspipe.stores.base import StoreReader
from enspipe.stores import manifest
from enspipe.stores.wds_bounds import max_tar_bytes
'''
# One that did not move keeps its relative imports, except those naming a moved module.
OLD_STAYED = '''\
from .base import StoreReader
from .wds_store import WdsReader
from . import wds_store, manifest
'''
NEW_STAYED = '''\
from .base import StoreReader
from enspipe.stores.wds.store import WdsReader
from enspipe.stores.wds import store as wds_store
from enspipe.stores import manifest
'''


def test_every_form_of_reference_is_rewritten(tmp_path):
    (tmp_path / "map.txt").write_text(MAP)
    files = {"tests/test_x.py": (OLD_TEST, NEW_TEST), "pipeline/stores/wds/store.py": (OLD_MOVED, NEW_MOVED),
             "pipeline/stores/open.py": (OLD_STAYED, NEW_STAYED)}
    for name, (old, _) in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(old)
    r = subprocess.run([sys.executable, str(REPO / "tools" / "rewrite_imports.py"), "map.txt", *files],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted(files)
    for name, (_, new) in files.items():
        assert (tmp_path / name).read_text() == new, name


def test_the_regroup_map_applied_leaves_no_old_path_behind():
    """Every module the map moved away is gone from pipeline/, and its new place exists."""
    for line in (REPO / "tools" / "regroup_map.txt").read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) != 2 or not parts[0].startswith(("enspipe.", "pipeline/", "tests/")):
            continue
        old, new = parts
        if old.startswith("enspipe."):
            if old.rpartition(".")[2].startswith("_") and not old.endswith("_callable"):
                continue   # an attribute that moved (a monkeypatch target), not a module
            old = "pipeline/" + old[len("enspipe."):].replace(".", "/") + ".py"
            new = "pipeline/" + new[len("enspipe."):].replace(".", "/") + ".py"
        assert not (REPO / old).exists(), old
        assert (REPO / new).exists(), new
