"""The trainer's reader before and after issue 22 (batches that mix classes), side by side.

Two measurements:

1. Reader throughput, samples/s of one process (wall and CPU), one epoch of the trainer's
   stream (`SourceBatches`: ens-adv, the model + 2 stores, batch 32, block 256, 8 buffer
   blocks, `--loader-workers 0`) and of `DirectionStream` (every store for every sample), over
   zarr and wds stores of 3x64x64 and 3x224x224 synthetic directions (benchmarks/peers_stores.py's
   worst case: i.i.d. random signs; wds stores carry random-noise PNG images as precompute
   writes them). "before" is the reader as committed at BEFORE (its source loaded from git),
   "after" is this tree's; each round runs both, in alternating order, on the same stores; the
   median and range over rounds are reported with the ratio after / before. The images of the
   clean data are a labels-only source (zeros): only the stream and the store reads are timed.
   The two store slots of the ens-adv stream read one store twice (two readers), as two stores of
   one geometry would be read.

3. wds store reads against zarr before and after issue 26's member index (`--parts reads`): the
   trainer's stream (`SourceBatches`, model + 2 stores, as in 1.) over a zarr store, over a wds store
   read by the wds reader as committed at BEFORE_WDS (the store written without an index, as that
   reader's writer wrote it), over the same content written with the index and read by this tree,
   and over the index-less store read by this tree (older stores: the member-by-member path); every
   round runs all four in alternating order; wds / zarr per CPU-second, paired by round.

4. A `wds:` source in the trainer's order (`--parts source`, issue 26's review finding): the
   source's canonical order is class-interleaved over the whole index, so with tars written class
   by class (one class a tar here, the worst case) consecutive samples sit in different tars. The
   member reads (`encoded_image`, an open + seek + read each) in that order against the same
   reads sorted by tar and offset, beside the JPEG decode + resize to 224 px that each read feeds
   (`images_uint8`), on ImageNet-like JPEGs (benchmarks/gpu_data.py), warm page cache.

2. Distinct classes per batch at the ImageNet job's settings (jobs/imagenet_v3_ens3.toml: batch
   32, adv and ens-adv with 2 stores, default block_size 256 and buffer_blocks 8) on ImageNet's
   layout (1,000 classes x 1,281 samples, class-sorted folders), before (file order, the old
   reader) and after (class-interleaved order, the new reader), against the i.i.d. expectation
   in closed form for sampling without replacement.

5. `DirectionStream` with one drawn store per batch against every store for every sample
   (`--parts drawn`, issue 26): K = 4 store slots over one store (4 readers), batch 32, block 256,
   8 buffer blocks; `sources=[1..K]` reads the drawn store's rows only, the default reads all K;
   samples per CPU-second of one epoch, both in alternating order each round, zarr and wds.

    python benchmarks/bench_stream.py            # the BENCHMARKS.md figures (~10 min on 2 cores)
    python benchmarks/bench_stream.py --quick    # a smoke run: seconds, small stores, no file written
    python benchmarks/bench_stream.py --parts reads    # 3. only (BENCHMARKS.md's issue-26 section, ~5 min)
    python benchmarks/bench_stream.py --parts source   # 4. only (~1 min)
    python benchmarks/bench_stream.py --parts drawn    # 5. only (~1 min)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, logger, machine, update_section  # noqa: E402

BEFORE = "9da656e"  # the commit before issue 22's reader
SECTION = "Batches that mix classes: the reader before and after (issue 22)"
BEFORE_WDS = "7ddb50a"  # the commit before issue 26's wds member index
READS_SECTION = "wds reads against zarr: the member index (issue 26)"
SOURCE_SECTION = "A wds source in the trainer's order: scattered tar reads (issue 26)"
DRAWN_SECTION = "DirectionStream: one drawn store per batch against every store (issue 26)"
log = logger("bench_stream")


# --- the old reader, from git ------------------------------------------------------------------

def old_stream() -> Any | None:
    """enspipe.stream as committed at BEFORE, imported as a module of its own (None without git)."""
    try:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:pipeline/stream.py"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    # Modules have moved since (tools/regroup_map.txt): the old source imports them where they are now.
    sys.path.insert(0, str(REPO / "tools"))
    from rewrite_imports import read_map, split_from_package, sub_all

    modules, _ = read_map(str(REPO / "tools" / "regroup_map.txt"))
    src = sub_all(split_from_package(src, modules), modules, r"(?![\w])")
    path = Path(tempfile.mkdtemp()) / "stream_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("stream_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def old_wds_store() -> Any | None:
    """enspipe.stores.wds.store as committed at BEFORE_WDS, as a module of the package (its relative
    imports resolve to this tree's base, manifest and bounds), or None without git."""
    try:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_WDS}:pipeline/stores/wds_store.py"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    import enspipe.stores  # noqa: F401  (the package the module joins)

    # Its imports name the layout before the regrouping (issue 27): rewrite them as tools/ does.
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import rewrite_imports as rw
    finally:
        sys.path.pop(0)
    modules, _ = rw.read_map(str(REPO / "tools" / "regroup_map.txt"))
    src = rw.absolute_relatives(src, "enspipe.stores.wds_store", False, True, modules)
    src = rw.sub_all(rw.split_from_package(src, modules), modules, r"(?![\w])")
    path = Path(tempfile.mkdtemp()) / "wds_store_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("enspipe.stores._wds_store_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- sources ---------------------------------------------------------------------------------

def labels_only(labels: np.ndarray, geometry: tuple[int, int, int], fingerprint: str, keys: list[str] | None = None):
    """A SampleSource of the given labels, in the given order, with black images."""
    from enspipe.data import SampleSource
    from enspipe.data.base import Geometry

    class LabelsOnly(SampleSource):
        def images_uint8(self, indices):
            n = len(range(len(self))[indices]) if isinstance(indices, slice) else len(np.asarray(indices).reshape(-1))
            return np.zeros((n, *geometry), np.uint8)

    src = LabelsOnly()
    src.name, src.split, src.limit = "synthetic", "train", None
    src.geometry = Geometry(*geometry, "synthetic")
    src.classes = tuple(str(c) for c in range(int(labels.max()) + 1))
    src.labels = np.asarray(labels, dtype=np.int64)
    src.keys = keys or [f"s{i}" for i in range(len(labels))]
    src.fingerprint = fingerprint
    return src


def imagenet_layout(classes: int, per_class: int, interleaved: bool) -> np.ndarray:
    from enspipe.data.base import class_interleaved

    by_class = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    return by_class[class_interleaved(by_class)] if interleaved else by_class


def iid_distinct(classes: int, per_class: int, batch: int) -> float:
    n = classes * per_class
    return classes * (1 - math.prod(max(0, n - per_class - i) / (n - i) for i in range(batch)))


# --- 1. throughput ---------------------------------------------------------------------------

def build_store(root: Path, fmt: str, n: int, px: int, *, index: bool = True) -> Path:
    """A synthetic store (benchmarks/peers_stores.py); `index` False: wds tars as written before issue 26."""
    import peers_stores
    from enspipe.stores.wds import store as wds_store

    peers_stores.GEOMETRY = (3, px, px)
    wds_store.WRITE_INDEX = index
    try:
        path, seconds, size = peers_stores.build_store(root / f"{fmt}{px}{'' if index else '-noindex'}", fmt, n,
                                                       shard_size=256)
    finally:
        wds_store.WRITE_INDEX = True
    log(f"built {fmt} {px}px store of {n} samples{'' if index else ' (no index)'} in {seconds:.1f}s "
        f"({size / 2**20:.0f} MiB)")
    return path


def one_epoch(make) -> tuple[float, float, int]:
    """(wall s, CPU s, samples) of one epoch of the stream `make()` builds (opening not timed)."""
    stream = make()
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for b in stream:
        n += len(b["index"])
    return time.perf_counter() - t0, time.process_time() - c0, n


def throughput(store: Path, n: int, px: int, rounds: int, old: Any | None, kinds: tuple[str, ...]) -> list[dict]:
    from enspipe.stores import open_store
    from enspipe import stream as new

    fp = open_store(store).identity.dataset["fingerprint"]
    ds = labels_only(np.arange(n) % 1000, (3, px, px), fp, [f"synthetic-{i:09d}" for i in range(n)])
    stores = [str(store), str(store)]
    kw = dict(seed=1, block_size=256, buffer_blocks=8)
    makers = {}
    for label, mod in (("before", old), ("after", new)):
        if mod is None:
            continue
        if "trainer" in kinds:
            makers[("trainer", label)] = (lambda m=mod: m.SourceBatches(ds, stores, batch_size=32, **kw))
        if "direction" in kinds:
            makers[("direction", label)] = (lambda m=mod: m.DirectionStream(ds, stores, batch_size=32, **kw))
    times: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in makers}
    for r in range(rounds):
        keys = list(makers) if r % 2 == 0 else list(reversed(makers))
        for key in keys:
            wall, cpu, got = one_epoch(makers[key])
            assert got == n, (key, got, n)
            times[key].append((wall, cpu))
    rows = []
    for kind in kinds:
        row: dict[str, Any] = {"kind": kind, "px": px, "samples": n, "rounds": rounds}
        for label in ("before", "after"):
            if (kind, label) in times:
                rates = [n / w for w, _ in times[(kind, label)]]
                cpu_rates = [n / c for _, c in times[(kind, label)]]
                row[label] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                              "cpu_median": statistics.median(cpu_rates), "cpu_min": min(cpu_rates),
                              "cpu_max": max(cpu_rates)}
        if "before" in row:
            row["ratio"] = row["after"]["median"] / row["before"]["median"]
            row["cpu_ratio"] = row["after"]["cpu_median"] / row["before"]["cpu_median"]
        rows.append(row)
    return rows


# --- 3. wds reads against zarr -----------------------------------------------------------------

READERS = ("zarr", "wds before", "wds after", "wds after, no index")


def reads(root: Path, n: int, px: int, rounds: int, old_wds: Any | None) -> dict:
    """CPU-second rates of one trainer epoch over each reader of READERS (see the module doc)."""
    import hashlib

    from enspipe import stream
    from enspipe.sampling import block_order
    from enspipe.stores import open_store

    paths = {"zarr": build_store(root, "zarr", n, px), "wds after": build_store(root, "wds", n, px)}
    paths["wds after, no index"] = paths["wds before"] = build_store(root, "wds", n, px, index=False)
    fp = open_store(paths["zarr"]).identity.dataset["fingerprint"]
    ds = labels_only(np.arange(n) % 1000, (3, px, px), fp, [f"synthetic-{i:09d}" for i in range(n)])

    def reader(name: str):
        r = open_store(paths[name])
        if name == "wds before":  # the committed reader class on this store's validated manifest
            return old_wds.WdsReader(r.path, r.manifest, r.records)
        return r

    names = [k for k in READERS if k != "wds before" or old_wds is not None]
    tars = [t.read_bytes() for t in sorted(paths["wds after"].glob("shard-*.tar"))]
    cpu: dict[tuple[str, str], list[float]] = {(k, name): [] for k in ("trainer", "read()") for name in names}
    sha: list[float] = []
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            # Fresh readers each epoch (no shard cache carried over); both readers hash each file
            # once per process and file version (the first round), as a multi-epoch run does.
            make = lambda: stream.SourceBatches(ds, [reader(name), reader(name)], batch_size=32, seed=1,  # noqa: E731
                                                block_size=256, buffer_blocks=8)
            wall, c, got = one_epoch(make)
            assert got == n, (name, got, n)
            cpu[("trainer", name)].append(n / c)
            # read(): every field, the blocks in the trainer's shuffled order, one reader.
            rd, c0 = reader(name), time.process_time()
            for a, b in block_order(n, 256, seed=r, epoch=0):
                rd.read(a, b)
            cpu[("read()", name)].append(n / (time.process_time() - c0))
        c0 = time.process_time()  # the sha256 every wds read computes, alone (tars already in memory)
        for t in tars:
            hashlib.sha256(t).digest()
        sha.append(n / (time.process_time() - c0))
    row: dict[str, Any] = {"px": px, "samples": n, "rounds": rounds, "readers": {},
                           "sha256_samples_per_cpu_s": statistics.median(sha),
                           "tar_bytes_per_sample": sum(map(len, tars)) / n}
    for (kind, name), rates in cpu.items():
        paired = [a / z for a, z in zip(rates, cpu[(kind, "zarr")])]
        row["readers"][f"{kind}: {name}"] = {
            "cpu_median": statistics.median(rates), "cpu_min": min(rates), "cpu_max": max(rates),
            "vs_zarr": statistics.median(paired), "vs_zarr_min": min(paired), "vs_zarr_max": max(paired)}
        log(f"reads {px}px {kind} {name}: {statistics.median(rates):,.0f}/CPU-s, {statistics.median(paired):.2f} x zarr")
    log(f"reads {px}px: sha256 alone {row['sha256_samples_per_cpu_s']:,.0f} samples/CPU-s")
    return row


def _measured(result: dict) -> str:
    """The opening every section shares: the command, the machine, its cores (continued by the caller)."""
    return f"Measured by `{result['command']}` on {result['machine']['cpu']} ({result['machine']['nproc']} cores, "


def reads_markdown(result: dict) -> str:
    out = [_measured(result) +
           f"shared with other work, so rates are per CPU-second of the reading process), {result['date']}. "
           f"One trainer epoch (`SourceBatches`, ens-adv: the model + 2 stores, batch 32, block 256, 8 buffer "
           f"blocks, `--loader-workers 0`) per reader per round, the readers in alternating order each round; "
           f"median (range) over rounds; \"x zarr\" pairs each round's wds rate with that round's zarr rate. "
           f"Stores of i.i.d. random sign maps (the codecs' worst case), logits float16 [1000], shards of 256 "
           f"samples; the wds stores carry a noise PNG per sample as precompute writes clean images, so a wds "
           f"tar holds several times the bytes of a zarr shard. Both readers check a file's sha256 once per process and file "
           f"version (the first round; a trainer's first epoch) and read it unhashed afterwards, as a multi-epoch run does; "
           f"\"wds before\" hashed every tar on every read. \"wds before\": the reader as committed at {BEFORE_WDS} on a store written "
           f"without the index; \"wds after\": this tree on the same content written with it; \"no index\": "
           f"this tree on the store without it (stores written before issue 26).\n",
           "\"trainer\": the stream reads directions only (zarr then decodes one array of three); \"read()\": "
           "`open_store(...).read(a, b)` of every 256-sample block in the trainer's shuffled order (directions, "
           "logits and labels), one reader. \"sha256 alone\": hashing the indexed store's tars already in memory, "
           "what the first read of each tar costs on top.\n",
           "| px | samples x rounds | reads | reader | samples/CPU-s | x zarr (CPU) |", "|---|---|---|---|---|---|"]
    for row in result["reads"]:
        for name, d in row["readers"].items():
            kind, _, reader = name.partition(": ")
            out.append(f"| {row['px']} | {row['samples']:,} x {row['rounds']} | {kind} | {reader} | "
                       f"{d['cpu_median']:,.0f} ({d['cpu_min']:,.0f}-{d['cpu_max']:,.0f}) | {d['vs_zarr']:.2f} "
                       f"({d['vs_zarr_min']:.2f}-{d['vs_zarr_max']:.2f}) |")
        out.append(f"| {row['px']} | | sha256 alone | wds tars, {row['tar_bytes_per_sample'] / 1024:,.1f} KiB/sample | "
                   f"{row['sha256_samples_per_cpu_s']:,.0f} | |")
    out.append("")
    for row in result["reads"]:  # the figures above, per sample
        r = row["readers"]
        if "read(): wds after" not in r:
            continue
        wds, zarr = 1e6 / r["read(): wds after"]["cpu_median"], 1e6 / r["read(): zarr"]["cpu_median"]
        sha = 1e6 / row["sha256_samples_per_cpu_s"]
        out.append(f"- {row['px']} px, read(): a wds read costs {wds:.1f} µs CPU a sample, zarr {zarr:.1f} "
                   f"({zarr / wds:.2f}x); a tar's first read in a process adds its sha256, {sha:.1f} µs a sample.")
    out += ["", "Reading: the index path decodes a wds shard at about zarr's rate. Since the merge of issue 26 "
            "a wds tar's sha256 is checked once per process and file version, as zarr's files always were "
            "(`manifest.sha256_matches`/`note_verified`: a file replaced or rewritten, another inode or mtime, is "
            "hashed again; `enspipe verify` hashes every file every time): before, every read hashed the whole tar, "
            "clean images included (~150 KB a sample at 224 px beside ~19 KB of direction), which cost about "
            "half of a read. Stores written before the index read as before (\"no index\"). In this shared "
            "machine's runs the \"trainer\" rows vary several-fold between runs and rounds (see the ranges) and at "
            "224 px are bound by the stream's own per-sample work for every reader; read() separates the readers."]
    return "\n".join(out) + "\n"


# --- 5. one drawn store per batch against every store --------------------------------------------

def drawn(root: Path, n: int, px: int, rounds: int, k: int = 4) -> list[dict]:
    """See the module doc, 5."""
    from enspipe import stream
    from enspipe.stores import open_store

    rows = []
    for fmt in ("zarr", "wds"):
        store = build_store(root, fmt, n, px)
        fp = open_store(store).identity.dataset["fingerprint"]
        ds = labels_only(np.arange(n) % 1000, (3, px, px), fp, [f"synthetic-{i:09d}" for i in range(n)])
        makers = {"every store": lambda: stream.DirectionStream(ds, [str(store)] * k, batch_size=32, seed=1,
                                                                block_size=256, buffer_blocks=8),
                  "one drawn store": lambda: stream.DirectionStream(ds, [str(store)] * k, batch_size=32, seed=1,
                                                                    block_size=256, buffer_blocks=8,
                                                                    sources=list(range(1, k + 1)))}
        cpu: dict[str, list[float]] = {name: [] for name in makers}
        for r in range(rounds):
            for name in (list(makers) if r % 2 == 0 else list(makers)[::-1]):
                _, c, got = one_epoch(makers[name])
                assert got == n, (name, got, n)
                cpu[name].append(n / c)
        paired = [a / b for a, b in zip(cpu["one drawn store"], cpu["every store"])]
        row = {"fmt": fmt, "px": px, "samples": n, "rounds": rounds, "stores": k,
               "rates": {name: {"cpu_median": statistics.median(v), "cpu_min": min(v), "cpu_max": max(v)}
                         for name, v in cpu.items()},
               "ratio": statistics.median(paired), "ratio_min": min(paired), "ratio_max": max(paired)}
        log(f"drawn {fmt} {px}px: one drawn store {row['rates']['one drawn store']['cpu_median']:,.0f}/CPU-s, every "
            f"store {row['rates']['every store']['cpu_median']:,.0f}/CPU-s, ratio {row['ratio']:.2f}")
        rows.append(row)
    return rows


def drawn_markdown(result: dict) -> str:
    out = [_measured(result) +
           f"shared, so rates are per CPU-second), {result['date']}. One epoch of `DirectionStream` over K store "
           f"slots (one store, K readers), batch 32, block 256, 8 buffer blocks, labels-only clean images (only the "
           f"stream and the store reads are timed); \"one drawn store\": `sources=[1..K]`, each batch reads its drawn "
           f"store's rows only (what a loop that uses one store per batch needs: README's own loop); \"every store\": "
           f"the default, all K stores for every sample. Both in alternating order each round; median (range) over "
           f"rounds, the ratio paired by round.\n",
           "| store | px | K | samples x rounds | every store (samples/CPU-s) | one drawn store (samples/CPU-s) | drawn / every |",
           "|---|---|---|---|---|---|---|"]
    for row in result["drawn"]:
        e, d = row["rates"]["every store"], row["rates"]["one drawn store"]
        out.append(f"| {row['fmt']} | {row['px']} | {row['stores']} | {row['samples']:,} x {row['rounds']} | "
                   f"{e['cpu_median']:,.0f} ({e['cpu_min']:,.0f}-{e['cpu_max']:,.0f}) | "
                   f"{d['cpu_median']:,.0f} ({d['cpu_min']:,.0f}-{d['cpu_max']:,.0f}) | "
                   f"{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) |")
    return "\n".join(out) + "\n"


# --- 4. a wds source in the trainer's order ------------------------------------------------------

def source_reads(root: Path, classes: int, per_class: int, rounds: int) -> dict:
    """See the module doc, 4."""
    import io
    import tarfile

    from gpu_data import IMAGENET, _write

    from enspipe.data import create_dataset

    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for c in range(classes):
        with tarfile.open(root / f"src-{c:06d}.tar", "w") as tf:
            for j in range(per_class):
                i = c * per_class + j
                _write((str(root / "one.JPEG"), i, c, classes, IMAGENET))
                tf.add(root / "one.JPEG", arcname=f"{i:09d}.jpg")
                info = tarfile.TarInfo(f"{i:09d}.cls")
                info.size = len(str(c))
                tf.addfile(info, io.BytesIO(str(c).encode()))
    log(f"source: {classes} tars of {per_class} ImageNet-like JPEGs in {time.perf_counter() - t0:.1f}s")
    src = create_dataset(f"wds:{root}/src-{{000000..{classes - 1:06d}}}.tar", image_size=224)
    n = len(src)
    where = [m[:2] for m in src._members]  # (tar, offset) of each sample's image, canonical order
    orders = {"trainer's (canonical)": list(range(n)), "tar by tar": sorted(range(n), key=where.__getitem__)}
    blocks = [len({where[i][0] for i in range(a, min(n, a + 256))}) for a in range(0, n, 256)]
    cpu: dict[str, list[float]] = {k: [] for k in orders}
    wall: dict[str, list[float]] = {k: [] for k in orders}
    decode: list[float] = []
    for r in range(rounds):
        for name in (list(orders) if r % 2 == 0 else list(orders)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            for i in orders[name]:
                src.encoded_image(i)
            cpu[name].append((time.process_time() - c0) / n * 1e6)
            wall[name].append((time.perf_counter() - t0) / n * 1e6)
        m = min(n, 128)
        c0 = time.process_time()
        src.images_uint8(np.arange(m))
        decode.append((time.process_time() - c0) / m * 1e6)
    out = {"classes": classes, "per_class": per_class, "rounds": rounds, "tars_per_256_block": statistics.median(blocks),
           "jpeg_kb": statistics.mean(where_size[2] for where_size in src._members) / 1024,
           "decode_us_cpu": statistics.median(decode),
           "reads": {k: {"us_cpu": statistics.median(cpu[k]), "us_cpu_min": min(cpu[k]), "us_cpu_max": max(cpu[k]),
                         "us_wall": statistics.median(wall[k])} for k in orders}}
    for k, v in out["reads"].items():
        log(f"source reads, {k} order: {v['us_cpu']:.1f} us CPU a sample ({v['us_wall']:.1f} wall); decode + resize "
            f"{out['decode_us_cpu']:.0f} us CPU")
    return out


def source_markdown(result: dict) -> str:
    d = result["source"]
    head = (_measured(result) +
            f"shared), {result['date']}: a `wds:` source of {d['classes']} tars, each one class of {d['per_class']} "
            f"ImageNet-like JPEGs ({d['jpeg_kb']:.0f} KB on average, benchmarks/gpu_data.py), opened at 224 px; median "
            f"(range) over {d['rounds']} rounds, warm page cache. In the canonical order a block of 256 samples touches "
            f"**{d['tars_per_256_block']:.0f}** of the {d['classes']} tars: consecutive samples are in different tars, the "
            f"scatter the review found.\n")
    rows = ["| member reads in | µs CPU a sample | µs wall a sample | share of the decode + resize it feeds |",
            "|---|---|---|---|"]
    for k, v in d["reads"].items():
        rows.append(f"| {k} order | {v['us_cpu']:.1f} ({v['us_cpu_min']:.1f}-{v['us_cpu_max']:.1f}) | "
                    f"{v['us_wall']:.1f} | {100 * v['us_cpu'] / d['decode_us_cpu']:.2f}% |")
    rows.append(f"| (decode + resize to 224 px, `images_uint8`) | {d['decode_us_cpu']:,.0f} | | |")
    canonical, by_tar = (v["us_cpu"] for v in d["reads"].values())
    tail = (f"\nReading: tar by tar would save {canonical - by_tar:.1f} µs CPU a sample, "
            f"{100 * (canonical - by_tar) / d['decode_us_cpu']:.2f}% of the decode each read feeds, on a warm page "
            "cache: the scattered order costs nothing measurable there, so the source's reader is left as it is "
            "(reordering reads within a batch would not change what the trainer sees, and would not pay). Not "
            "measured: a cold cache (dropping it needs root) or a network file system, where a seek a sample is "
            "what would cost. A store's reads are not scattered: a store is written in the canonical order, and "
            "the trainer reads it in 256-sample blocks (`sampling.epoch_plan`), each inside one tar of a wds "
            "store whose shard size is a multiple of 256.\n")
    return head + "\n" + "\n".join(rows) + "\n" + tail


# --- 2. distinct classes per batch -----------------------------------------------------------

class _NoStores:
    """Stand-ins for the store reads of a labels-only source (order and batching are the stream's)."""

    class _NoStore:
        def prefetch(self, blocks) -> None:  # the stream's read-ahead hint: nothing to fetch
            pass

    def _readers(self):
        return [self._NoStore() for _ in self.stores]

    def _read_block(self, reader, start, stop):
        return np.zeros((stop - start, 1, 1, 1), np.int8)


def distinct(classes: int, per_class: int, batch: int, old: Any | None) -> list[dict]:
    from enspipe import stream as new

    rows = []
    for label, mod, interleaved in (("before", old, False), ("after", new, True)):
        if mod is None:
            continue
        labels = imagenet_layout(classes, per_class, interleaved)
        ds = labels_only(labels, (1, 1, 1), "synthetic")
        for mode, k in (("clean/adv", 0), ("ens-adv", 2)):
            cls = type("Stream", (_NoStores, mod.SourceBatches), {})
            stream = cls(ds, [f"/none/{i}" for i in range(k)], batch_size=batch, seed=0, check=False)
            counts = [len(np.unique(labels[b["index"].numpy()])) for b in stream if len(b["index"]) == batch]
            rows.append({"reader": label, "order": "class-interleaved" if interleaved else "class-sorted files",
                         "mode": mode, "stores": k, "distinct": float(np.mean(counts)), "batches": len(counts)})
            log(f"{label} {mode}: {rows[-1]['distinct']:.2f} distinct classes per batch of {batch}")
    return rows


# --- output ----------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    out = [_measured(result) +
           f"shared with other work: wall time there is mostly waiting, so the rates are per CPU-second of the "
           f"reading process), {result['date']}. \"before\": the reader at commit {BEFORE}; \"after\": this tree's. "
           "One process, `--loader-workers 0`, one epoch per round, every round runs both in alternating order on "
           "the same stores; median (range) over rounds. Batch 32, block 256, 8 buffer blocks; directions are "
           "i.i.d. random signs (the codecs' worst case), wds stores carry noise PNGs as precompute writes images.\n",
           "| stream | store | px | samples x rounds | before samples/CPU-s | after samples/CPU-s | after / before "
           "(CPU) | after / before (wall) |", "|---|---|---|---|---|---|---|---|"]
    for row in result["throughput"]:
        b, a = row.get("before"), row["after"]
        fmt = lambda d: f"{d['cpu_median']:,.0f} ({d['cpu_min']:,.0f}-{d['cpu_max']:,.0f})"  # noqa: E731
        kind = "trainer (SourceBatches, model + 2 stores)" if row["kind"] == "trainer" else "DirectionStream (2 stores)"
        out.append(f"| {kind} | {row['fmt']} | {row['px']} | {row['samples']:,} x {row['rounds']} | "
                   f"{fmt(b) if b else '-'} | {fmt(a)} | {row.get('cpu_ratio', float('nan')):.2f} | "
                   f"{row.get('ratio', float('nan')):.2f} |")
    ratios = [row["cpu_ratio"] for row in result["throughput"] if "cpu_ratio" in row]
    if ratios:
        out += ["", f"Lowest after / before ratio per CPU-second: **{min(ratios):.2f}** (the issue's bound: the "
                f"mixing change may cost at most 10%, a ratio of 0.90). The new reader reads the same blocks "
                "of the same stores; what changed is the order of the source (free at read time) and how a window's "
                "batches are cut (one gather per batch instead of a rolling buffer's copies)."]
    d = result["distinct"]
    out += ["", f"Distinct classes per batch at the ImageNet job's settings ({d['classes']:,} classes x "
            f"{d['per_class']:,} samples, class-sorted folders; batch {d['batch']}, block 256, 8 buffer blocks, one "
            f"epoch); i.i.d. (uniform without replacement, closed form): **{d['iid']:.2f}**.\n",
            "| reader | sample order | mode | distinct classes / batch | of i.i.d. |", "|---|---|---|---|---|"]
    for row in d["rows"]:
        out.append(f"| {row['reader']} | {row['order']} | {row['mode']}"
                   f"{' (' + str(row['stores']) + ' stores)' if row['stores'] else ''} | {row['distinct']:.2f} | "
                   f"{row['distinct'] / d['iid']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown-from", type=Path, help="write BENCHMARKS.md's section from a saved result; measure nothing")
    ap.add_argument("--quick", action="store_true", help="small stores, one round, 64 px only; writes only --out, "
                    "when given (never BENCHMARKS.md)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=4096, help="samples per store")
    ap.add_argument("--parts", default="throughput,distinct,reads,source,drawn",
                    help="comma-separated: throughput (1), distinct (2), reads (3: wds against zarr, issue 26), "
                    "source (4: a wds source's reads in the trainer's order), drawn (5: one drawn store per batch "
                    "against every store)")
    ap.add_argument("--out", type=Path, default=None,
                    help="the results JSON [benchmarks/results/bench_stream.json; with --quick: none]")
    args = ap.parse_args(argv)
    if args.markdown_from:
        result = json.loads(args.markdown_from.read_text())
        write_sections(result)
        return result
    parts = set(args.parts.split(","))
    known = {"throughput", "distinct", "reads", "source", "drawn"}
    if parts - known:
        ap.error(f"--parts: unknown part(s) {sorted(parts - known)}")
    old = old_stream() if "throughput" in parts or "distinct" in parts else None
    if old is None and ("throughput" in parts or "distinct" in parts):
        log(f"no git history: 'before' (commit {BEFORE}) is not measured")
    pxs = (64,) if args.quick else (64, 224)
    rounds = 1 if args.quick else args.rounds
    n = 512 if args.quick else args.samples
    result: dict[str, Any] = {"command": command_line("bench_stream.py", argv), "machine": machine(),
                              "date": time.strftime("%Y-%m-%d"), "throughput": []}
    with tempfile.TemporaryDirectory() as tmp:
        for px in pxs if "throughput" in parts else ():
            for fmt in ("zarr", "wds"):
                store = build_store(Path(tmp), fmt, n, px)
                for row in throughput(store, n, px, rounds, old, ("trainer", "direction")):
                    row["fmt"] = fmt
                    result["throughput"].append(row)
                    log(f"{row['kind']} {fmt} {px}px: after {row['after']['cpu_median']:,.0f}/CPU-s"
                        + (f", before {row['before']['cpu_median']:,.0f}/CPU-s, ratio {row['cpu_ratio']:.2f}"
                           if "before" in row else ""))
        if "reads" in parts:
            old_wds = old_wds_store()
            if old_wds is None:
                log(f"no git history: 'wds before' (commit {BEFORE_WDS}) is not measured")
            result["reads"] = [reads(Path(tmp) / "reads", 512 if args.quick else args.samples * (2 if px == 64 else 1) // 2,
                                     px, rounds, old_wds) for px in pxs]
        if "drawn" in parts:
            result["drawn"] = drawn(Path(tmp) / "drawn", 512 if args.quick else args.samples, 64, rounds)
        if "source" in parts:
            classes, per_class = (4, 8) if args.quick else (32, 32)
            result["source"] = source_reads(Path(tmp) / "source", classes, per_class, rounds)
    if "distinct" in parts:
        classes, per_class, batch = (100, 128, 32) if args.quick else (1000, 1281, 32)
        result["distinct"] = {"classes": classes, "per_class": per_class, "batch": batch, "iid": iid_distinct(
            classes, per_class, batch), "rows": distinct(classes, per_class, batch, old)}
    print(json.dumps(result, indent=1, default=str))
    # One results file per part set, so that measuring one part keeps the others' results.
    name = "bench_stream.json" if {"throughput", "distinct"} <= parts else f"bench_stream_{'_'.join(sorted(parts))}.json"
    out = args.out or (None if args.quick else REPO / "benchmarks" / "results" / name)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
    if not args.quick:
        write_sections(result)
    return result


def write_sections(result: dict) -> None:
    """BENCHMARKS.md's sections of the parts `result` holds (issue 22's needs both 1 and 2)."""
    if result.get("throughput") and "distinct" in result:
        update_section(REPO / "BENCHMARKS.md", SECTION, markdown(result))
    if result.get("reads"):
        update_section(REPO / "BENCHMARKS.md", READS_SECTION, reads_markdown(result))
    if result.get("drawn"):
        update_section(REPO / "BENCHMARKS.md", DRAWN_SECTION, drawn_markdown(result))
    if result.get("source"):
        update_section(REPO / "BENCHMARKS.md", SOURCE_SECTION, source_markdown(result))


if __name__ == "__main__":
    main()
