"""Shared fixtures: the real MNIST files and small trained models (built once per session)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# shared/ lies beside the checkout (read-only) on developer machines and in CI.
MNIST_ROOT = Path(os.environ.get("ENSPIPE_TEST_MNIST", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A data root holding MNIST/raw/*.gz (read-only); skips when the files are absent."""
    if not (MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST files not found under {MNIST_ROOT} (set ENSPIPE_TEST_MNIST)")
    return MNIST_ROOT


def _train(tmp_path_factory, name: str, **kw) -> Path:
    from enspipe.train import TrainConfig, train

    run = tmp_path_factory.mktemp(name)
    train(TrainConfig(**kw), run)
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
