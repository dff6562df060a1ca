"""The training half of bench_gpu: enspipe's trainer against a bare PyTorch train step (issue 17).

    python benchmarks/gpu_train.py --out out/gpu-train                 # full: one GPU, < 4 min on an H200
    python benchmarks/gpu_train.py --out out/gpu-train-small --small   # CPU smoke run, well under a minute
    python benchmarks/bench_gpu.py --part train --out out/gpu           # the same, through the driver

For each model (resnet18, resnet50 at 224 px; --small: the MLP "D" at 64 px on the CPU), on
a synthetic ImageFolder of JPEGs (benchmarks/gpu_data.py; 4,096 images of 256 px, 16 classes):

  bare fp32 / bare bf16+cl   the trained model's train step (forward, cross-entropy, backward,
                             SGD step) on one batch resident on the GPU, fp32, and bf16
                             autocast + channels_last: the physical limit of each precision.
  loader                     the trainer's loader alone (no GPU work): the JPEG decode cap.
  clean fp32 / clean / adv / ens-adv   `enspipe.train.train()` itself (bf16 + channels_last
                             unless fp32 is named), 3 epochs, SGD, log every 8 steps; ens-adv
                             with 2 stores of static directions (random ±1 maps written through
                             the store API, the worst case for decompression).

Rates come from train()'s metrics windows (each ends with a host sync): `steady` is
samples / seconds over every window but each epoch's first (so it leaves out the epoch
boundaries and the first epoch's warm-up), `epoch N` is that epoch's samples / its windows'
seconds. The epoch-boundary stall is the host time from an epoch's last step to the next
epoch's first batch (`boundary_s`: metrics flush, checkpoint snapshot, waiting for data),
shown in seconds and as a share of a 50,000-image epoch at the steady rate.

Writes OUT/gpu_train.json (every number and the machine) and OUT/gpu_train.md, and prints a
compact table last. bench_gpu.py drives it as a part: `PART`, `add_arguments(parser)`,
`measure(opts, env) -> dict` (on the driver's JPEG folder, in its scratch directory) and
`render(results, record)`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

PART = "train"
TARGETS = {"ens-adv / bare bf16 (resnet50)": ">= 0.85", "ens-adv / clean": "<= 1.10",
           "boundary stall, 50k-image epoch": "< 2%", "first-window stall, 50k-image epoch (resnet50)": "< 2%"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The training half's options (ones the driver already has are left to it)."""
    def add(flag: str, **kw: Any) -> None:
        if flag not in p._option_string_actions:  # noqa: SLF001 -- shared flags belong to the driver
            p.add_argument(flag, **kw)

    add("--out", required=True, help="results directory")
    add("--small", action="store_true", help="CPU smoke run: tiny model, 64 images of 64 px, seconds")
    add("--device", default=None, help="cuda (full default) or cpu (--small default)")
    add("--data", default=None, help="where the synthetic JPEG folder is made/reused [OUT/jpegs]")
    add("--train-models", default=None, help="comma list [resnet18,resnet50; --small: D, the paper's MLP]")
    add("--train-images", type=int, default=None, help="JPEGs [4096; --small: 64]")
    add("--train-image-size", type=int, default=None, help="training image side [224; --small: 64]")
    add("--train-batch-size", type=int, default=None, help="batch size [128; --small: 16]")
    add("--train-epochs", type=int, default=None, help="epochs per enspipe run [3; --small: 2]")
    add("--train-workers", type=int, default=None, help="loader workers [cores - 2, at most 14; --small: 2]")
    add("--train-modes", default="clean-fp32,clean,adv,ens-adv",
        help="enspipe runs per model: clean-fp32, clean, adv, ens-adv (bf16 + channels_last but clean-fp32)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    small = bool(args.small)
    pick = lambda value, full, tiny: value if value is not None else (tiny if small else full)  # noqa: E731
    cores = os.cpu_count() or 2
    return {
        "small": small,
        "device": args.device or ("cpu" if small else "cuda"),
        "models": pick(args.train_models, "resnet18,resnet50", "D").split(","),
        "images": pick(args.train_images, 4096, 64),
        "image_size": pick(args.train_image_size, 224, 64),
        "jpeg_size": [400, 500] if not small else 72,  # gpu_data.IMAGENET: ImageNet-like JPEGs
        "classes": 16 if not small else 4,
        "batch_size": pick(args.train_batch_size, 128, 16),
        "epochs": pick(args.train_epochs, 3, 2),
        "workers": pick(args.train_workers, max(2, min(14, cores - 2)), 2),
        "modes": [m for m in args.train_modes.split(",") if m],
        "bare_steps": 4 if small else 30,
        "log_every": 2 if small else 8,
    }


def _log(msg: str) -> None:
    print(f"[gpu_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the bare train step ------------------------------------------------------------------------

def bare_rate(model_name: str, s: dict[str, Any], num_classes: int, precision: str) -> dict[str, Any]:
    """img/s of forward + cross-entropy + backward + SGD step on one GPU-resident batch, with
    cuDNN autotuning on (the physical limit; enspipe's trainer leaves torch's default, off, and
    its precompute turns it off for deterministic stores)."""
    import torch
    import torch.nn.functional as F

    from enspipe.models import create_model

    device = torch.device(s["device"])
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes, input_size=(3, s["image_size"], s["image_size"]))
    model = model.to(device).train()
    cl = precision == "bf16" and device.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(s["batch_size"], 3, s["image_size"], s["image_size"], device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (s["batch_size"],), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for _ in range(max(3, s["bare_steps"] // 3)):  # warm-up: cuDNN autotunes here
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(s["bare_steps"]):
            step()
        _sync(device)
        dt = time.perf_counter() - t0
    finally:
        torch.backends.cudnn.benchmark = saved
    return {"img_per_s": s["bare_steps"] * s["batch_size"] / dt, "steps": s["bare_steps"], "seconds": dt,
            "channels_last": cl}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- data and stores ----------------------------------------------------------------------------

def synthetic_stores(dataset: Any, root: Path, k: int = 2) -> list[str]:
    """k complete zarr stores of random ±1 directions for `dataset`, written through the store
    API (what precompute writes, without the static models' compute)."""
    import numpy as np

    from enspipe.stores import StoreIdentity, create_store, store_path

    paths = []
    for j in range(k):
        ident = StoreIdentity(
            dataset=dataset.identity(), geometry=dataset.geometry.shape, preprocess=dataset.geometry.preprocess,
            num_classes=dataset.num_classes, model_name=f"synthetic-static-{j}", weights_sha256=f"{j:064x}",
            attack="fgsm", attack_params={"loss": "ce", "target": "pred_label", "direction": "sign(grad)"},
            label_mode="pred")
        path = store_path(root, ident, "zarr")
        writer = create_store(path, ident, fmt="zarr", shard_size=1024)
        rng = np.random.default_rng(j)
        for shard in writer.pending_shards():
            a, b = writer.shard_range(shard)
            d = (rng.integers(0, 2, size=(b - a, *dataset.geometry.shape), dtype=np.int8) * 2 - 1).astype(np.int8)
            writer.write_shard(shard, direction=d, logits=np.zeros((b - a, dataset.num_classes), np.float16),
                               label=np.zeros(b - a, np.int64), keys=dataset.keys[a:b])
        writer.finalize()
        paths.append(str(path))
    return paths


def loader_rate(dataset: Any, cfg: Any, device: Any, epochs: int = 2) -> dict[str, Any]:
    """The trainer's loader alone, over `epochs` epochs with its workers kept: img/s per epoch."""
    import torch

    from enspipe.train import batch_loader, batch_stream
    from enspipe.train.kit import epoch_batches

    rates = []
    t0 = time.perf_counter()
    for _, batches in epoch_batches(lambda e: batch_stream(dataset, cfg, e), lambda st: batch_loader(st, cfg, device),
                                    range(epochs), cfg.workers):
        n = sum(len(b["y"]) for b in batches)
        t1 = time.perf_counter()
        rates.append(n / (t1 - t0))
        t0 = t1
    del torch
    return {"img_per_s_per_epoch": rates, "img_per_s": rates[-1]}


# --- enspipe runs -------------------------------------------------------------------------------

def enspipe_run(name: str, model_name: str, mode: str, precision: str, dataset_spec: str, stores: list[str],
                s: dict[str, Any], work: Path) -> dict[str, Any]:
    from enspipe.train import TrainConfig, train

    records: list[dict[str, Any]] = []
    cfg = TrainConfig(model=model_name, dataset=dataset_spec, image_size=s["image_size"], mode=mode,
                      shards=tuple(stores) if mode == "ens-adv" else (), attack="fgsm", eps=16 / 256,
                      epochs=s["epochs"], batch_size=s["batch_size"], optimizer="sgd", lr=0.01,
                      loader_workers=s["workers"], device=s["device"], log_every=s["log_every"], precision=precision,
                      keep_checkpoints=1)
    run_dir = work / f"{model_name}-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun into the same --out measures afresh
    t0 = time.perf_counter()
    train(cfg, run_dir, on_metrics=records.append)
    wall = time.perf_counter() - t0
    train_recs = [r for r in records if r.get("kind", "train") == "train"]
    return {"name": name, "mode": mode, "precision": precision, "call_s": wall, **window_rates(train_recs)}


def window_rates(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Steady and per-epoch rates and the boundary stalls from train()'s metrics windows."""
    per: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        per.setdefault(r["epoch"], []).append(r)
    epochs = sorted(per)
    steady = [w for e in epochs[1:] for w in per[e][1:]] or [w for e in epochs for w in per[e][1:]]
    out: dict[str, Any] = {
        "steady_img_per_s": sum(w["samples"] for w in steady) / max(sum(w["seconds"] for w in steady), 1e-9),
        "epoch_img_per_s": {e: sum(w["samples"] for w in per[e]) / max(sum(w["seconds"] for w in per[e]), 1e-9)
                            for e in epochs},
        "first_window_img_per_s": {e: per[e][0]["samples"] / max(per[e][0]["seconds"], 1e-9) for e in epochs},
        "boundary_s": {e: per[e][0].get("boundary_s") for e in epochs[1:]},
        "wait_s": sum(w.get("wait_s", 0.0) for w in records),
        "online_passes": sum(w["online_passes"] for w in records),
        "batches": sum(w["batches"] for w in records),
    }
    stalls = [b for b in out["boundary_s"].values() if b is not None]
    out["boundary_s_median"] = statistics.median(stalls) if stalls else None
    out["stall_share_50k_epoch"] = (out["boundary_s_median"] * out["steady_img_per_s"] / 50_000
                                    if stalls else None)
    # The first metrics window of each epoch (what the GPU run found slow): the seconds it took
    # beyond what its samples take at the steady rate, and that as a share of a 50,000-image
    # epoch at the steady rate. Judged on the epochs after the first (the first also warms up).
    steady_rate = out["steady_img_per_s"]
    if steady_rate <= 0:
        out["first_window_lost_s"], out["first_window_stall_share_50k_epoch"] = {}, None
        return out
    lost = {e: max(0.0, per[e][0]["seconds"] - per[e][0]["samples"] / steady_rate) for e in epochs}
    out["first_window_lost_s"] = lost
    later = [lost[e] for e in epochs[1:]] or list(lost.values())
    out["first_window_stall_share_50k_epoch"] = statistics.median(later) * steady_rate / 50_000
    return out


# --- the whole half ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything (see the module doc); returns the results dict it also writes."""
    import torch

    from _common import machine
    from gpu_data import make_jpeg_folder

    from enspipe.data import create_dataset

    s = _settings(args)
    if s["small"]:
        torch.set_num_threads(1)  # a smoke run beside loader workers on a small machine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(s["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_train: no CUDA device here; use --small (CPU) or --device cpu")
    started = time.perf_counter()
    doc: dict[str, Any] = {"settings": s, "machine": machine(device), "models": {}, "errors": []}
    data_root = Path(args.data) if args.data else out / "jpegs"
    t0 = time.perf_counter()
    make_jpeg_folder(data_root, images=s["images"], size=s["jpeg_size"], classes=s["classes"],
                     workers=None if not s["small"] else 2)
    doc["jpeg_folder_s"] = time.perf_counter() - t0
    spec = f"imagefolder:{data_root}"
    dataset = create_dataset(spec, image_size=s["image_size"])
    t0 = time.perf_counter()
    stores = synthetic_stores(dataset, out / "stores") if "ens-adv" in s["modes"] else []
    doc["stores_s"] = time.perf_counter() - t0
    _log(f"{len(dataset)} JPEGs at {s['image_size']} px, {len(stores)} stores ({doc['stores_s']:.1f} s); "
         f"{s['workers']} loader workers on {device}")

    from enspipe.train import TrainConfig

    for kind, mode in (("loader clean", "clean"), ("loader ens-adv", "ens-adv")):
        if mode == "ens-adv" and not stores:
            continue
        cfg = TrainConfig(model=s["models"][0], dataset=spec, image_size=s["image_size"], mode=mode,
                          shards=tuple(stores) if mode == "ens-adv" else (), attack="fgsm",
                          batch_size=s["batch_size"], loader_workers=s["workers"], device=s["device"])
        doc[kind] = _guard(doc, kind, lambda: loader_rate(dataset, cfg, device))
        _log(f"{kind}: {doc[kind] and round(doc[kind]['img_per_s'])} img/s")

    work = out / "runs"
    for model_name in s["models"]:
        res: dict[str, Any] = {}
        for precision in ("fp32", "bf16"):
            key = f"bare {precision}" + ("+cl" if precision == "bf16" and device.type == "cuda" else "")
            res[key] = _guard(doc, f"{model_name} {key}",
                              lambda: bare_rate(model_name, s, dataset.num_classes, precision))
            _log(f"{model_name} {key}: {res[key] and round(res[key]['img_per_s'])} img/s")
        for name in s["modes"]:
            mode, precision = ("clean", "fp32") if name == "clean-fp32" else (name, "bf16")
            res[name] = _guard(doc, f"{model_name} {name}",
                               lambda: enspipe_run(name, model_name, mode, precision, spec, stores, s, work))
            if res[name]:
                _log(f"{model_name} {name}: steady {res[name]['steady_img_per_s']:.0f} img/s, "
                     f"boundary {res[name]['boundary_s_median']} s")
        doc["models"][model_name] = res
        doc["models"][model_name]["ratios"] = ratios(res)
        _write(out, doc)
    doc["total_s"] = time.perf_counter() - started
    _write(out, doc)
    table = render(doc)
    (out / "gpu_train.md").write_text(table + "\n")
    print(table)
    return doc


def measure(opts: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    """The driver's entry: run() on its JPEG folder, stores and runs in its scratch directory,
    gpu_train.json/.md copied beside bench_gpu.json; adds the compact `rows`."""
    args = argparse.Namespace(**vars(opts))
    args.out, args.data, args.device = str(Path(env["work"]) / "train"), str(env["jpegs"]), str(env["device"])
    doc = run(args)
    for name in ("gpu_train.json", "gpu_train.md"):
        shutil.copyfile(Path(args.out) / name, Path(opts.out) / name)
    doc["rows"] = rows(doc)
    return doc


def rows(doc: dict[str, Any]) -> list[list[str]]:
    """The compact table: [measure, value, target] (bench_gpu rebuilds it from several rounds' medians)."""
    return [[f"{model} {name}", _ratio(name, v), TARGETS.get(f"{name} ({model})", "")]
            for model, res in doc["models"].items() for name, v in res["ratios"].items()]


def _ratio(name: str, v: float | None) -> str:
    """A ratio as text; a stall share in percent."""
    return "-" if v is None else f"{100 * v:.2f}%" if "stall" in name else f"{v:.2f}"


def _guard(doc: dict[str, Any], what: str, fn: Any) -> Any:
    """One measurement's failure is recorded, not fatal: the merger gets the other numbers."""
    try:
        return fn()
    except Exception as e:  # a benchmark on a machine one cannot try beforehand
        doc["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
        _log(f"{what} FAILED: {type(e).__name__}: {e}")
        return None


def ratios(res: dict[str, Any]) -> dict[str, float | None]:
    def rate(k: str) -> float | None:
        r = res.get(k)
        return None if not r else r.get("steady_img_per_s", r.get("img_per_s"))

    bare_bf16 = rate("bare bf16+cl") or rate("bare bf16")
    out: dict[str, float | None] = {}
    for num, den, name in (("ens-adv", None, "ens-adv / bare bf16"), ("clean", None, "clean / bare bf16"),
                           ("clean-fp32", "bare fp32", "clean fp32 / bare fp32"),
                           ("clean", "ens-adv", "ens-adv / clean (time)"), ("clean", "adv", "adv / clean (time)")):
        a, b = rate(num), (rate(den) if den else bare_bf16)
        out[name] = (a / b) if a and b else None
    judged = res.get("ens-adv") or res.get("clean")  # the first-window stall of the run that matters most
    out["first-window stall, 50k-image epoch"] = judged.get("first_window_stall_share_50k_epoch") if judged else None
    return out


def _write(out: Path, doc: dict[str, Any]) -> None:
    (out / "gpu_train.json").write_text(json.dumps(doc, indent=1, default=str))


def render(doc: dict[str, Any], record: dict[str, Any] | None = None) -> str:
    """The compact table: img/s per model and configuration, ratios, stalls, targets."""
    s = doc["settings"]
    gpu = doc["machine"].get("gpu") or doc["machine"].get("cpu")
    lines = [f"gpu_train: {s['images']} JPEGs at {s['image_size']} px, batch {s['batch_size']}, {s['epochs']} epochs, "
             f"{s['workers']} loader workers, {gpu}, torch {doc['machine']['torch']}; {doc.get('total_s', 0):.0f} s",
             "", "| model | measure | img/s (steady) | per epoch | boundary s (50k-epoch share) | first window: s lost "
             "(50k-epoch share) |", "|---|---|---|---|---|---|"]
    for kind in ("loader clean", "loader ens-adv"):
        if doc.get(kind):
            lines.append(f"| - | {kind} (no GPU work) | {doc[kind]['img_per_s']:.0f} | "
                         f"{', '.join(f'{r:.0f}' for r in doc[kind]['img_per_s_per_epoch'])} | |")
    for model, res in doc["models"].items():
        for key, r in res.items():
            if key == "ratios" or r is None:
                continue
            if "steady_img_per_s" in r:
                stall = r.get("boundary_s_median")
                share = r.get("stall_share_50k_epoch")
                lines.append(f"| {model} | enspipe {key} | {r['steady_img_per_s']:.0f} | "
                             f"{', '.join(f'{v:.0f}' for v in r['epoch_img_per_s'].values())} | "
                             + (f"{stall:.3f} ({100 * share:.2f}%)" if stall is not None else "") + " | "
                             + _first_window(r) + " |")
            else:
                lines.append(f"| {model} | {key} | {r['img_per_s']:.0f} | | | |")
    lines += ["", "| model | ratio | value |", "|---|---|---|"]
    for model, res in doc["models"].items():
        for name, v in res["ratios"].items():
            lines.append(f"| {model} | {name} | {_ratio(name, v)} |")
    lines.append("")
    lines.append("Targets (issue 17): " + "; ".join(f"{k} {v}" for k, v in TARGETS.items())
                 + ". 'ens-adv / clean (time)' = clean rate / ens-adv rate.")
    if doc["errors"]:
        lines.append("FAILED: " + "; ".join(f"{e['what']}: {e['error']}" for e in doc["errors"]))
    return "\n".join(lines)


def _first_window(r: dict[str, Any]) -> str:
    """Each epoch's first-window seconds lost, and the judged share (epochs after the first)."""
    lost, share = r.get("first_window_lost_s") or {}, r.get("first_window_stall_share_50k_epoch")
    if not lost or share is None:
        return ""
    return f"{', '.join(f'{v:.2f}' for v in lost.values())} ({100 * share:.2f}%)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
