"""How `pytest -n 2` hands out the suite (tests/xdist_order.py): the longest units first, and a
module's module-scoped fixture set up once, on one worker, not once per worker.

The oracles: the order written out by hand from the durations table, and, in a pytest run of
its own on two workers, the fixture's setups counted by the fixture itself (xdist's default
scheduler sends such a module's tests to both workers: two setups)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

from conftest import REPO
from xdist_order import MEASURED_S, longest_first

SLOW = "tests/stores/test_object_store.py::test_precompute_on_dask_to_s3_then_train_is_bit_identical_to_local_disk"


def _item(nodeid: str, **scopes: str):
    """An item as longest_first reads it: its node id and its fixtures' scopes (and where they are defined)."""
    defs = {name: [SimpleNamespace(scope=scope, baseid=nodeid.split("::")[0] if scope != "function" else "")]
            for name, scope in scopes.items()}
    return SimpleNamespace(nodeid=nodeid, _fixtureinfo=SimpleNamespace(name2fixturedefs=defs))


def test_units_run_longest_first_and_a_groups_tests_stay_together():
    assert MEASURED_S[SLOW] > 10
    m = "tests/x/test_m.py"
    items = [_item("tests/a/test_a.py::test_one", tmp_path="function"),
             _item(f"{m}::test_1", data="module"), _item("tests/a/test_a.py::test_two"),
             _item(f"{m}::test_2", data="module"), _item(f"{m}::test_3", data="module", tmp_path="function"),
             _item("tests/reliability/test_r.py::test_r1"), _item("tests/bench/test_b.py::test_b", bench_gpu_small="session"),
             _item("tests/reliability/test_s.py::test_s1"), _item(SLOW)]
    ordered, groups = longest_first(items)
    # SLOW (58 s); the module's three tests (0.9 s); the reliability package's two (0.6 s); then
    # the single tests in their collection order.
    assert [i.nodeid for i in ordered] == [
        SLOW, f"{m}::test_1", f"{m}::test_2", f"{m}::test_3", "tests/reliability/test_r.py::test_r1",
        "tests/reliability/test_s.py::test_s1", "tests/a/test_a.py::test_one", "tests/a/test_a.py::test_two",
        "tests/bench/test_b.py::test_b"]
    assert sorted(groups.values()) == sorted(["bench_gpu_small", m, m, m, "tests/reliability/", "tests/reliability/"])


MODULE = '''
import os

import pytest


@pytest.fixture(scope="module")
def built():
    with open(os.environ["SETUPS"], "a") as f:
        f.write("set up\\n")


@pytest.mark.parametrize("i", range(6))
def test_uses_the_module_fixture(built, i):
    pass


@pytest.mark.parametrize("i", range(6))
def test_alone(i):
    pass
'''


def test_two_workers_set_up_a_module_fixture_once(tmp_path):
    work = tmp_path / "suite" / "tests"
    work.mkdir(parents=True)
    for helper in ("conftest.py", "loopback.py", "xdist_order.py"):
        shutil.copy(REPO / "tests" / helper, work / helper)
    (work / "test_module.py").write_text(MODULE)
    setups = tmp_path / "setups.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS" and not k.startswith("PYTEST_XDIST_")}
    env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", SETUPS=str(setups))  # plugins that import zarr: seconds each
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "xdist", "-n", "2",
                        "--rootdir", str(work), str(work)], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "12 passed" in r.stdout, r.stdout + r.stderr
    assert setups.read_text() == "set up\n"


def test_every_measured_duration_names_a_test_that_exists():
    """A renamed test would silently count DEFAULT_S and sort to the tail: the case the ordering
    exists to prevent. Each key's file must define its function (a parameter id, if given, is
    the test's own business)."""
    for key in MEASURED_S:
        path, name = key.split("::", 1)
        source = (REPO / path).read_text()
        assert f"def {name.split('[', 1)[0]}(" in source, key
