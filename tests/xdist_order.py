"""How `pytest -n 2` hands the suite to its workers: longest work first, fixtures kept together.

xdist's default (`--dist load`) sends each worker chunks of ~100 consecutive tests, so where a
60 s test sits in the collection decides whether it ends the run alone on one worker while the
other idles. With `-n` and no `--dist` of the caller's, the suite runs `--dist loadscope`
instead: each worker holds at most a few tests at a time and asks for more as it finishes,
and the workers (only they collect under xdist) order the collection longest first, by the
durations measured below. A unit that must stay on one worker stays together:

- every test of tests/reliability/ (its package fixtures: the reference store and run, and the
  zygote the package closes when its last test ends: split, each worker would rebuild them,
  and every return to the package after another test would rebuild them again);
- every test of a module that uses a module-scoped fixture (one setup, not one per worker);
- every test of an expensive session fixture that only a few tests use (NARROW).

A plain `pytest` (no -n) is untouched: same order, same fixtures.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

CHOSEN = pytest.StashKey[bool]()

# Seconds per test (setup included), from `pytest -q -n 2 --durations=60` on 2 quiet cores (the
# run of 2026-12-07 before this ordering). Only the order they give matters: an estimate that
# is off by half changes little. A test not named here counts DEFAULT_S. A key without
# parameters counts for each case of the test that no key names with its parameters.
MEASURED_S = {
    "tests/stores/test_object_store_cluster.py::test_readme_cluster_commands_run_a_dask_cluster_on_s3_and_train_on_two_nodes": 61,
    "tests/stores/test_object_store.py::test_precompute_on_dask_to_s3_then_train_is_bit_identical_to_local_disk": 58,
    "tests/project/test_readme.py::test_the_api_block_makes_runs_and_stores": 52,
    "tests/jobs/test_imagenet_table_jobs.py::test_the_stores_are_made_once_and_shared": 45,
    "tests/bench/test_benchmarks_smoke.py::test_benchmark_smoke_run[bench_peers.py]": 37,
    # bench_object_store's smoke run was 14 s before its --quick also ran a throttled pass (~10 s
    # more, measured by that change under load); re-measure with --durations when a smoke
    # run's arguments change.
    "tests/bench/test_benchmarks_smoke.py::test_benchmark_smoke_run[bench_object_store.py]": 24,
    "tests/bench/test_benchmarks_smoke.py::test_benchmark_smoke_run[bench_precompute.py]": 10,
    "tests/bench/test_benchmarks_smoke.py::test_benchmark_smoke_run": 5,  # the other scripts
    "tests/bench/test_bench_gpu.py::test_bench_gpu_small_precompute": 25,
    "tests/stores/test_object_store_cluster.py::test_a_precompute_to_s3_killed_after_its_first_shards_resumes_without_rewriting_them": 16,
    "tests/attacks/test_attack_records.py::test_a_storable_attack_is_one_function_and_one_record": 13,
    "tests/cli/test_every_model.py::test_killed_mid_epoch_resumes_to_the_uninterrupted_weights": 11,
    "tests/project/test_readme.py::test_the_lightning_recipe_trains": 11,
    "tests/project/test_readme.py::test_the_own_loop_recipe_trains": 10,
    "tests/precompute/test_precompute.py::test_two_local_workers_equal_in_process": 9,
    "tests/cli/test_cli_surface.py::test_sigterm_stops_precompute_with_the_same_command": 9,
    "tests/reliability/test_security.py::test_files_are_created_with_the_process_umask": 9,
    "tests/cli/test_every_model.py::test_diagnose_a_batchnorm_model_from_the_cli": 9,
    "tests/precompute/test_precompute.py::test_worker_killed_mid_run_still_completes": 9,
    "tests/precompute/test_precompute.py::test_bad_input_is_one_line_and_no_complete_store": 8,
    "tests/stream/test_batch_mixing.py::test_the_trainers_batches_mix_classes_as_iid_draws[ens-adv-4-32-2]": 8,
    "tests/stream/test_batch_mixing.py::test_the_trainers_batches_mix_classes_as_iid_draws": 2,  # 3-4 s with workers
    "tests/train/test_ddp.py::test_two_gloo_ranks_train_the_same_weights_as_one_process_on_the_global_batches": 8,
    "tests/stores/test_object_store_cluster.py::test_a_denied_write_or_read_is_one_line_naming_the_url": 7,
    "tests/cli/test_every_model.py::test_a_job_of_batchnorm_models_on_an_imagefolder": 7,
    "tests/train/test_train.py::test_killed_run_resumes_to_the_same_weights": 7,
    "tests/cli/test_every_model.py::test_paper_architectures_load_local_weight_files": 6,
    "tests/stores/test_object_store.py::test_bad_object_storage_input_is_one_line_naming_the_url": 6,
    "tests/precompute/test_precompute.py::test_sigkill_mid_run_then_rerun_equals_uninterrupted": 3,
    "tests/jobs/test_jobs.py::test_shipped_specs_validate_and_dry_run": 4,
}
DEFAULT_S = 0.3
NARROW = ("bench_gpu_small",)  # session fixtures (conftest.py) of a few tests each: their tests go together
PACKAGES = ("tests/reliability/",)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """`-n N` without a `--dist` of the caller's: this module's scheduler (below)."""
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", None) == "no":
        config.option.dist = "loadscope"  # what runs: a LoadScopeScheduling of this module's units
        config.stash[CHOSEN] = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Workers parse the command line again (no --dist there): tell them to order the collection
    and where to write each test's unit."""
    if node.config.stash.get(CHOSEN, False):
        folder = node.config._tmp_path_factory.getbasetemp() / "xdist-units"
        folder.mkdir(exist_ok=True)
        node.workerinput["enspipe_units"] = str(folder / f"{node.gateway.id}.json")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's loadscope scheduler (a worker asks for the next unit when it holds two tests or
    fewer), its units the ones the workers wrote, in the workers' order. (xdist's own loadgroup
    marks its groups by editing Item._nodeid, which pytest 9's node ids no longer read.)"""
    if not config.stash.get(CHOSEN, False):
        return None
    from xdist.scheduler import LoadScopeScheduling

    folder = config._tmp_path_factory.getbasetemp() / "xdist-units"

    class LongestFirst(LoadScopeScheduling):
        units: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.units is None:  # every worker has collected (and written) by now
                self.units = {}
                for path in sorted(folder.glob("*.json")):
                    try:  # a unit file missing or cut short: those tests run one by one (still correct)
                        self.units.update(json.loads(path.read_text()))
                    except (OSError, ValueError):
                        pass
            return self.units.get(nodeid, nodeid)

    config.option.loadscopereorder = False  # the workers' order, not xdist's by unit size
    return LongestFirst(config, log)


def unit_of(item: pytest.Item) -> str | None:
    """The group an item must run in (None: it may run anywhere)."""
    path = item.nodeid.split("::", 1)[0]
    for package in PACKAGES:
        if path.startswith(package):
            return package
    defs = getattr(item, "_fixtureinfo", None)
    defs = defs.name2fixturedefs if defs is not None else {}
    for name in NARROW:
        if name in defs:
            return name
    for fixturedefs in defs.values():
        fixturedef = fixturedefs[-1]
        # A module's own fixture, or a session fixture a test module defines (only it uses it).
        if fixturedef.scope == "module" or (fixturedef.scope == "session" and fixturedef.baseid.endswith(".py")):
            return path
    return None


def estimate(item: pytest.Item) -> float:
    return MEASURED_S.get(item.nodeid, MEASURED_S.get(item.nodeid.split("[", 1)[0], DEFAULT_S))


def longest_first(items: list[pytest.Item]) -> tuple[list[pytest.Item], dict[int, str]]:
    """The items regrouped into units (a group's items together, in their order) and the units
    sorted by their summed estimate, longest first (ties: collection order); and each grouped
    item's group name, by id()."""
    units: dict[str, list[pytest.Item]] = {}
    groups: dict[int, str] = {}
    for item in items:
        group = unit_of(item)
        if group is not None:
            groups[id(item)] = group
        units.setdefault(group if group is not None else f"\0{item.nodeid}", []).append(item)
    order = sorted(units.values(), key=lambda unit: -sum(map(estimate, unit)))  # stable
    return [item for unit in order for item in unit], groups


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    where = getattr(config, "workerinput", {}).get("enspipe_units")
    if not where:
        return
    ordered, groups = longest_first(items)
    Path(where).write_text(json.dumps({item.nodeid: groups[id(item)] for item in ordered if id(item) in groups}))
    items[:] = ordered
