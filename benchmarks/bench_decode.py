"""JPEG decode per core: the PIL path vs the device path's CPU fallback, side by side in one run (issue 26).

    python benchmarks/bench_decode.py            # 256 ImageNet-like JPEGs (448 px -> 256 -> crop 224), 5 rounds
    python benchmarks/bench_decode.py --quick --no-md --out OUT   # the CI smoke run (seconds)

Sides, each timed in CPU-seconds of this process with one torch thread (images per CPU-second is
images per core), in interleaved rounds (each round runs every side once over all the images, in
a rotated order), median and range over the rounds:

  pil          what a loader worker does per image on the PIL path (`decoder` cpu): read the file,
               PIL decode, resize the shorter side to 256 (bilinear, antialiased), centre-crop 224
  device_cpu   the device path (`decoder` nvjpeg) with device="cpu": the worker's read + header
               check, then torchvision.io.decode_jpeg of the batch and the resize / crop on tensors
  worker_read  the loader worker's share on the device path alone: read the file and check its
               header (nothing decoded): with a GPU decoding, this is all the CPU does per image
  writer_zarr  the writer's work per sample (the sink thread's `write_shard`): one shard of all the
  writer_wds   images' directions (3x224x224 i.i.d. random signs: the codecs' worst case), float16
               logits [1000] and labels, into a new zarr / wds store; the wds store also carries
               each sample's JPEG as its source encoded it (precompute's default `wds_images`)

  nvjpeg       (with --cuda, on a CUDA machine) the device path's decode on the GPU: the batch's bytes
               (read beforehand) decoded by one batched nvJPEG call, resized and cropped there,
               synchronized; its wall-clock rate is the GPU's, its CPU-seconds the driving process's

The images are `gpu_data.py`'s (smooth noise, quality 90), at 448 px: ImageNet-like in size. Each side
also records its wall-clock rate (on a shared machine, CPU-seconds are the steadier figure).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, logger, machine, median, publish  # noqa: E402
from gpu_data import make_jpeg_folder  # noqa: E402

log = logger("bench_decode")
HEADING = "JPEG decode per core (PIL vs the device path's CPU fallback) and the writer's core"


def _writer(ds, fmt: str, workdir: Path):
    """A function writing one shard of all of ds's samples into a new `fmt` store under workdir."""
    import numpy as np

    from enspipe.stores import StoreIdentity, create_store, open_writer

    n = len(ds)
    ident = StoreIdentity(dataset={"source": "bench", "split": "train", "num_samples": n, "fingerprint": "bench"},
                          geometry=ds.geometry.shape, preprocess="bench", num_classes=1000, model_name="bench",
                          weights_sha256="0" * 64, attack="fgsm", attack_params={}, label_mode="pred")
    rng = np.random.default_rng(0)
    d = (rng.integers(0, 2, (n, *ds.geometry.shape), dtype=np.int8) * 2 - 1).astype(np.int8)
    logits, labels = rng.standard_normal((n, 1000)).astype(np.float16), rng.integers(0, 1000, n)
    files = [ds.encoded_image(i) for i in range(n)] if fmt == "wds" else None
    calls = iter(range(10**9))

    def write() -> None:
        path = workdir / f"w{next(calls)}.{fmt}"
        create_store(path, ident, fmt=fmt, shard_size=n)
        open_writer(path).write_shard(0, direction=d, logits=logits, label=labels, keys=ds.keys,
                                      true_label=labels if fmt == "wds" else None, image_files=files)
    return write


def _sides(ds, workdir: Path, cuda: bool = False):
    import torch

    from enspipe.data.decode import decode_batch
    from enspipe.data.loader import encoded_chunk

    n, cpu = len(ds), torch.device("cpu")
    transform, shape = ds.device_transform(), ds.geometry.shape
    sides = {
        "pil": lambda: ds.images_uint8(slice(0, n)),
        "device_cpu": lambda: decode_batch([encoded_chunk(ds, range(n))], transform, shape, cpu),
        "worker_read": lambda: encoded_chunk(ds, range(n)),
        "writer_zarr": _writer(ds, "zarr", workdir),
        "writer_wds": _writer(ds, "wds", workdir),
    }
    if cuda:
        gpu, chunk = torch.device("cuda"), encoded_chunk(ds, range(n))

        def nvjpeg() -> None:
            decode_batch([chunk], transform, shape, gpu)
            torch.cuda.synchronize(gpu)
        sides["nvjpeg"] = nvjpeg
    return sides


def run(images: int, size: int, rounds: int, workdir: Path, cuda: bool = False) -> dict:
    import torch

    from enspipe.data import create_dataset

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    root = make_jpeg_folder(workdir / f"jpeg{size}", images=images, size=size, classes=4)
    log(f"{images} JPEGs of {size} px in {time.perf_counter() - t0:.1f} s")
    ds = create_dataset(f"imagefolder:{root}")  # the ImageNet eval transform: 256, crop 224
    files = sorted((root / "train").glob("*/*.JPEG"))
    kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    (workdir / "stores").mkdir(exist_ok=True)
    sides = _sides(ds, workdir / "stores", cuda)
    names = tuple(sides)
    for fn in sides.values():  # warm: imports, the page cache, torchvision's kernels
        fn()
    per: dict[str, list[float]] = {s: [] for s in names}
    wall: dict[str, list[float]] = {s: [] for s in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for side in order:
            c, w = time.process_time(), time.perf_counter()
            sides[side]()
            per[side].append(len(ds) / (time.process_time() - c))
            wall[side].append(len(ds) / (time.perf_counter() - w))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{s} {per[s][-1]:.0f}" for s in names) + " img/CPU-s")

    def summary(d: dict[str, list[float]]) -> dict:
        return {s: {"median": median(v), "min": min(v), "max": max(v), "rounds": v} for s, v in d.items()}
    return {"images": len(ds), "source_px": size, "mean_kib": round(kb, 1), "out_px": ds.geometry.shape[1:],
            "rounds": rounds, "img_per_cpu_s": summary(per), "img_per_s_wall": summary(wall),
            "ratio_device_cpu_over_pil": median([a / b for a, b in zip(per["device_cpu"], per["pil"])])}


def markdown(res: dict, cmd: str, info: dict) -> str:
    rate, wall = res["img_per_cpu_s"], res["img_per_s_wall"]
    rows = "\n".join(f"| {s} | {rate[s]['median']:.0f} | {rate[s]['min']:.0f}–{rate[s]['max']:.0f} | "
                     f"{wall[s]['median']:.0f} |" for s in rate)
    gpu = info.get("gpu")
    return (
        f"`{cmd}` on {info['cpu']} ({info['nproc']} cores, shared; load at start "
        f"{', '.join(f'{x:.1f}' for x in info['loadavg_start'])}), torch {info['torch']}, one thread. "
        f"{res['images']} JPEGs of {res['source_px']} px ({res['mean_kib']} KiB mean, `gpu_data.py`'s), "
        f"to 3x{res['out_px'][0]}x{res['out_px'][1]} (shorter side 256, centre crop 224); images per CPU-second "
        f"(= per core), {res['rounds']} interleaved rounds, median and range:\n\n"
        "| side | img / CPU-s | range | img / s (wall) |\n|---|---|---|---|\n" + rows + "\n\n"
        "Rates per core depend on the files (their size and entropy: these are lighter than ImageNet's ~110 KiB "
        "JPEGs), so compare the sides of one run with each other, not with figures made on other images.\n\n"
        f"- **device_cpu / pil = {res['ratio_device_cpu_over_pil']:.2f}** (median of the per-round ratios): "
        "the device path's CPU fallback (torchvision's libjpeg-turbo decode + tensor resize) against the PIL path.\n"
        "- **worker_read** is what a loader worker does per image when the GPU decodes (`decoder` auto on "
        "CUDA, or nvjpeg): read the file and parse its header. "
        + (f"nvjpeg: the batched decode + resize/crop on {gpu}.\n" if gpu else
           "The nvJPEG decode itself is not measured (no GPU in this run; `--cuda` on a GPU machine adds it).\n")
        + "- pil is the loader worker's whole per-image work on the PIL path (`decoder` cpu, and `auto` "
        "without CUDA).\n"
        "- **writer_zarr / writer_wds**: the sink thread's CPU per sample (i.i.d. random sign maps, the codecs' "
        "worst case). This is why precompute's default `loader_workers` is cores - 2 (one core drives the "
        "compute, one is the writer's): at the rate a GPU host computes (issue 26: ~3,400 img/s for ResNet-50 "
        "Step-LL) the zarr writer alone needs 3,400 / writer_zarr = "
        f"{3400 / rate['writer_zarr']['median']:.2f} of a core (wds: {3400 / rate['writer_wds']['median']:.2f}). "
        "This 2-core machine cannot show the effect on a run (cores - 2 and the old cores - 1 both give 1 "
        "worker here).\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 images, 1 round: the CI smoke run")
    ap.add_argument("--images", type=int, default=None, help="[default: 256; --quick: 16]")
    ap.add_argument("--size", type=int, default=448, help="source side in pixels")
    ap.add_argument("--rounds", type=int, default=None, help="[default: 5; --quick: 1]")
    ap.add_argument("--workdir", default=None, help="where the JPEGs are made [default: a temporary folder]")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of bench_decode.json")
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--cuda", action="store_true", help="add the nvjpeg side (a CUDA device)")
    a = ap.parse_args(argv)
    images = a.images or (16 if a.quick else 256)
    rounds = a.rounds or (1 if a.quick else 5)
    cmd = command_line("bench_decode.py", argv)
    import torch

    info = machine(torch.device("cuda") if a.cuda else None)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(images, a.size, rounds, Path(a.workdir or tmp), a.cuda)
    doc = {"command": cmd, "machine": info, **res}
    publish(a.out, "bench_decode", doc, markdown(res, cmd, info), HEADING, no_md=a.no_md)


if __name__ == "__main__":
    main()
