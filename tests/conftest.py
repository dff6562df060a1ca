"""Shared fixtures: the real MNIST files and small trained models (built once per session)."""
from __future__ import annotations

import os
from pathlib import Path

# One torch/OpenMP thread per process unless the caller says otherwise: the suite's tensors are
# small, and the CLI subprocesses it starts would otherwise spin-wait against each other on a
# 2-core machine (measured here: 13.8 CPU-minutes for the suite at the default 2 threads, 10.4
# at 1). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from loopback import s3, s3_endpoint  # noqa: E402,F401 -- moto's S3 server: one for the session
from xdist_order import (  # noqa: E402,F401 -- pytest -n: longest first, fixtures kept together
    pytest_cmdline_main, pytest_collection_modifyitems, pytest_configure_node, pytest_xdist_make_scheduler)

REPO = Path(__file__).resolve().parents[1]
MNIST_RAW = Path("MNIST") / "raw"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--data-root", default=None,
                     help="Where the MNIST tests find MNIST/raw (as enspipe's --data-root).")


def mnist_candidates(data_root: str | None) -> list[Path]:
    """Where the MNIST tests look, in order: the product's own order (--data-root, then
    $ENSPIPE_DATA), then shared/ beside the checkout (developer machines and CI), then
    $ENSPIPE_TEST_MNIST."""
    found = [data_root, os.environ.get("ENSPIPE_DATA"), REPO.parent / "shared" / "data",
             os.environ.get("ENSPIPE_TEST_MNIST")]
    return [Path(p).expanduser() for p in found if p and p != "skip"]


def has_mnist(root: Path) -> bool:
    """Both splits' files, extracted or gzipped, as enspipe's MNIST reader accepts them."""
    raw = root / MNIST_RAW
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return all((raw / stem).is_file() or (raw / f"{stem}.gz").is_file() for stem in stems)


@pytest.fixture(scope="session")
def mnist_root(request: pytest.FixtureRequest) -> Path:
    """A data root holding MNIST/raw/*.gz (read-only). Missing files fail the test: CI has
    shared/data beside the checkout, so a skip there would hide a broken setup. Only
    ENSPIPE_TEST_MNIST=skip turns the failure into a skip, on a machine without MNIST."""
    candidates = mnist_candidates(request.config.getoption("--data-root"))
    for root in candidates:
        if has_mnist(root):
            return root
    where = ", ".join(map(str, candidates)) or "nowhere"
    if os.environ.get("ENSPIPE_TEST_MNIST") == "skip":
        pytest.skip(f"real MNIST files not found (looked in {where}); ENSPIPE_TEST_MNIST=skip")
    pytest.fail(f"real MNIST files ({MNIST_RAW}/*-ubyte[.gz]) not found in {where}: pass --data-root, set ENSPIPE_DATA or "
                "ENSPIPE_TEST_MNIST, or set ENSPIPE_TEST_MNIST=skip to skip the MNIST tests", pytrace=False)


def _train(tmp_path_factory, name: str, **kw) -> Path:
    """A run dir trained once per test run. Under pytest-xdist the workers share it: the first
    to get here trains it into the folder beside their basetemps (one per run), the others wait
    and read it (it is never written after; a session fixture on one worker did the same)."""
    from enspipe.train import TrainConfig, train

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        run = tmp_path_factory.mktemp(name)
        train(TrainConfig(**kw), run)
        return run
    import shutil

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "xdist-shared"
    shared.mkdir(exist_ok=True)
    run, done = shared / f"{name}0", shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(run, ignore_errors=True)  # a worker that failed mid-training left it
            train(TrainConfig(**kw), run)
            done.touch()
    return run


@pytest.fixture(scope="session")
def digits_static(tmp_path_factory) -> Path:
    """A run dir of architecture D trained clean on digits (a fast static model)."""
    return _train(tmp_path_factory, "static-D", model="D", dataset="digits", epochs=3, seed=1,
                  device="cpu", log_every=1000)


@pytest.fixture(scope="session")
def digits_static2(tmp_path_factory) -> Path:
    """A second static model (architecture B*, another seed) trained clean on digits."""
    return _train(tmp_path_factory, "static-Bstar", model="B*", dataset="digits", epochs=2, seed=2,
                  device="cpu", log_every=1000)


@pytest.fixture(scope="session")
def bench_gpu_small(tmp_path_factory):
    """One `benchmarks/bench_gpu.py --small --part all` run (both halves on the CPU), shared by
    the tests that read its results (test_bench_gpu*.py, the benchmark smoke test): one run of
    its data, models and stores instead of one per test. Returns (out dir, the finished process)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("bench-gpu-small")
    env = {**os.environ, "ENSPIPE_PROGRESS": "0"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--small", "--part", "all",
                        "--out", str(out)], capture_output=True, text=True, timeout=1200, env=env, cwd=out)
    return out, r


@pytest.fixture(autouse=True)
def _torch_threads_policy():
    """The suite's one-thread policy (above) holds after every test: a test or fixture that
    changes torch's thread count must put it back, or every later test in the process runs
    under its setting (two session fixtures once left it at 2 for the rest of the suite)."""
    yield
    import sys

    torch = sys.modules.get("torch")
    want = os.environ.get("OMP_NUM_THREADS", "")
    if torch is None or not want.isdigit():
        return
    got = torch.get_num_threads()
    if got != int(want):
        torch.set_num_threads(int(want))
        pytest.fail(f"torch.set_num_threads({got}) was left set by this test or a fixture it set up; "
                    f"the suite runs at OMP_NUM_THREADS={want}: restore it", pytrace=False)


_SMOKE_LINES: list[str] = []


@pytest.fixture
def smoke_log():
    """Adds one line to the session summary's "benchmark smoke runs" section (shown even when
    every test passes: the CI log's record of each benchmark's smoke run)."""
    return _SMOKE_LINES.append


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _SMOKE_LINES:
        terminalreporter.section("benchmark smoke runs")
        for line in _SMOKE_LINES:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus) -> None:
    """End the zygote that command-line tests outside tests/reliability may have started
    (reliability.processes.run_cli); its own package fixture ends it after those tests."""
    import sys

    processes = sys.modules.get("reliability.processes")
    if processes is not None:
        processes.shutdown()
