"""Promise 7, security and integrity (issue 12): hostile data folders, tars, model files and
output paths get one clear line, bounded memory and nothing touched outside the command's own
folders; legitimate links, names and files keep working.

Every case is a real enspipe process (forked from the zygote in the CI subset, a fresh
interpreter in the full sweep) on real files. Each checks the one error line (its words), that
nothing under the scene changed except the command's own output folders (a snapshot before and
after, sentinel.py), and, where the input is hostile, that the process's peak resident memory
(wait4's ru_maxrss of that process) stayed below 1 GiB.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from . import disk
from .forge import forge_checksums, tar_members
from .processes import ENV, REPO, enspipe, error_line, run_many
from .reference import Ref, precompute_args
from .sentinel import changes, snapshot
from .sweep import FULL, TALLY

GiB = 1 << 30
RSS_CAP = GiB  # the bound on a process fed a hostile tar or folder


# --- Hostile files -------------------------------------------------------------------------------

def sparse_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | int]]) -> Path:
    """A GNU tar of (header, data) members; an int as data is a member of that many bytes left
    as a hole in the file (a sparse file: gigabytes that take no disk)."""
    with open(path, "wb") as f:
        for info, data in members:
            info.size = data if isinstance(data, int) else len(data)
            f.write(info.tobuf(tarfile.GNU_FORMAT))
            if isinstance(data, int):
                f.seek(f.tell() + -(-data // 512) * 512)
            else:
                f.write(data + bytes(-len(data) % 512))
        f.write(bytes(1024))
    return path


def png(side: int, value: int = 0, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (side, side), value).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(side: int) -> bytes:
    """A grey side x side PNG of zeros, compressed without ever holding its pixels: a few
    hundred KiB that decode to side^2 bytes (and three times that as RGB)."""
    z = zlib.compressobj(1)
    row = bytes(side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def info(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    return ti


def wds_samples(n: int, start: int = 0) -> list[tuple[tarfile.TarInfo, bytes]]:
    """n valid 28x28 grey samples (png + cls)."""
    out = []
    for i in range(start, start + n):
        out += [(info(f"s{i:04d}.png"), png(28, i)), (info(f"s{i:04d}.cls"), b"%d" % (i % 10))]
    return out


def image_folder(root: Path, classes: int, per_class: int, side: int = 8) -> Path:
    from PIL import Image

    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (side, side), (20 * c, 40 * i % 256, 90)).save(root / f"c{c}" / f"{i:03d}.png")
    return root


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def huge_tensor_header(run: Path) -> None:
    """model.safetensors whose header claims a 10^6 x 10^6 float32 first tensor (4 TB)."""
    st = run / "model.safetensors"
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in sorted(header) if k != "__metadata__" and len(header[k]["shape"]) == 2)
    header[name]["shape"] = [10**6, 10**6]
    header[name]["data_offsets"][1] = header[name]["data_offsets"][0] + 4 * 10**12
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    st.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


# --- The scene -----------------------------------------------------------------------------------

class Scene:
    """Everything the cases point at, under one folder that is snapshotted around them."""

    def __init__(self, base: Path, static: Path, ref: Ref) -> None:
        self.base, self.static, self.ref = base, static, ref
        self.outs = base / "out"
        # A run dir named like an architecture, in the folder the commands run from.
        self.cwd = base / "cwd"
        shutil.copytree(static, self.cwd / "D")
        # Image folders: ten classes of five; one whose class folders hold symlink loops.
        self.ten = image_folder(base / "ten", 10, 5)
        self.loops = image_folder(base / "loops", 2, 4)
        extra = image_folder(base / "extra", 1, 2) / "c0"
        os.symlink("..", self.loops / "c0" / "up")                # back to the dataset folder
        os.symlink(".", self.loops / "c1" / "self")               # to itself
        os.symlink("/", self.loops / "c1" / "root")               # to the root of the filesystem
        os.symlink(extra, self.loops / "c0" / "ext")              # a folder elsewhere: no loop
        os.symlink(extra / "000.png", self.loops / "c1" / "linked.png")  # a linked file
        self.bomb = image_folder(base / "bomb", 2, 2)
        (self.bomb / "c0" / "000.png").write_bytes(png_bomb(12000))
        # Model runs with hostile numbers in model.json / model.safetensors.
        self.runs: dict[str, Path] = {}
        for name, change in {
            "classes": lambda m: m["config"].__setitem__("num_classes", 10**10),
            "side": lambda m: m["config"].__setitem__("input_size", [1, 10**6, 10**6]),
            "params": lambda m: m["config"].__setitem__("input_size", [3, 8192, 8192]),
            "mean": lambda m: m["config"].__setitem__("mean", [float("nan")]),
        }.items():
            run = shutil.copytree(static, base / "models" / name)
            edit_json(run / "model.json", change)
            self.runs[name] = run
        self.runs["tensor"] = shutil.copytree(static, base / "models" / "tensor")
        huge_tensor_header(self.runs["tensor"])
        # WebDataset dataset tars, each with one hostile member (sparse: no disk used).
        t = base / "tars"
        t.mkdir()
        self.tars = {
            "image": sparse_tar(t / "image.tar", [(info("s0000.png"), GiB), (info("s0000.cls"), b"1"),
                                                  *wds_samples(3, 1)]),
            "label": sparse_tar(t / "label.tar", [(info("s0000.png"), png(28)), (info("s0000.cls"), 1 << 20),
                                                  *wds_samples(3, 1)]),
            "pax": sparse_tar(t / "pax.tar", [(info("././@PaxHeader", tarfile.XHDTYPE), GiB), *wds_samples(4)]),
            "longname": sparse_tar(t / "longname.tar", [(info("././@LongLink", tarfile.GNUTYPE_LONGNAME), GiB),
                                                        *wds_samples(4)]),
            "bigclass": sparse_tar(t / "bigclass.tar", [(info("s0000.png"), png(28)),
                                                        (info("s0000.cls"), b"%d" % 10**10), *wds_samples(3, 1)]),
            "bomb": sparse_tar(t / "bomb.tar", [(info("s0000.png"), png_bomb(12000)), (info("s0000.cls"), b"1"),
                                                *wds_samples(3, 1)]),
            "plain": sparse_tar(t / "plain.tar", wds_samples(4)),
        }
        # Stores: copies of the reference stores; a wds store with a forged hostile member.
        self.zarr = shutil.copytree(ref.paths[".zarr"], base / "stores" / ref.paths[".zarr"].name)
        self.wds = shutil.copytree(ref.paths[".wds"], base / "stores" / ref.paths[".wds"].name)
        self.huge_store = shutil.copytree(ref.paths[".wds"], base / "hostile" / "huge.wds")
        self._store_member(self.huge_store, "000000064.dir.bits.gz", GiB)
        self.logits_store = shutil.copytree(ref.paths[".wds"], base / "hostile" / "logits.wds")
        self._store_member(self.logits_store, "000000064.logits.npy", 1 << 20)
        self.run = shutil.copytree(static, base / "run")

    @staticmethod
    def _store_member(store: Path, name: str, size: int) -> None:
        """Shard 1's member NAME replaced by `size` bytes (a hole), checksums forged to match."""
        tar = store / "shard-000001.tar"
        members = [(m, size if m.name == name else data) for m, data in tar_members(tar)]
        assert any(m.name == name for m, _ in members)
        sparse_tar(tar, [(m, d) for m, d in members])
        forge_checksums(store, 1)

    def out(self, case: str) -> Path:
        return self.outs / case


@pytest.fixture(scope="module")
def scene(digits_static, ref, tmp_path_factory) -> Scene:
    return Scene(tmp_path_factory.mktemp("security"), digits_static, ref)


# --- The cases -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One invocation: argv built from the scene, the words its one error line must hold (no
    words: it must succeed), and what else is checked."""

    id: str
    argv: Callable[[Scene], list]
    words: tuple[str, ...] = ()
    out: str | None = None       # the case's --out under scene.outs (refused: never created)
    started: bool = False        # refused mid-run: its --out may hold config.json, never a model
    rss: bool = False            # hostile input: peak RSS must stay below RSS_CAP
    env: dict = field(default_factory=dict)
    cwd: str = "base"            # "base" or "cwd" (the folder holding ./D)
    verify: bool = False         # `enspipe verify`: `STORE: problem` on stderr, BAD on stdout
    marks: tuple = ()


def _train(s: Scene, case: str, *extra, dataset="digits", limit=64) -> list:
    return ["train", "--model", "D", "--dataset", dataset, "--limit", limit, "--epochs", 1, "--batch-size", 16,
            "--device", "cpu", *extra, "--out", s.out(case)]


def _evaluate(s: Scene, case: str, model, *extra) -> list:
    return ["evaluate", "--model", model, "--dataset", "digits", "--limit", 32, "--device", "cpu", *extra,
            "--out", s.out(case)]


def _pre(s: Scene, model, out, *extra) -> list:
    return ["precompute", "--model", model, "--dataset", "digits", "--limit", 64, "--shard-size", 64,
            "--device", "cpu", *extra, "--out", out]


def _wds(s: Scene, case: str, tar: str) -> list:
    return _train(s, case, dataset=f"wds:{s.tars[tar]}", limit=4)


slow = (pytest.mark.slow, pytest.mark.skipif(not FULL, reason="full sweep only: set ENSPIPE_SWEEP=full"))

CASES = [
    # Bounds on numbers read from model files, before anything is allocated (item 3).
    Case("model.json: 10^10 classes (evaluate)", lambda s: _evaluate(s, "m1", s.runs["classes"]),
         ("model.json", "num_classes 10000000000, above the limit of 1000000", "ENSPIPE_MAX_CLASSES"), rss=True, out="m1"),
    Case("model.json: 10^10 classes (precompute)", lambda s: _pre(s, s.runs["classes"], s.out("m2")),
         ("model.json", "num_classes 10000000000"), rss=True, out="m2"),
    Case("model.json: 10^10 classes (train --weights)",
         lambda s: _train(s, "m3", "--weights", s.runs["classes"] / "model.safetensors"),
         ("model.json", "num_classes 10000000000"), rss=True, out="m3"),
    Case("model.json: a 10^6 x 10^6 input", lambda s: _evaluate(s, "m4", s.runs["side"]),
         ("model.json", "input height 1000000, above the limit of 8192", "ENSPIPE_MAX_INPUT_SIDE"), rss=True, out="m4"),
    Case("model.json: an 8192 x 8192 input (60e9 parameters)", lambda s: _evaluate(s, "m5", s.runs["params"]),
         ("model.json", "60398251810 parameters, above the limit", "ENSPIPE_MAX_PARAMETERS"), rss=True, out="m5"),
    Case("model.json: a NaN mean", lambda s: _evaluate(s, "m6", s.runs["mean"]), ("model.json", "mean"),
         rss=True, marks=slow, out="m6"),
    Case("model.safetensors: a header claiming a 10^6 x 10^6 tensor", lambda s: _evaluate(s, "m7", s.runs["tensor"]),
         ("model.safetensors", "1000000x1000000 in the file"), rss=True, out="m7"),
    # Bounds on tar members before they are read: the wds: dataset source (item 4).
    Case("wds dataset: a 1 GiB image member", lambda s: _wds(s, "w1", "image"),
         ("s0000.png", "1073741824 bytes, above the limit of 67108864", "ENSPIPE_MAX_IMAGE_BYTES", "refused unread"),
         rss=True, out="w1"),
    Case("wds dataset: a 1 MiB label member", lambda s: _wds(s, "w2", "label"),
         ("s0000.cls", "1048576 bytes, above the limit of 32", "ENSPIPE_MAX_LABEL_BYTES"), rss=True, out="w2"),
    Case("wds dataset: a 1 GiB pax header", lambda s: _wds(s, "w3", "pax"),
         ("pax.tar", "pax header", "1073741824", "ENSPIPE_MAX_METADATA_BYTES"), rss=True, out="w3"),
    Case("wds dataset: a 1 GiB GNU long name", lambda s: _wds(s, "w4", "longname"),
         ("longname.tar", "long name", "1073741824"), rss=True, marks=slow, out="w4"),
    Case("wds dataset: label 10^10", lambda s: _wds(s, "w5", "bigclass"),
         ("label 10000000000, above the limit of 1000000 classes", "ENSPIPE_MAX_CLASSES"), rss=True, out="w5"),
    Case("wds dataset: a 12000 x 12000 PNG", lambda s: _wds(s, "w6", "bomb"),
         ("12000x12000 = 144000000 pixels", "ENSPIPE_MAX_IMAGE_PIXELS", "refused undecoded"), rss=True, out="w6"),
    Case("wds dataset: the cap is configurable (ENSPIPE_MAX_IMAGE_BYTES=64)", lambda s: _wds(s, "w7", "plain"),
         ("s0000.png", "above the limit of 64", "ENSPIPE_MAX_IMAGE_BYTES"), env={"ENSPIPE_MAX_IMAGE_BYTES": "64"}, out="w7"),
    # ... an image folder (item 4).
    Case("imagefolder: a 12000 x 12000 PNG", lambda s: _train(s, "f1", "--image-size", 8,
                                                               dataset=f"imagefolder:{s.bomb}", limit=4),
         ("000.png", "12000x12000 = 144000000 pixels", "ENSPIPE_MAX_IMAGE_PIXELS"), rss=True, out="f1", started=True),
    # ... and a store's tars, sized from the store's geometry (verify and the trainer).
    Case("wds store: a 1 GiB direction member (verify)", lambda s: ["verify", s.huge_store],
         ("shard-000001.tar", "refused unread"), rss=True, verify=True),
    Case("wds store: a 1 GiB direction member (train)",
         lambda s: _train(s, "s2", "--mode", "ens-adv", "--shards", s.huge_store, limit=512),
         ("huge.wds", "shard-000001.tar", "refused unread"), rss=True, out="s2"),
    Case("wds store: a 1 MiB logits member (verify)", lambda s: ["verify", s.logits_store],
         ("000000064.logits.npy", "1048576 bytes", "for this store's geometry"), rss=True, verify=True),
    # Name resolution (item 6): ./D beside the architecture D.
    Case("name: train --model D beside ./D", lambda s: _train(s, "n1"),
         ("--model D is ambiguous", "the architecture D", "the folder ./D", "write ./D"), cwd="cwd", out="n1"),
    Case("name: evaluate --model D beside ./D", lambda s: _evaluate(s, "n2", "D"), ("--model D is ambiguous",),
         cwd="cwd", out="n2"),
    Case("name: precompute --model D beside ./D", lambda s: _pre(s, "D", s.out("n3")), ("--model D is ambiguous",),
         cwd="cwd", out="n3"),
    Case("name: train --model ./D fine-tunes the folder", lambda s: _train(s, "n4", "--model", "./D"), cwd="cwd", out="n4"),
    # Outputs inside a store, stores inside a run (item 8).
    Case("out: train --out STORE.zarr/run", lambda s: [*_train(s, "o1")[:-1], s.zarr / "run"],
         ("--out", "inside the store", "stores/"), out="o1"),
    Case("out: precompute --out STORE.zarr", lambda s: _pre(s, s.static, s.zarr), ("inside the store",)),
    Case("out: precompute --out RUN", lambda s: _pre(s, s.static, s.run), ("inside the training run",)),
    Case("out: precompute --out RUN/stores", lambda s: _pre(s, s.static, s.run / "stores"),
         ("inside the training run",), marks=slow),
    Case("out: evaluate --out STORE.wds/results", lambda s: [*_evaluate(s, "o5", s.static)[:-1], s.wds / "results"],
         ("inside the store",), marks=slow, out="o5"),
]


def _outputs(s: Scene) -> tuple[Path, ...]:
    """The folders the cases may write: their --out (nothing else)."""
    return (s.outs,)


@pytest.fixture(scope="module")
def results(scene, tmp_path_factory) -> dict[str, list[dict]]:
    """Every case, run once (forked; in the full sweep also as fresh interpreters), between two
    snapshots of the scene."""
    work = tmp_path_factory.mktemp("security-runs")
    active = [c for c in CASES if FULL or not any(m is pytest.mark.slow for m in c.marks)]
    runs = [{"argv": [str(a) for a in c.argv(scene)], "cwd": str(scene.cwd if c.cwd == "cwd" else scene.base),
             "uid": None, "env": {**ENV, **c.env} if c.env else None} for c in active]
    before = snapshot(scene.base, outputs=_outputs(scene))
    out = {c.id: [r] for c, r in zip(active, run_many(runs, work, fresh=False))}
    if FULL:
        shutil.rmtree(scene.outs, ignore_errors=True)  # the succeeding cases run again into a fresh --out
        for c, r in zip(active, run_many(runs, work, fresh=True)):
            out[c.id].append(r)
    scene.changed = changes(before, snapshot(scene.base, outputs=_outputs(scene)))
    return out


@pytest.mark.parametrize("case", [pytest.param(c, marks=c.marks, id=c.id) for c in CASES])
def test_hostile_input_is_one_line_bounded_and_touches_nothing(case, scene, results):
    """Promise 7: a hostile model file, tar, folder or output path is refused with one line
    naming the file and the bound (or the two readings of a name), the process stays below
    1 GiB, and nothing outside the command's --out changes; legitimate cases succeed."""
    assert not scene.changed, scene.changed
    for res in results[case.id]:
        TALLY["security cases tried"] += 1
        if not case.words:
            assert res["rc"] == 0, res["stderr"]
            assert "Traceback" not in res["stderr"]
        elif case.verify:
            assert res["rc"] == 1 and res["stdout"].startswith("BAD "), res
            assert "Traceback" not in res["stderr"], res["stderr"]
            line = res["stderr"].strip().splitlines()[0]
        else:
            assert res["rc"] == 1, (res["rc"], res["stderr"])
            line = error_line(res["stderr"])
            assert res["stdout"] == ""
        for word in case.words:
            assert word in line, (word, line)
        if case.rss:
            assert res["peak_rss"] is not None and res["peak_rss"] < RSS_CAP, res["peak_rss"]
            TALLY["hostile inputs refused below 1 GiB"] += 1
        TALLY["security cases held"] += 1
    if case.words and case.out:  # refused: its --out was not even created (or holds no result)
        made = sorted(p.name for p in scene.out(case.out).rglob("*"))
        assert not made or (case.started and set(made) <= {"config.json", "metrics.jsonl"}), made


def test_a_path_that_looks_like_one_is_the_folder(scene, results):
    """Item 6: `--model ./D` is the folder, not the architecture: the run starts from the
    folder's weights (its model.json says so), where `--model D` was refused as ambiguous."""
    meta = json.loads((scene.out("n4") / "model.json").read_text())
    assert meta["provenance"]["weights_file"] == os.path.join("D", "model.safetensors")
    assert json.loads((scene.out("n4") / "config.json").read_text())["train"]["model"] == "./D"


# --- Directory walks (item 2) --------------------------------------------------------------------

def test_symlink_loops_in_an_image_folder_are_skipped_with_a_warning(scene):
    """Item 2: class folders holding `up -> ..`, `self -> .` and `root -> /` train on exactly
    their own images (8, plus a linked folder and a linked file elsewhere: 11), each loop named
    on stderr; nothing else is read, labelled or written."""
    from enspipe.data import create_dataset

    out = scene.out("loops")
    before = snapshot(scene.base, outputs=(out,))
    res = enspipe(*_train(scene, "loops", "--image-size", 8, dataset=f"imagefolder:{scene.loops}", limit=100))
    assert res.returncode == 0, res.stderr
    assert changes(before, snapshot(scene.base, outputs=(out,))) == []
    warned = [ln for ln in res.stderr.splitlines() if "symlink loop" in ln]
    assert len(warned) == 3 and "Traceback" not in res.stderr, res.stderr
    for link in ("c0/up", "c1/self", "c1/root"):
        assert sum(f"/loops/{link} -> " in ln for ln in warned) == 1, (link, warned)
    recorded = json.loads((out / "config.json").read_text())["dataset"]
    assert recorded["num_samples"] == 11
    # The same folder opened here: which file got which label (the process recorded its fingerprint).
    data = create_dataset(f"imagefolder:{scene.loops}", limit=100, image_size=8)
    assert data.fingerprint == recorded["fingerprint"]
    files = dict(zip(data._files, data.labels.tolist()))
    assert files == {**{f"c0/{i:03d}.png": 0 for i in range(4)}, "c0/ext/000.png": 0, "c0/ext/001.png": 0,
                     **{f"c1/{i:03d}.png": 1 for i in range(4)}, "c1/linked.png": 1}
    TALLY["symlink loops skipped"] += 3


def test_ls_lists_the_stores_of_a_root_with_a_symlink_loop(scene, tmp_path):
    """Item 2: `enspipe ls` does not follow links, so a loop under ROOT ends nothing and lists
    each store once."""
    root = tmp_path / "root"
    shutil.copytree(scene.wds, root / "d" / scene.wds.name)
    os.symlink("..", root / "d" / "loop")
    os.symlink("/", root / "slash")
    before = snapshot(tmp_path)
    res = enspipe("ls", root, "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    assert [Path(i["path"]).name for i in json.loads(res.stdout)] == [scene.wds.name]
    assert changes(before, snapshot(tmp_path)) == []


# --- ImageFolder: stratified --limit, no silent test split (issue 14 item 6) ---------------------

def test_imagefolder_limit_is_class_stratified_and_a_flat_folder_has_no_test_split(scene):
    """`--limit 20` of ten classes takes the first two files (sorted) of each class; a folder
    without train/val/test folders refuses the test split (it would be the training images)
    with one line, and serves it with --split train."""
    from enspipe.data import create_dataset

    run = scene.out("limit20")
    before = snapshot(scene.base, outputs=(run,))
    res = enspipe(*_train(scene, "limit20", "--image-size", 8, dataset=f"imagefolder:{scene.ten}", limit=20))
    assert res.returncode == 0, res.stderr
    recorded = json.loads((run / "config.json").read_text())["dataset"]
    data = create_dataset(f"imagefolder:{scene.ten}", limit=20, image_size=8)
    assert recorded["num_samples"] == 20 and recorded["fingerprint"] == data.fingerprint
    assert np.bincount(data.labels).tolist() == [2] * 10
    # classes interleaved (issue 22): the first file of each class, then the second of each
    assert data._files[:4] == ["c0/000.png", "c1/000.png", "c2/000.png", "c3/000.png"]
    assert data._files[10:12] == ["c0/001.png", "c1/001.png"]
    assert [len(create_dataset(f"imagefolder:{scene.ten}", limit=k, image_size=8).keys) for k in (7, 55)] == [7, 50]
    assert np.bincount(create_dataset(f"imagefolder:{scene.ten}", limit=13, image_size=8).labels).tolist() == \
        [2, 2, 2] + [1] * 7
    # The test split of a flat folder: refused, nothing written; --split train evaluates.
    args = ["evaluate", "--model", run, "--dataset", f"imagefolder:{scene.ten}", "--image-size", 8, "--device", "cpu"]
    refused = enspipe(*args, "--out", scene.out("split-test"))
    assert refused.returncode == 1 and refused.stdout == ""
    line = error_line(refused.stderr)
    assert str(scene.ten) in line and "no train/, val/ or test/ folder" in line and "--split train" in line, line
    assert not scene.out("split-test").exists()
    ok = enspipe(*args, "--split", "train", "--out", scene.out("split-train"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((scene.out("split-train") / "results.json").read_text())["dataset"]["num_samples"] == 50
    assert changes(before, snapshot(scene.base, outputs=(run, scene.out("split-train")))) == []


# --- A full disk: one line naming the file, no temporary left (item 3) ---------------------------

DISK_FULL = [
    ("precompute zarr", lambda s, out: (precompute_args(s.static, out, "zarr"), f"enospc-after:40000:{out}/*"),
     ".zarr (shard "),
    ("precompute wds", lambda s, out: (precompute_args(s.static, out, "wds"), f"enospc-after:40000:{out}/*"),
     "shard-00000"),
    ("evaluate results.json", lambda s, out: (_evaluate(s, out.name, s.static)[:-1] + [out],
                                              f"enospc-after:0:{out}/*"), "results.json"),
    ("train metrics.jsonl", lambda s, out: (_train(s, out.name)[:-1] + [out], f"enospc-after:0:{out}/metrics.jsonl"),
     "metrics.jsonl"),
]


@pytest.mark.parametrize("name,make,named", DISK_FULL, ids=[d[0] for d in DISK_FULL])
def test_a_full_disk_is_one_line_naming_the_file(scene, name, make, named):
    """Item 3: wherever the disk fills (simulated ENOSPC of the writes under --out), the error
    is one line that names the file (or store and shard) that could not be written, and no
    temporary file is left holding space."""
    out = scene.out("enospc-" + name.replace(" ", "-").replace(".", "-"))
    before = snapshot(scene.base, outputs=(out,))
    argv, fault = make(scene, out)
    res = enspipe(*argv, faults=(fault,))
    assert res.returncode == 1, res.stderr
    line = error_line(res.stderr)
    assert "No space left on device: " in line and str(out) in line and named in line, line
    assert not [p for p in out.rglob("*") if p.suffix in (".tmp", ".partial")], sorted(out.rglob("*"))
    assert changes(before, snapshot(scene.base, outputs=(out,))) == []
    TALLY["disk-full errors naming their file"] += 1


def test_model_safetensors_on_a_full_disk_is_one_line_and_resumes(ref_run, tmp_path):
    """Item 3: the disk fills while model.safetensors is written, after the epoch's checkpoint
    fitted: one line naming model.safetensors (not safetensors' Rust error), no temporary left;
    with space freed, --resume writes the model files from that checkpoint."""
    from enspipe.models import load_model

    if not disk.can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("cannot mount a tmpfs here")
    mnt = tmp_path / "disk"
    out = mnt / "run"
    ckpt = (ref_run.path / "checkpoints" / "epoch-0000.pt").stat().st_size
    model = (ref_run.path / "model.safetensors").stat().st_size
    args = ["train", "--model", "D", "--dataset", "digits", "--limit", 64, "--epochs", 1, "--device", "cpu",
            "--out", out]
    # Room for config.json, metrics.jsonl and the checkpoint, and half of model.safetensors.
    size = (-(-ckpt // 4096) + 4) * 4096 + model // 2 // 4096 * 4096
    assert mount_ok(mnt, size)
    try:
        full = enspipe(*args)
        assert full.returncode == 1, full.stderr
        line = error_line(full.stderr)
        assert line == f"enspipe: error: No space left on device: {out / 'model.safetensors'}", line
        assert (out / "checkpoints" / "epoch-0000.pt").exists()
        assert not (out / "model.safetensors").exists() and not [p for p in out.rglob("*") if p.suffix == ".tmp"]
        assert disk.mount_tmpfs(mnt, 64 << 20, remount=True)
        again = enspipe(*args, "--resume")
        assert again.returncode == 0, again.stderr
        import torch

        state = torch.load(out / "checkpoints" / "epoch-0000.pt", map_location="cpu", weights_only=True)["model"]
        loaded = load_model(out).state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    finally:
        disk.umount(mnt)


def mount_ok(mnt: Path, size: int) -> bool:
    return disk.mount_tmpfs(mnt, max(size, 65536))


# --- Files readable by the group and others under umask 022 (item 7) -----------------------------

def _under_umask(mask: int, argv: list, cwd: Path) -> subprocess.CompletedProcess:
    """A fresh `python -m enspipe` started with umask MASK (as a login shell would set it)."""
    return subprocess.run([sys.executable, "-m", "enspipe", *map(str, argv)], cwd=cwd, env=ENV, text=True,
                          capture_output=True, preexec_fn=lambda: os.umask(mask), timeout=600, check=False)


@pytest.mark.parametrize("mask", [0o022, pytest.param(0o027, marks=slow)])
def test_files_are_created_with_the_process_umask(scene, tmp_path, mask):
    """Item 7: under umask 022 every file a run and a precompute create is 0644 and every
    folder 0755 -- model.safetensors included, which safetensors would create 0600 -- so
    another user of a shared ROOT can read them (027: 0640 / 0750)."""
    run, root = tmp_path / "run", tmp_path / "root"
    before = snapshot(scene.base)
    trained = _under_umask(mask, ["train", "--model", "D", "--dataset", "digits", "--limit", 64, "--epochs", 1,
                                  "--device", "cpu", "--out", run], REPO)
    assert trained.returncode == 0, trained.stderr
    stored = _under_umask(mask, _pre(scene, run, root, "--format", "both"), REPO)
    assert stored.returncode == 0, stored.stderr
    entries = [*run.rglob("*"), *root.rglob("*")]
    assert any(p.name == "model.safetensors" for p in entries) and any(p.suffix == ".tar" for p in entries)
    wrong = [(str(p), oct(p.stat().st_mode & 0o777)) for p in entries
             if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask]
    assert not wrong, wrong
    assert changes(before, snapshot(scene.base)) == []
    TALLY["files checked for their umask mode"] += len(entries)
