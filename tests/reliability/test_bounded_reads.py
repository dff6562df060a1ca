"""Issue 25, items 4, 6 and 10 (the tar part): what a forged store can make `verify` and the
trainer read.

- A wds shard forged to hold 1.2 GiB of (sparse) source-image members, checksums forged: in a
  store whose records say it carries no source images it is refused unread; where the forger
  also claims source images, `verify` hashes it in chunks and decodes one member at a time.
  Either way its peak RSS (a subprocess's VmHWM, with only enspipe.stores imported: about
  31 MiB at rest) stays under 200 MiB -- it was the tar's size and more.
- A tar member name given twice (its checksums forged) fails `verify`.

- A manifest claiming 10^9 shards (consistently: num_samples, identity and identity_key
  re-derived, as a forger can) is refused before any per-shard loop. Refusal is judged by a
  subprocess timeout far above normal (120 s against a loop over 10^9 shards that never ends
  in a test's time), never by a timing assertion.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from enspipe.stores.manifest import StoreIdentity
from enspipe.stores.wds.store import sample_key

from .forge import forge_checksums, member, tar_members, write_tar
from .processes import ENV, REPO, enspipe, error_line
from .reference import train_args
from .sweep import full_sweep_case


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
    r = enspipe("verify", store, timeout=120)
    assert r.returncode == 1, r.stderr
    text = r.stdout + r.stderr
    assert "Traceback" not in text
    assert "1000000000 shards, above the limit of" in text and "ENSPIPE_MAX_SHARDS" in text, text


def test_train_refuses_a_billion_shard_store_at_once(ref, tmp_path):
    store = tmp_path / ref.paths[".zarr"].name
    shutil.copytree(ref.paths[".zarr"], store)
    _claim_shards(store, 10**9, complete=True)
    args = [a if a != ref.paths[".zarr"] else store for a in train_args(ref, tmp_path / "run")]
    r = enspipe(*args, timeout=120)
    assert r.returncode == 1
    line = error_line(r.stderr)
    assert str(store) in line and "above the limit of" in line, line
    assert not (tmp_path / "run" / "model.safetensors").exists()


BIG_MEMBERS, BIG_BYTES = 20, 60 << 20  # 1.2 GiB on disk, each member below the 64 MiB image cap


def _sparse_tar(tar: Path, head: list[tuple[tarfile.TarInfo, bytes]], first: int) -> None:
    """`head`'s members, then a source image (`KEY.src.jpg`) of BIG_BYTES for each of the
    BIG_MEMBERS samples after `first`, left as holes (the disk holds none of it; a reader
    that reads the tar whole holds all of it)."""
    with open(tar, "wb") as f:
        for info, data in head:
            f.write(info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))
        for i in range(BIG_MEMBERS):
            info = tarfile.TarInfo(f"{sample_key(first + 1 + i)}.src.jpg")
            info.size = BIG_BYTES
            f.write(info.tobuf(format=tarfile.GNU_FORMAT))
            f.seek(BIG_BYTES, 1)
        f.write(bytes(1024))


def _forge_record(store: Path, s: int, **fields) -> None:
    """Record the tar's real sha256 and size (hashed in chunks), and `fields` (None: removed), as a forger would."""
    tar = store / f"shard-{s:06d}.tar"
    digest = hashlib.sha256()
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    m = json.loads((store / "manifest.json").read_text())
    rec = m["shards"][f"{s:06d}"]
    rec["files"][tar.name] = {"sha256": digest.hexdigest(), "bytes": tar.stat().st_size}
    for k, v in fields.items():
        rec.pop(k, None) if v is None else rec.update({k: v})
    (store / "manifest.json").write_text(json.dumps(m, indent=2))
    (store / "shards" / f"{s:06d}.json").write_text(json.dumps(rec, sort_keys=True, indent=1) + "\n")


# The peak of this process's own memory: VmHWM, the high-water mark of the address space
# exec gave it. (ru_maxrss would not do: Linux carries it across fork and exec, so a child of
# pytest starts at pytest's ~800 MiB.)
VERIFY_RSS = """
import sys
from pathlib import Path
from enspipe.stores import verify_store
report = verify_store(sys.argv[1])
print(next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")))
print(report)
"""


@pytest.mark.parametrize("claim", [full_sweep_case("no sources", ci=True), full_sweep_case("sources claimed")])
def test_verify_of_a_forged_sparse_tar_stays_small(ref, tmp_path, claim):
    store = tmp_path / ref.paths[".wds"].name
    shutil.copytree(ref.paths[".wds"], store)
    tar = store / "shard-000001.tar"
    head = tar_members(tar)[:4]
    _sparse_tar(tar, head, int(head[0][1]))  # the first member is sample 64's index
    assert tar.stat().st_size > BIG_MEMBERS * BIG_BYTES
    # Claimed as a record written before `source_images` existed claims it: `images` alone.
    _forge_record(store, 1, **({"source_images": None} if claim == "sources claimed" else {}))
    r = subprocess.run([sys.executable, "-c", VERIFY_RSS, str(store)], capture_output=True, text=True, env=ENV,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    peak_kib, report = r.stdout.split("\n", 1)
    assert report.startswith("FAILED") and "shard 1:" in report, report
    assert int(peak_kib) < 200 * 1024, f"verify peaked at {int(peak_kib) // 1024} MiB"


def test_a_duplicate_tar_member_fails_verify(ref, tmp_path):
    store = tmp_path / ref.paths[".wds"].name
    shutil.copytree(ref.paths[".wds"], store)
    tar = store / "shard-000002.tar"
    members = tar_members(tar)
    label = next((info, data) for info, data in members if info.name.endswith(".label.cls"))
    other = b"1" if label[1] != b"1" else b"2"
    members.insert(members.index(label) + 1, member(label[0].name, other))  # the same name, another label
    write_tar(tar, members)
    forge_checksums(store, 2)
    r = enspipe("verify", store)
    assert r.returncode == 1
    assert "shard 2:" in r.stdout + r.stderr and f"{label[0].name!r} twice" in r.stdout + r.stderr, r.stdout + r.stderr
