"""The device decode's work in the process that trains, per batch: before and after it went batch-wide.

    python benchmarks/bench_device_step.py                 # batches of 256: ImageNet-like JPEGs and 256 px squares
    python benchmarks/bench_device_step.py --quick --no-md --out OUT   # the CI smoke run (seconds)

On a GPU the step's decode (`enspipe.train.device_batches.clean_images`: decode_batch, then
augment_on_device) runs in the process that drives the device, and every torch op it dispatches is
a kernel launch costing that process CPU time whatever the GPU does. This measures, on the CPU and
side by side in one run, what that process does per batch, the code before this change (copied
here as the reference) against enspipe's now:

  ops          torch ops dispatched per batch (exact: counted by a TorchDispatchMode; and of them, those
               that are not views, each a kernel launch on a GPU), for
               the crops/flips (a crop and a copy per sample, vs two gathers for the batch) and
               for decode + resize + placing (per image, vs per group of one image size), on a
               batch of one image size (a wds shard of resized images) and on ImageNet-like JPEGs
               of random sizes (groups of one: no gain there, by construction of these images)
  aug_ms       CPU ms per batch of the crops/flips at 3x8x8 (the ops' dispatch alone, as on a GPU host) and
               at 3x224x224 (on a CPU the data movement dominates: the CPU is not where this runs)
  bytes_ms     CPU ms per batch to make the JPEG bytes tensors for decode_jpeg (a bytearray copy
               of each, vs a read-only view)
  recv_ms      CPU ms of the training process per batch of ImageNet-like JPEGs received from a
               DataLoader worker: the chunk pickled with its bytes (through the worker's pipe), vs
               its JPEGs in one shared-memory tensor (`EncodedChunk.__reduce__`)

Medians and ranges over interleaved rounds, one torch thread. No GPU is used: a launch's own cost
on CUDA (~5 µs each) comes on top of each op's dispatch cost measured here.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch.utils.data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, logger, machine, median, publish  # noqa: E402
from gpu_data import IMAGENET, make_jpeg_folder  # noqa: E402

log = logger("bench_device_step")
HEADING = "The device decode's ops per batch in the training process"


# --- The code before (commit 2f9bc40), the reference sides ------------------------------------

def loop_augment(x, aug, pad):
    import torch.nn.functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    out = x.new_empty(x.shape)
    for i, (dy, dx, flip) in enumerate(aug.tolist()):
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(-1) if flip else crop
    return out


def per_image_decode(items, transform, shape, device):
    import torch

    from enspipe.data.decode import _decode_jpegs

    out = torch.empty((len(items), *shape), dtype=torch.uint8, device=device)
    for j, img in enumerate(_decode_jpegs(items, transform.mode, device)):
        out[j] = transform.apply(img)
    return out


@dataclass
class BytesChunk:
    """EncodedChunk as it pickled before: its JPEGs' bytes through the worker's pipe."""

    items: list
    indices: list


def copied_bytes(data):
    import torch

    return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]


def viewed_bytes(data):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        return [torch.frombuffer(b, dtype=torch.uint8) for b in data]


# --- Measuring -----------------------------------------------------------------------------------

def count_ops(fn) -> dict[str, int]:
    """Torch ops fn dispatches: all of them, and those that are not views (on a GPU, a kernel launch each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops, work = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            Count.work += not getattr(func, "is_view", False)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return {"ops": Count.ops, "work": Count.work}


class _Chunks(torch.utils.data.IterableDataset):
    """`n` chunks of the same items, made in a loader worker."""

    def __init__(self, cls, items: list[bytes], n: int):
        self.cls, self.items, self.n = cls, items, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.cls(self.items, list(range(len(self.items))))


def received_ms(cls, items: list[bytes], batches: int) -> float:
    """CPU ms of this process per batch of `items` received from one DataLoader worker (its start excluded)."""
    import torch

    loader = torch.utils.data.DataLoader(_Chunks(cls, items, batches + 1), batch_size=None, num_workers=1,
                                         prefetch_factor=2)
    it = iter(loader)
    next(it)
    c = time.process_time()
    n = sum(1 for _ in it)
    return (time.process_time() - c) / n * 1e3


def _batch(folder: Path, n: int) -> list[bytes]:
    return [f.read_bytes() for f in sorted(folder.glob("train/*/*.JPEG"))[:n]]


def run(batch: int, rounds: int, workdir: Path, imagenet: tuple[int, int] | int) -> dict:
    import numpy as np
    import torch

    from enspipe.data.decode import DeviceTransform, EncodedChunk, augment_on_device, decode_batch
    from enspipe.stream import augment_params

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    mixed = _batch(make_jpeg_folder(workdir / "mixed", images=batch, size=imagenet, classes=4), batch)
    square = _batch(make_jpeg_folder(workdir / "square", images=batch, size=256, classes=4), batch)
    log(f"{2 * batch} JPEGs in {time.perf_counter() - t0:.1f} s ({sum(map(len, mixed)) / batch / 1024:.0f} KiB "
        "mean, ImageNet-like)")
    transform, shape = DeviceTransform("RGB", resize=256, crop=224), (3, 224, 224)
    rng = np.random.default_rng(0)
    aug = torch.from_numpy(augment_params(rng, batch, "crop+flip", 4))

    ops = {}
    for name, items in (("one_size", square), ("imagenet_like", mixed)):
        ops[f"decode_{name}"] = {
            "before": count_ops(lambda: per_image_decode(items, transform, shape, cpu)),
            "now": count_ops(lambda: decode_batch([EncodedChunk(items, list(range(batch)))], transform, shape, cpu))}
    x224 = decode_batch([EncodedChunk(square, list(range(batch)))], transform, shape, cpu)
    x8 = torch.from_numpy(rng.integers(0, 256, (batch, 3, 8, 8), dtype=np.uint8))
    assert torch.equal(loop_augment(x224, aug, 4), augment_on_device(x224, aug, 4))
    ops["augment"] = {"before": count_ops(lambda: loop_augment(x224, aug, 4)),
                      "now": count_ops(lambda: augment_on_device(x224, aug, 4))}

    sides = {
        "aug8_before": lambda: loop_augment(x8, aug, 4), "aug8_now": lambda: augment_on_device(x8, aug, 4),
        "aug224_before": lambda: loop_augment(x224, aug, 4), "aug224_now": lambda: augment_on_device(x224, aug, 4),
        "bytes_before": lambda: copied_bytes(mixed), "bytes_now": lambda: viewed_bytes(mixed),
    }
    names = tuple(sides)
    ms: dict[str, list[float]] = {s: [] for s in (*names, "recv_before", "recv_now")}
    for fn in sides.values():
        fn()  # warm
    for r in range(rounds):
        for side in names[r % len(names):] + names[:r % len(names)]:
            c = time.process_time()
            for _ in range(3):
                sides[side]()
            ms[side].append((time.process_time() - c) / 3 * 1e3)
        for side, cls in (("recv_before", BytesChunk), ("recv_now", EncodedChunk))[::1 if r % 2 else -1]:
            ms[side].append(received_ms(cls, mixed, 2 if batch < 64 else 8))
    return {"date": time.strftime("%Y-%m-%d"), "batch": batch, "rounds": rounds, "sides_px": imagenet, "mean_kib": round(sum(map(len, mixed)) / batch / 1024, 1),
            "ops": ops, "cpu_ms": {s: {"median": median(v), "min": min(v), "max": max(v), "rounds": v}
                                    for s, v in ms.items()}}


def markdown(res: dict, cmd: str, info: dict) -> str:
    ops, t = res["ops"], res["cpu_ms"]
    rows = "\n".join(f"| {k} | {v['before']['ops']} ({v['before']['work']}) | {v['now']['ops']} ({v['now']['work']}) |"
                     for k, v in ops.items())
    times = "\n".join(
        f"| {label} | {t[a]['median']:.2f} ({t[a]['min']:.2f}–{t[a]['max']:.2f}) | "
        f"{t[b]['median']:.2f} ({t[b]['min']:.2f}–{t[b]['max']:.2f}) |"
        for label, a, b in (("crops/flips, 3x8x8 (almost no bytes: the ops' dispatch)", "aug8_before", "aug8_now"),
                            ("crops/flips, 3x224x224", "aug224_before", "aug224_now"),
                            ("JPEG bytes -> tensors", "bytes_before", "bytes_now"),
                            ("a batch from a loader worker (its pipe vs shared memory)", "recv_before", "recv_now")))
    return (
        f"`{cmd}` on {info['cpu']} ({info['nproc']} cores, shared; load at start "
        f"{', '.join(f'{x:.1f}' for x in info['loadavg_start'])}), {res['date']}, torch {info['torch']}, one "
        "thread, batches of "
        f"{res['batch']}: ImageNet-like JPEGs (`gpu_data.py`, sides of {res['sides_px'][0]}-{res['sides_px'][1]} px, "
        f"{res['mean_kib']} KiB mean) and "
        "256 px squares (one size, as a wds shard of resized images), to 3x224x224. Before: the code as of "
        "commit 2f9bc40 (copied into the benchmark); now: enspipe's.\n\n"
        "Torch ops dispatched per batch by the process that trains, all (and those that are not views: on a GPU, "
        "a kernel launch each):\n\n"
        "| work | before | now |\n|---|---|---|\n" + rows + "\n\n"
        f"CPU ms per batch, median (range) over {res['rounds']} interleaved rounds:\n\n"
        "| work | before | now |\n|---|---|---|\n" + times + "\n\n"
        "The decode counts one decode_jpeg per image (torchvision's loop on the CPU; on CUDA the batch is one "
        "nvJPEG call), so on a GPU a batch of one size is a handful of launches where it was ~2 per image. "
        "The ImageNet-like images here all differ in size, so grouping by size saves nothing on them (each "
        "image still costs ~11 ops: its decode, a float resize and its casts, the crop, the copy in place); real "
        "ImageNet repeats a few sizes often (500x375, 375x500, 500x333, ...), not measured here (no ImageNet on "
        "this machine). On a GPU these ops are queued asynchronously: they cost the training process CPU time and "
        "stall the GPU only where that process falls behind it. At 224 px the CPU spends its time moving bytes, which the GPU does when this runs "
        "there: the per-sample loop is faster on a CPU, and the CPU never runs this path outside tests "
        "(`decoder` auto on a CPU is PIL in the loader workers).\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batches of 8 small images, 1 round: the CI smoke run")
    ap.add_argument("--batch", type=int, default=None, help="[default: 256; --quick: 8]")
    ap.add_argument("--rounds", type=int, default=None, help="[default: 5; --quick: 1]")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of bench_device_step.json")
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    a = ap.parse_args(argv)
    batch, rounds = a.batch or (8 if a.quick else 256), a.rounds or (1 if a.quick else 5)
    cmd = command_line("bench_device_step.py", argv)
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(batch, rounds, Path(tmp), (240, 300) if a.quick else IMAGENET)
    doc = {"command": cmd, "machine": info, **res}
    publish(a.out, "bench_device_step", doc, markdown(res, cmd, info), HEADING, no_md=a.no_md)


if __name__ == "__main__":
    main()
