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

2. Distinct classes per batch at the ImageNet job's settings (jobs/imagenet_v3_ens3.toml: batch
   32, adv and ens-adv with 2 stores, default block_size 256 and buffer_blocks 8) on ImageNet's
   layout (1,000 classes x 1,281 samples, class-sorted folders), before (file order, the old
   reader) and after (class-interleaved order, the new reader), against the i.i.d. expectation
   in closed form for sampling without replacement.

    python benchmarks/bench_stream.py            # the BENCHMARKS.md figures (~10 min on 2 cores)
    python benchmarks/bench_stream.py --quick    # a smoke run: seconds, small stores, no file written
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

def build_store(root: Path, fmt: str, n: int, px: int) -> Path:
    import peers_stores

    peers_stores.GEOMETRY = (3, px, px)
    path, seconds, size = peers_stores.build_store(root / f"{fmt}{px}", fmt, n, shard_size=256)
    log(f"built {fmt} {px}px store of {n} samples in {seconds:.1f}s ({size / 2**20:.0f} MiB)")
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


# --- 2. distinct classes per batch -----------------------------------------------------------

class _NoStores:
    """Stand-ins for the store reads of a labels-only source (order and batching are the stream's)."""

    def _readers(self):
        return [None] * len(self.stores)

    def _read_block(self, reader, start, stop):
        return np.zeros((stop - start, 1, 1, 1), np.int8)

    def _read_rows(self, reader, indices):
        return np.zeros((len(indices), 1, 1, 1), np.int8)


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
    out = [f"Measured by `{result['command']}` on {result['machine']['cpu']} ({result['machine']['nproc']} cores, "
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
    ap.add_argument("--out", type=Path, default=None,
                    help="the results JSON [benchmarks/results/bench_stream.json; with --quick: none]")
    args = ap.parse_args(argv)
    if args.markdown_from:
        result = json.loads(args.markdown_from.read_text())
        update_section(REPO / "BENCHMARKS.md", SECTION, markdown(result))
        return result
    old = old_stream()
    if old is None:
        log(f"no git history: 'before' (commit {BEFORE}) is not measured")
    pxs = (64,) if args.quick else (64, 224)
    rounds = 1 if args.quick else args.rounds
    n = 512 if args.quick else args.samples
    result: dict[str, Any] = {"command": command_line("bench_stream.py", argv), "machine": machine(),
                              "date": time.strftime("%Y-%m-%d"), "throughput": []}
    with tempfile.TemporaryDirectory() as tmp:
        for px in pxs:
            for fmt in ("zarr", "wds"):
                store = build_store(Path(tmp), fmt, n, px)
                for row in throughput(store, n, px, rounds, old, ("trainer", "direction")):
                    row["fmt"] = fmt
                    result["throughput"].append(row)
                    log(f"{row['kind']} {fmt} {px}px: after {row['after']['cpu_median']:,.0f}/CPU-s"
                        + (f", before {row['before']['cpu_median']:,.0f}/CPU-s, ratio {row['cpu_ratio']:.2f}"
                           if "before" in row else ""))
    classes, per_class, batch = (100, 128, 32) if args.quick else (1000, 1281, 32)
    result["distinct"] = {"classes": classes, "per_class": per_class, "batch": batch,
                          "iid": iid_distinct(classes, per_class, batch), "rows": distinct(classes, per_class, batch, old)}
    print(json.dumps(result, indent=1, default=str))
    out = args.out or (None if args.quick else REPO / "benchmarks" / "results" / "bench_stream.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
    if not args.quick:
        update_section(REPO / "BENCHMARKS.md", SECTION, markdown(result))
    return result


if __name__ == "__main__":
    main()
