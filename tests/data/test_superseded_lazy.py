"""A source's superseded fingerprints (the old-order fingerprints that let a store of the old
order be refused with what to do) are computed only when a store's fingerprint does not
match: building a dataset and reading a matching store hash the files once, not twice.
Counted by wrapping `_fingerprint`; the oracle for the refusal is the fingerprint the package
itself wrote before the order changed (tests/fixtures/legacy_imagefolder)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture
def counted(monkeypatch):
    """The number of fingerprints imagefolder sources compute."""
    from enspipe.data import imagefolder

    calls = []
    real = imagefolder._fingerprint

    def counting(**kw):
        calls.append(kw.get("order"))
        return real(**kw)

    monkeypatch.setattr(imagefolder, "_fingerprint", counting)
    return calls


def _legacy(tmp_path: Path):
    sys.path.insert(0, str(FIXTURES))
    from legacy_imagefolder import IMAGE_SIZE, stamp

    root = tmp_path / "legacy"
    shutil.copytree(FIXTURES / "legacy_imagefolder", root)
    stamp(root / "data")
    (store,) = root.glob("stores/*/*/*.zarr")
    return root / "data", store, IMAGE_SIZE


def test_a_dataset_build_and_a_matching_store_hash_the_files_once(tmp_path, counted):
    from enspipe.data import create_dataset
    from enspipe.models import create_model, save_model
    from enspipe.precompute import PrecomputeConfig, precompute
    from enspipe.stores import open_store
    from enspipe.stores.verify import check_against

    data, _, size = _legacy(tmp_path)
    ds = create_dataset(f"imagefolder:{data}", image_size=size)
    assert counted == ["class-interleaved"]  # the canonical order only
    model = create_model("D", num_classes=3, input_size=(3, size, size)).eval()
    save_model(model, tmp_path / "run")
    (path,) = precompute(PrecomputeConfig(model=str(tmp_path / "run"), dataset=f"imagefolder:{data}",
                                          image_size=size, out=str(tmp_path / "stores"), device="cpu",
                                          attacks=("fgsm",), shard_size=4, batch_size=4))
    counted.clear()
    check_against(open_store(path), ds)  # a store of this order: its fingerprint matches
    assert counted == [] and "superseded" not in vars(ds)


def test_an_old_order_store_computes_them_once_and_is_refused(tmp_path, counted):
    from enspipe.data import create_dataset
    from enspipe.util.errors import StoreError
    from enspipe.stores import open_store
    from enspipe.stores.verify import check_against

    data, store, size = _legacy(tmp_path)
    ds = create_dataset(f"imagefolder:{data}", image_size=size)
    counted.clear()
    reader = open_store(store)
    for _ in range(2):
        with pytest.raises(StoreError, match="class-sorted file order.*recompute it with `enspipe precompute`"):
            check_against(reader, ds)
    assert counted == [None]  # the old order's one fingerprint, computed on the first refusal only
    assert reader.identity.dataset["fingerprint"] in ds.superseded


def test_a_wds_source_builds_with_one_fingerprint_and_computes_the_old_one_when_asked(tmp_path, monkeypatch):
    from enspipe.data import create_dataset, wds
    from test_data import write_shards

    calls = []
    real = wds._fingerprint
    monkeypatch.setattr(wds, "_fingerprint", lambda **kw: calls.append(kw.get("order")) or real(**kw))
    write_shards(tmp_path / "rgb")
    ds = create_dataset(f"wds:{tmp_path / 'rgb' / 'train-{000000..000001}.tar'}")
    assert calls == ["class-interleaved"]
    old = ds.superseded
    assert calls == ["class-interleaved", None] and ds.superseded is old  # asked twice, computed once
    (fp,) = old
    assert fp != ds.fingerprint and len(fp) == 64
