"""Damaged and hostile artefacts, made the way an attacker or a failing disk would: pickles
that announce their unpickling, hand-made tars with hostile members, stores with checksums
forged to match, and the scene of files that bad invocations point at."""
from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import torch

from enspipe.stores.manifest import sha256_file

from .reference import Ref, RefRun

# --- Pickles and tars --------------------------------------------------------------------------

class Pwn:
    """Unpickling this creates `marker`: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tar_members(tar: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar) as tf:
        return [(m, tf.extractfile(m).read() if m.isreg() else b"") for m in tf]


def write_tar(tar: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    tar.write_bytes(buf.getvalue())


def member(name: str, data: bytes = b"", *, link: str | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
    else:
        info.size = len(data)
    return info, data


def forge_checksums(store: Path, s: int) -> None:
    """What a hostile producer would do: record the tampered files' sha256 and size, in the
    manifest and in the shard's completion record, so only deeper checks can notice."""
    mpath = store / "manifest.json"
    manifest = json.loads(mpath.read_text())
    rec = manifest["shards"][f"{s:06d}"]
    for rel in rec["files"]:
        rec["files"][rel] = {"sha256": sha256_file(store / rel), "bytes": (store / rel).stat().st_size}
    mpath.write_text(json.dumps(manifest, indent=2))
    (store / "shards" / f"{s:06d}.json").write_text(json.dumps(rec, sort_keys=True, indent=1) + "\n")


def flip(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def unwrite_shard_but_claim_complete(store: Path, s: int) -> None:
    """A store missing shard s whose manifest has been edited to claim completion."""
    manifest = json.loads((store / "manifest.json").read_text())
    rec = manifest["shards"].pop(f"{s:06d}")
    for rel in rec["files"]:
        (store / rel).unlink()
    (store / "shards" / f"{s:06d}.json").unlink()
    manifest["complete"] = True
    (store / "manifest.json").write_text(json.dumps(manifest, indent=2))


def hostile_tar(make: Callable[[Path], tuple[tarfile.TarInfo, bytes]], s: int = 1) -> Callable:
    """Insert one hostile member (`make(scratch)`) into shard s's tar (after the first sample's
    members), forged."""
    def mutate(store: Path, scratch: Path) -> None:
        tar = store / f"shard-{s:06d}.tar"
        members = tar_members(tar)
        members.insert(3, make(scratch))
        write_tar(tar, members)
        forge_checksums(store, s)
    return mutate


def truncated_member_forged(store: Path, scratch: Path) -> None:
    tar = store / "shard-000002.tar"
    members = tar_members(tar)
    # Cut the tar inside the data of a member near its middle.
    offset = members[len(members) // 2][0].offset_data + 10
    tar.write_bytes(tar.read_bytes()[:offset])
    forge_checksums(store, 2)


def keys_swapped(store: Path, scratch: Path) -> None:
    p = store / "keys" / "000001.json"
    doc = json.loads(p.read_text())
    doc["keys"][0], doc["keys"][1] = doc["keys"][1], doc["keys"][0]
    p.write_text(json.dumps(doc, sort_keys=True) + "\n")


ZARR_SHARD_FILES = ("direction/c/{}/0/0/0", "logits/c/{}/0", "label/c/{}")


def zarr_shard_copied_over(store: Path, src: int, dst: int, *, keys: bool) -> None:
    """Shard src's array files of a zarr store copied over shard dst's: valid data of the
    wrong samples. With `keys`, its keys file too, its shard fields edited to pass for dst's.
    The records are left alone (forge_checksums(store, dst) is a rewriter's next step)."""
    for rel in ZARR_SHARD_FILES:
        shutil.copyfile(store / rel.format(src), store / rel.format(dst))
    if keys:
        dst_keys = store / "keys" / f"{dst:06d}.json"
        start = json.loads(dst_keys.read_text())["start"]
        doc = json.loads((store / "keys" / f"{src:06d}.json").read_text())
        dst_keys.write_text(json.dumps({**doc, "shard": dst, "start": start}))


def pickle_member(ext: str) -> Callable[[Path], tuple[tarfile.TarInfo, bytes]]:
    def make(scratch: Path):
        payload = Pwn(scratch / f"PWNED-{ext}")
        if ext == "pth":
            buf = io.BytesIO()
            torch.save({"x": payload}, buf)
            return member(f"{64:09d}.{ext}", buf.getvalue())
        return member(f"{64:09d}.{ext}", pickle.dumps(payload))
    return make


# --- The scene of the bad invocations ------------------------------------------------------------

class Scene:
    """Files the bad invocations point at (built once per run, test_hostile_input.py's `scene`)."""

    def __init__(self, base: Path, public: Path, static: Path, ref: Ref, ref_run: RefRun) -> None:
        self.base, self.public, self.static, self.ref, self.ref_run = base, public, static, ref, ref_run
        self.afile = base / "afile.txt"
        self.afile.write_text("not a directory\n")
        self.emptydir = base / "emptydir"
        self.emptydir.mkdir()
        self.marker = base / "PWNED"
        # Checkpoints that are really pickles whose loading would create self.marker.
        self.evil_pt = base / "evil.pt"
        torch.save({"net.0.weight": Pwn(self.marker)}, self.evil_pt)
        self.evil_st = base / "evil.safetensors"
        self.evil_st.write_bytes(pickle.dumps(Pwn(self.marker)))
        self.evil_run = base / "evil_run"
        shutil.copytree(static, self.evil_run)
        (self.evil_run / "model.safetensors").write_bytes(pickle.dumps(Pwn(self.marker)))
        # Run dirs of the reference run whose last checkpoint is a pickle / truncated.
        self.resume_pickle = base / "resume_pickle"
        shutil.copytree(ref_run.path, self.resume_pickle)
        last = sorted((self.resume_pickle / "checkpoints").glob("*.pt"))[-1]
        torch.save({"model": Pwn(self.marker)}, last)
        self.resume_truncated = base / "resume_truncated"
        shutil.copytree(ref_run.path, self.resume_truncated)
        last = sorted((self.resume_truncated / "checkpoints").glob("*.pt"))[-1]
        last.write_bytes(last.read_bytes()[:1000])
        # Datasets: RGB images (wrong geometry for a 1x28x28 model), no images, empty and mixed wds.
        from PIL import Image

        self.rgb = base / "rgb"
        for c in ("a", "b"):
            (self.rgb / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (28, 28), (40 * i, 80, 120)).save(self.rgb / c / f"{i}.png")
        self.noimages = base / "noimages"
        (self.noimages / "a").mkdir(parents=True)
        (self.noimages / "a" / "readme.txt").write_text("no images here")
        self.wds_empty = base / "empty.tar"
        write_tar(self.wds_empty, [])
        self.wds_mixed = base / "mixed.tar"
        members = []
        for i in range(70):
            size = 20 if i == 66 else 28
            buf = io.BytesIO()
            Image.new("L", (size, size), i).save(buf, format="PNG")
            members += [member(f"s{i:04d}.png", buf.getvalue()), member(f"s{i:04d}.cls", b"%d" % (i % 10))]
        write_tar(self.wds_mixed, members)
        # Stores: garbage manifest; (public) unreadable manifest.
        self.garbage_store = base / "garbage.zarr"
        self.garbage_store.mkdir()
        (self.garbage_store / "manifest.json").write_bytes(b"\x00\xffnot json")
        self.unreadable_store = public / "unreadable.zarr"
        shutil.copytree(ref.paths[".zarr"], self.unreadable_store)
        (self.unreadable_store / "manifest.json").chmod(0)
        self.unreadable_run = public / "unreadable_run"
        self.unreadable_run.mkdir()
        (self.unreadable_run / "config.json").write_text("{}")
        (self.unreadable_run / "config.json").chmod(0)
        # Job specs.
        self.jobs = base / "jobs"
        self.jobs.mkdir()
        spec = '[job]\nname = "x"\n{extra}\n[data]\ndataset = "digits"\n\n[models.a]\narch = "D"\n{model}\n'
        (self.jobs / "loop_a.toml").write_text('[job]\ninclude = ["loop_b.toml"]\n')
        (self.jobs / "loop_b.toml").write_text('[job]\ninclude = ["loop_a.toml"]\n')
        (self.jobs / "unknown_key.toml").write_text(spec.format(extra="", model="warmup = 3"))
        (self.jobs / "bad_syntax.toml").write_text("[job\nname = \n")
        (self.jobs / "bad_eps.toml").write_text(spec.format(extra="", model='eps = "1/0"'))
        (self.jobs / "include_dir.toml").write_text(spec.format(extra='include = ["."]', model=""))
        (self.jobs / "cycle.toml").write_text(
            '[data]\ndataset = "digits"\n[models.a]\narch = "D"\nmode = "ens-adv"\nstores = ["s"]\n'
            '[stores.s]\nmodel = "a"\n')
        self.unreadable_spec = public / "unreadable.toml"
        self.unreadable_spec.write_text(spec.format(extra="", model=""))
        self.unreadable_spec.chmod(0)

    current = "case"  # the bad invocation being built: each gets its own output path

    def out(self) -> Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.current).strip("-")
        return self.base / "out" / slug
