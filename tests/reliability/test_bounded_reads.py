"""Issue 25, items 4, 6 and 10 (the tar part): what a forged store can make `verify` and the
trainer read.

- A manifest claiming 10^9 shards (consistently: num_samples, identity and identity_key
  re-derived, as a forger can) is refused before any per-shard loop. Refusal is judged by a
  subprocess timeout far above normal (60 s against a loop over 10^9 shards that never ends
  in a test's time), never by a timing assertion.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from enspipe.stores.manifest import StoreIdentity

from .processes import enspipe, error_line
from .reference import train_args


def _claim_shards(store: Path, num_shards: int, *, complete: bool) -> None:
    m = json.loads((store / "manifest.json").read_text())
    n = num_shards * m["shard_size"]
    m["identity"]["dataset"]["num_samples"] = n
    m["identity_key"] = StoreIdentity.from_dict(m["identity"]).key()
    m["num_samples"], m["num_shards"], m["complete"] = n, num_shards, complete
    (store / "manifest.json").write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize("suffix", [".zarr", ".wds"])
@pytest.mark.parametrize("complete", [True, False], ids=["complete", "incomplete"])
def test_a_manifest_claiming_a_billion_shards_is_refused_at_once(ref, tmp_path, suffix, complete):
    store = tmp_path / ref.paths[suffix].name
    shutil.copytree(ref.paths[suffix], store)
    _claim_shards(store, 10**9, complete=complete)
    r = enspipe("verify", store, timeout=60)
    assert r.returncode == 1, r.stderr
    text = r.stdout + r.stderr
    assert "Traceback" not in text
    assert "1000000000 shards, above the limit of" in text and "ENSPIPE_MAX_SHARDS" in text, text


def test_train_refuses_a_billion_shard_store_at_once(ref, tmp_path):
    store = tmp_path / ref.paths[".zarr"].name
    shutil.copytree(ref.paths[".zarr"], store)
    _claim_shards(store, 10**9, complete=True)
    args = [a if a != ref.paths[".zarr"] else store for a in train_args(ref, tmp_path / "run")]
    r = enspipe(*args, timeout=60)
    assert r.returncode == 1
    line = error_line(r.stderr)
    assert str(store) in line and "above the limit of" in line, line
    assert not (tmp_path / "run" / "model.safetensors").exists()
