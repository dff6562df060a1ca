"""bench_gpu.py --part precompute: enspipe precompute against the bare input-gradient loop on one device.

On the synthetic ImageFolder the driver made (JPEGs of 256 px, `gpu_data.make_jpeg_folder`),
at --image-size 224, batch 256, shards of 512 (--small: the 64 px JPEGs at 32 px, batch 32, shards of 16,
the paper's small convolutional architecture C, on the CPU), all in one process and one run:

  static model   the architecture (resnet50; --small C) trained briefly on the images
                 themselves (bf16 autocast on CUDA), so that its directions are a trained
                 model's: a random network's input gradient is noise, and so is its bf16 flip share.
  loader alone   the decode rate of precompute's loader (its worker processes, its chunks).
  bare           the input gradient of that model in a plain PyTorch loop over images already
                 on the device as float: forward, least-likely label, CE, autograd.grad, sign,
                 int8. fp32 and bf16 + channels_last; each with cuDNN autotuning (the fastest
                 the device does) and with enspipe's deterministic settings (what precompute runs).
  precompute     `precompute()` into a fresh store root: zarr fp32, zarr bf16, wds fp32 (the
                 JPEGs carried as they are) in-process, and zarr fp32 on one dask worker
                 (a LocalCluster started by precompute). Each run is cold for the dataset and
                 model (the process caches are cleared; CUDA itself is warmed by an untimed run).
                 Steady rate: samples per second between the first and the last shard's
                 completion record (their mtimes). Start-up: the run's wall time before the
                 first shard, less one shard at the steady rate. End to end: N / the whole call.
  stores         bits per direction element (direction bytes in the shard records; wds also
                 with its images), the share of direction elements bf16 flips against fp32,
                 and whether the dask, in-process and wds stores hold equal directions.

Targets (issue 16): precompute >= 0.9x the bare rate at the same precision; one dask worker
>= 0.9x in-process (steady); wds >= 0.8x zarr end to end; <= 1.1 bits per element in wds.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

PART = "precompute"

FULL = dict(model="resnet50", image_size=224, batch_size=256, shard_size=512, train_epochs=2, train_batch=128,
            bare_repeats=2)
SMALL = dict(model="C", image_size=32, batch_size=32, shard_size=16, train_epochs=2, train_batch=16,
             bare_repeats=1)
TARGETS = {"bare": 0.9, "dask": 0.9, "wds": 0.8, "bits": 1.1}


def add_arguments(ap) -> None:
    ap.add_argument("--precompute-model", default=None, help="static model architecture (default resnet50; --small: C)")


# --- Data and the static model --------------------------------------------------------------------

def decode_all(ds, workers: int) -> tuple[Any, float]:
    """Every image of `ds` as uint8 through precompute's own loader; (pixels, images/s)."""
    import torch

    from enspipe.data.loader import ChunkLoader, chunk_size

    spans = [(a, min(a + chunk_size(256, workers), len(ds))) for a in range(0, len(ds), chunk_size(256, workers))]
    with ChunkLoader(ds, workers) as loader:
        t0 = time.perf_counter()
        x = torch.cat(list(loader(spans)))
        rate = len(ds) / (time.perf_counter() - t0)
    return x, rate


def train_static(arch: str, ds, x_u8, device, *, epochs: int, batch: int, run_dir: Path, log) -> dict[str, Any]:
    """The static model: `arch` trained briefly on the images (labels = their class folders)."""
    import torch
    import torch.nn.functional as F

    from enspipe.models import create_model, save_model

    torch.manual_seed(0)
    model = create_model(arch, num_classes=ds.num_classes, input_size=ds.geometry.shape).to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    y_all = torch.from_numpy(ds.labels).to(device)
    x_all = x_u8.to(device)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(ds), generator=g).split(batch):
            idx = idx.to(device)
            x = x_all[idx].float().div_(255)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        pred = torch.cat([model(x_all[i:i + 256].float().div_(255)).argmax(1) for i in range(0, len(ds), 256)])
    _sync(device)
    seconds = time.perf_counter() - t0
    acc = float((pred == y_all).float().mean())
    del x_all
    save_model(model.to(memory_format=torch.contiguous_format).cpu(), run_dir)
    log(f"static {arch}: {epochs} epoch(s) in {seconds:.1f} s, train accuracy {acc:.3f}")
    return {"arch": arch, "epochs": epochs, "seconds": seconds, "train_accuracy": acc}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- The bare loop ----------------------------------------------------------------------------------

def bare_rate(model, x_u8, device, *, precision: str, deterministic: bool, batch: int, repeats: int) -> float:
    """Images/s of the plain input-gradient loop over device-resident float images."""
    import torch
    import torch.nn.functional as F

    from enspipe.precision import Precision
    from enspipe.precompute.compute import _deterministic

    prec = Precision.resolve(precision, device)
    prec.prepare_model(model)
    cl = prec.channels_last
    x_all = x_u8.to(device).float().div_(255)
    if cl:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def one_pass(stop: int | None = None) -> None:
        for b in range(0, stop or len(x_all), batch):
            x = x_all[b:b + batch].detach().requires_grad_(True)
            with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
                logits = model(x).float()
            loss = F.cross_entropy(logits, logits.detach().argmin(1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            grad.sign_().neg_().to(torch.int8)

    with _deterministic() if deterministic else _autotuned():
        one_pass(2 * batch)  # warm-up (and cuDNN's autotuning when it is on)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            one_pass()
        _sync(device)
        seconds = time.perf_counter() - t0
    return repeats * len(x_all) / seconds


class _autotuned:
    def __enter__(self):
        import torch

        self.saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True

    def __exit__(self, *exc):
        import torch

        torch.backends.cudnn.benchmark = self.saved


# --- enspipe precompute -------------------------------------------------------------------------------

def timed_precompute(cfg) -> dict[str, Any]:
    """One cold precompute run: wall time, steady rate from the shard records, start-up, the store."""
    from enspipe.precompute import plan, precompute
    from enspipe.stores import open_store

    shutil.rmtree(cfg.out, ignore_errors=True)
    plan._INPUTS.clear()  # cold: the dataset and model are opened inside the timed call
    t0 = time.time()
    (path,) = precompute(cfg)
    t1 = time.time()
    m = open_store(path).manifest
    stamps = sorted(p.stat().st_mtime for p in (path / "shards").glob("*.json"))
    n, shard = m["num_samples"], m["shard_size"]
    spread = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    steady = (len(stamps) - 1) * shard / spread if spread > 0 else None
    startup = (stamps[0] - t0 - shard / steady) if steady else None
    return {"path": str(path), "wall_s": t1 - t0, "end_to_end": n / (t1 - t0), "steady": steady,
            "startup_s": startup, "finalize_s": t1 - stamps[-1], "shards": len(stamps)}


def store_facts(paths: dict[str, str]) -> dict[str, Any]:
    from enspipe.stores import open_store, store_info

    d = {k: open_store(p).read(0, len(open_store(p)))["direction"] for k, p in paths.items()}
    elements = d["zarr_fp32"].size
    wds_bytes = sum(f.stat().st_size for f in Path(paths["wds_fp32"]).glob("*.tar"))
    facts = {
        "bits_zarr": store_info(paths["zarr_fp32"]).bits_per_element,
        "bits_wds": store_info(paths["wds_fp32"]).bits_per_element,
        "bits_wds_with_images": wds_bytes * 8 / elements,
        "zeros_fp32": float((d["zarr_fp32"] == 0).mean()),
        "dask_equals_in_process": bool(np.array_equal(d["dask_zarr_fp32"], d["zarr_fp32"])),
        "wds_equals_zarr": bool(np.array_equal(d["wds_fp32"], d["zarr_fp32"])),
    }
    if "zarr_bf16" in d:
        facts["bf16_flip_share"] = float((d["zarr_bf16"] != d["zarr_fp32"]).mean())
        facts["zeros_bf16"] = float((d["zarr_bf16"] == 0).mean())
    return facts


# --- The part -------------------------------------------------------------------------------------------

def measure(opts, env: dict[str, Any]) -> dict[str, Any]:
    import torch

    from enspipe.data import create_dataset
    from enspipe.models import load_model
    from enspipe.precision import Precision
    from enspipe.precompute import PrecomputeConfig
    from enspipe.data.loader import default_workers

    log: Callable[[str], None] = env["log"]
    device, work = env["device"], Path(env["work"]) / "precompute"
    c = dict(SMALL if env["small"] else FULL)
    c["model"] = opts.precompute_model or c["model"]
    work.mkdir(parents=True, exist_ok=True)
    dataset = f"imagefolder:{env['jpegs']}"
    ds = create_dataset(dataset, image_size=c["image_size"])
    workers = default_workers(ds)
    x_u8, decode_rate = decode_all(ds, workers)
    log(f"loader alone: {decode_rate:.0f} images/s with {workers} worker process(es)")
    res: dict[str, Any] = {"config": {**c, "images": len(ds), "geometry": list(ds.geometry.shape),
                                      "loader_workers": workers, "device": str(device)},
                           "loader_images_per_s": decode_rate}
    run_dir = work / "static"
    res["static"] = train_static(c["model"], ds, x_u8, device, epochs=c["train_epochs"], batch=c["train_batch"],
                                 run_dir=run_dir, log=log)

    try:
        Precision.resolve("bf16", device, strict=True)
        precisions = ("fp32", "bf16")
    except Exception as e:  # a device without bf16: measured in fp32 only, and said so
        precisions = ("fp32",)
        res["bf16_skipped"] = str(e)
        log(f"bf16 skipped: {e}")

    model = load_model(run_dir).to(device).eval().requires_grad_(False)
    res["bare"] = {}
    for precision in precisions:
        for det in (False, True):
            key = f"{precision}{'_deterministic' if det else ''}"
            res["bare"][key] = bare_rate(model, x_u8, device, precision=precision, deterministic=det,
                                         batch=c["batch_size"], repeats=c["bare_repeats"])
            log(f"bare {key}: {res['bare'][key]:.0f} images/s")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    base = dict(model=str(run_dir), dataset=dataset, image_size=c["image_size"], shard_size=c["shard_size"],
                batch_size=c["batch_size"], device=str(device))
    # Untimed: CUDA, cuDNN and the pinned-memory cache warm up here, not in the first measured run.
    timed_precompute(PrecomputeConfig(**base, limit=c["shard_size"], out=str(work / "warmup")))
    runs = {"zarr_fp32": dict(format="zarr"), "wds_fp32": dict(format="wds"),
            "dask_zarr_fp32": dict(format="zarr", dask_workers=1)}
    if "bf16" in precisions:
        runs["zarr_bf16"] = dict(format="zarr", precision="bf16")
    res["precompute"] = {}
    for name, kw in runs.items():
        r = timed_precompute(PrecomputeConfig(**base, **kw, out=str(work / name)))
        res["precompute"][name] = r
        log(f"precompute {name}: steady {r['steady'] or float('nan'):.0f} images/s, end to end "
            f"{r['end_to_end']:.0f} images/s, start-up {r['startup_s'] or float('nan'):.1f} s")
    res["stores"] = store_facts({k: v["path"] for k, v in res["precompute"].items()})
    res["ratios"] = ratios(res)
    res["rows"] = rows(res)
    return res


def ratios(res: dict[str, Any]) -> dict[str, float | None]:
    pc, bare = res["precompute"], res["bare"]
    div = lambda a, b: a / b if a and b else None  # noqa: E731
    out = {
        "zarr_fp32_vs_bare": div(pc["zarr_fp32"]["steady"], bare["fp32"]),
        "zarr_fp32_vs_bare_deterministic": div(pc["zarr_fp32"]["steady"], bare["fp32_deterministic"]),
        "dask_vs_in_process_steady": div(pc["dask_zarr_fp32"]["steady"], pc["zarr_fp32"]["steady"]),
        "dask_vs_in_process_end_to_end": div(pc["dask_zarr_fp32"]["end_to_end"], pc["zarr_fp32"]["end_to_end"]),
        "wds_vs_zarr_end_to_end": div(pc["wds_fp32"]["end_to_end"], pc["zarr_fp32"]["end_to_end"]),
    }
    if "zarr_bf16" in pc:
        out["zarr_bf16_vs_bare"] = div(pc["zarr_bf16"]["steady"], bare["bf16"])
        out["zarr_bf16_vs_bare_deterministic"] = div(pc["zarr_bf16"]["steady"], bare["bf16_deterministic"])
    return out


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def _verdict(v: float | None, target: float, *, at_most: bool = False) -> str:
    if v is None:
        return "n/a"
    ok = v <= target if at_most else v >= target
    return f"{v:.2f} ({'≤' if at_most else '≥'} {target}: {'met' if ok else '**missed**'})"


def rows(res: dict[str, Any]) -> list[list[str]]:
    """The compact table: [measure, value, ratio / target]."""
    pc, bare, st, r = res["precompute"], res["bare"], res["stores"], res["ratios"]
    out = [["loader alone (decode + resize)", f"{_fmt(res['loader_images_per_s'])} img/s, "
            f"{res['config']['loader_workers']} workers", "—"]]
    for p in ("fp32", "bf16"):
        if p in bare:
            label = "bare input gradient, fp32" if p == "fp32" else "bare input gradient, bf16 + channels_last"
            out.append([label, f"{_fmt(bare[p])} img/s (deterministic: {_fmt(bare[p + '_deterministic'])})", "1.00"])

    def run(name: str) -> str:
        x = pc[name]
        return (f"{_fmt(x['steady'])} img/s steady, {_fmt(x['end_to_end'])} end to end "
                f"(start-up {_fmt(x['startup_s'], '.1f')} s)")
    out.append(["precompute → zarr, fp32, in-process", run("zarr_fp32"),
                f"× bare {_verdict(r['zarr_fp32_vs_bare'], TARGETS['bare'])}; × deterministic bare "
                f"{_fmt(r['zarr_fp32_vs_bare_deterministic'], '.2f')}"])
    if "zarr_bf16" in pc:
        out.append(["precompute → zarr, bf16, in-process", run("zarr_bf16"),
                    f"× bare {_verdict(r['zarr_bf16_vs_bare'], TARGETS['bare'])}; × deterministic bare "
                    f"{_fmt(r['zarr_bf16_vs_bare_deterministic'], '.2f')}"])
    out.append(["precompute → zarr, fp32, one dask worker", run("dask_zarr_fp32"),
                f"× in-process steady {_verdict(r['dask_vs_in_process_steady'], TARGETS['dask'])}; end to end "
                f"{_fmt(r['dask_vs_in_process_end_to_end'], '.2f')}"])
    out.append(["precompute → wds (JPEGs as is), fp32, in-process", run("wds_fp32"),
                f"× zarr end to end {_verdict(r['wds_vs_zarr_end_to_end'], TARGETS['wds'])}"])
    out.append(["bits per direction element", f"zarr {_fmt(st['bits_zarr'], '.3f')}, wds {_fmt(st['bits_wds'], '.3f')} "
                f"(wds with its JPEGs: {_fmt(st['bits_wds_with_images'], '.2f')})",
                f"wds {_verdict(st['bits_wds'], TARGETS['bits'], at_most=True)}"])
    if "bf16_flip_share" in st:
        out.append(["direction elements bf16 flips against fp32", f"{100 * st['bf16_flip_share']:.2f}%",
                    f"zeros: fp32 {100 * st['zeros_fp32']:.3f}%, bf16 {100 * st['zeros_bf16']:.3f}%"])
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    out.append(["stores equal (dask = in-process; wds = zarr)",
                f"{yes(st['dask_equals_in_process'])}; {yes(st['wds_equals_zarr'])}", "—"])
    return out


def render(res: dict[str, Any], record: dict[str, Any]) -> str:
    c = res["config"]
    lines = [
        f"Static model {res['static']['arch']} trained {res['static']['epochs']} epoch(s) on the {c['images']} "
        f"synthetic JPEGs (train accuracy {res['static']['train_accuracy']:.2f}); geometry "
        f"{'x'.join(map(str, c['geometry']))}, batch {c['batch_size']}, shards of {c['shard_size']}, "
        f"{c['loader_workers']} loader workers, device {c['device']}."
        + (f" bf16 was not measured: {res['bf16_skipped']}" if "bf16_skipped" in res else ""),
        "",
        "| measure | value | ratio / target |",
        "|---|---|---|",
        *[f"| {a} | {b} | {t} |" for a, b, t in res["rows"]],
        "",
        BASELINE,
        "",
    ]
    return "\n".join(lines)


BASELINE = ("Before (issue 16, one H200, the same 4,096 JPEGs at 224 px, batch 256, resnet50 Step-LL): zarr "
            "steady 595 img/s = 0.175x the bare fp32 input gradient (3,404 img/s; 3,106 deterministic; 3,843 "
            "bf16 + channels_last); one dask worker 217 img/s = 0.064x; wds end to end 47 img/s = 0.20x zarr, "
            "5.6 bits per direction element counting the PNG-re-encoded images.")



# --- Standalone: the bf16 flip share of any trained model, on any device --------------------------

def flip_share(model: str, dataset: str, *, out: Path, device: str = "auto", **data: Any) -> dict[str, Any]:
    """fp32 and bf16 Step-LL stores of `model` over `dataset` through precompute(); the share of
    direction elements whose sign bf16 changes (and the zeros of each)."""
    from enspipe.precompute import PrecomputeConfig, precompute
    from enspipe.stores import open_store

    d = {}
    for precision in ("fp32", "bf16"):
        (path,) = precompute(PrecomputeConfig(model=model, dataset=dataset, out=str(out), device=device,
                                              precision=precision, **data))
        r = open_store(path)
        d[precision] = r.read(0, len(r))["direction"]
    return {"model": model, "dataset": dataset, **data, "samples": len(d["fp32"]),
            "flip_share": float((d["bf16"] != d["fp32"]).mean()),
            "zeros_fp32": float((d["fp32"] == 0).mean()), "zeros_bf16": float((d["bf16"] == 0).mean())}


def main(argv: list[str] | None = None) -> None:
    """python benchmarks/gpu_precompute.py MODEL_RUN --dataset mnist --data-root ROOT --limit 4096"""
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(description="bf16 against fp32: the share of direction elements whose sign flips")
    ap.add_argument("model", help="a trained run dir or checkpoint")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--limit", type=int, default=4096)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        res = flip_share(a.model, a.dataset, out=Path(out), device=a.device, data_root=a.data_root, limit=a.limit,
                         image_size=a.image_size)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
