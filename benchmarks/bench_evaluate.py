"""evaluate's image decode: in the evaluating process (as before) vs loader workers, side by side in one run.

    python benchmarks/bench_evaluate.py            # 512 ImageNet-like JPEGs (400-500 px -> 256 -> crop 224), 3 rounds
    python benchmarks/bench_evaluate.py --quick --no-md --out OUT   # the CI smoke run (seconds)
    python benchmarks/bench_evaluate.py --markdown-from benchmarks/results/bench_evaluate.json \
        --also benchmarks/results/bench_evaluate_loaded.json    # BENCHMARKS.md's section again, from the results

Sides, in interleaved rounds (each round runs every side once, in a rotated order), median and range:

  evaluate_wN   `enspipe.evaluate(EvalConfig(..., attacks=("fgsm",), loader_workers=N))` over all the
                images: clean error and white-box FGSM of a torchvision mobilenet_v3_small (random
                weights from a safetensors file; the smallest usual network, though on one CPU thread it
                still costs several times the decode), N = 0: PIL in the evaluating process, as before
  clean_wN      the same with no attack (`attacks=()`): one forward pass an image, where decode weighs more
  decode_wN     the loader alone (`enspipe.data.loader.batches`, no model): what decode costs per image
  start_wN      a loader with N workers opened and closed, nothing read: what forking them costs (evaluate
                pays it once a run; the trainer's validation once a run, not once an epoch)

Each side records wall seconds and CPU seconds of this process and of its loader processes
(`RUSAGE_CHILDREN`: the workers are joined when a pass ends), hence images per CPU-second. The
figure that carries over to a GPU host is decode_w2's images per CPU-second of the workers: a host
with k cores free for decoding feeds about k times that. On this 2-core machine the evaluating
process and the workers share two cores, so the wall-clock gain of workers is bounded here.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, logger, machine, median, publish, update_section  # noqa: E402
from gpu_data import IMAGENET, make_jpeg_folder  # noqa: E402

log = logger("bench_evaluate")
HEADING = "evaluate: decode in the evaluating process vs loader workers (CPU)"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _weights(workdir: Path, classes: int) -> Path:
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=classes)
    path = workdir / "mobilenet_v3_small.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _sides(root: Path, weights: Path, image_size: int, batch_size: int, workers: list[int]) -> dict:
    import torch

    from enspipe.data import create_dataset
    from enspipe.data.loader import batches, open_loader
    from enspipe.evaluate import EvalConfig, evaluate

    dataset = f"imagefolder:{root}"
    ds = create_dataset(dataset, split="test", image_size=image_size)
    results: dict[int, dict] = {}

    def evaluate_side(n: int, attacks: tuple[str, ...]):
        def run() -> None:
            res = evaluate(EvalConfig(models=("mobilenet_v3_small",), weights=str(weights), dataset=dataset,
                                      image_size=image_size, attacks=attacks, eps=16 / 256, batch_size=batch_size,
                                      device="cpu", loader_workers=n))
            results[(n, attacks)] = res["models"]
        return run

    def decode_side(n: int):
        def run() -> None:
            for _ in batches(ds, batch_size, torch.device("cpu"), workers=n):
                pass
        return run

    def start_side(n: int):
        def run() -> None:  # what a loader costs before its first image: fork n workers, stop them
            open_loader(ds, torch.device("cpu"), workers=n).close()
        return run

    sides = {f"evaluate_w{n}": evaluate_side(n, ("fgsm",)) for n in workers}
    sides.update({f"clean_w{n}": evaluate_side(n, ()) for n in workers})
    sides.update({f"decode_w{n}": decode_side(n) for n in workers})
    sides.update({f"start_w{n}": start_side(n) for n in workers if n})
    return {"sides": sides, "results": results, "images": len(ds)}


def run(images: int, size, image_size: int, batch_size: int, rounds: int, workers: list[int], workdir: Path) -> dict:
    import torch

    torch.set_num_threads(1)  # one thread drives the model, as one process drives a GPU
    t0 = time.perf_counter()
    root = make_jpeg_folder(workdir / "jpegs", images=images, size=size, classes=16, split="val")
    files = sorted((root / "val").glob("*/*.JPEG"))
    kib = sum(f.stat().st_size for f in files) / len(files) / 1024
    log(f"{images} JPEGs ({kib:.0f} KiB mean) in {time.perf_counter() - t0:.1f} s")
    made = _sides(root, _weights(workdir, 16), image_size, batch_size, workers)
    sides, n = made["sides"], made["images"]
    names = tuple(sides)
    for name in names:  # warm: imports, the page cache, the model's kernels
        sides[name]()
    rec: dict[str, dict[str, list[float]]] = {s: {"wall_s": [], "cpu_s": [], "main_cpu_s": [], "workers_cpu_s": []}
                                              for s in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for side in order:
            w, c, k = time.perf_counter(), time.process_time(), _children_cpu()
            sides[side]()
            wall, main, kids = time.perf_counter() - w, time.process_time() - c, _children_cpu() - k
            for key, v in (("wall_s", wall), ("cpu_s", main + kids), ("main_cpu_s", main), ("workers_cpu_s", kids)):
                rec[side][key].append(v)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{s} {rec[s]['wall_s'][-1]:.1f} s" for s in names))
    same = all(made["results"][(w, a)] == made["results"][(workers[0], a)] for w in workers for a in (("fgsm",), ()))

    def stats(v: list[float]) -> dict:
        return {"median": median(v), "min": min(v), "max": max(v), "rounds": v}
    out = {s: {k: stats(v) for k, v in d.items()} for s, d in rec.items()}
    for s, d in rec.items():
        out[s]["img_per_s"] = stats([n / x for x in d["wall_s"]])
        out[s]["img_per_cpu_s"] = stats([n / x for x in d["cpu_s"]])
        if s.startswith("decode_") and s != f"decode_w{workers[0]}" and workers[0] == 0:
            out[s]["img_per_worker_cpu_s"] = stats([n / x for x in d["workers_cpu_s"]])
    ratio = {}  # speed-ups: the baseline's wall time over the workers'
    for kind in ("evaluate", "clean"):
        for w in workers[1:]:
            base, other = rec[f"{kind}_w{workers[0]}"]["wall_s"], rec[f"{kind}_w{w}"]["wall_s"]
            ratio[f"{kind}_w{w}"] = median([a / b for a, b in zip(base, other)])
    return {"images": n, "source_px": size, "mean_kib": round(kib, 1), "image_size": image_size,
            "batch_size": batch_size, "rounds": rounds, "workers": workers, "same_errors": same,
            "sides": out, "speedup": ratio}


def markdown(res: dict, cmd: str, info: dict) -> str:
    s = res["sides"]
    rows = "\n".join(
        f"| {name} | {d['wall_s']['median']:.2f} ({d['wall_s']['min']:.2f}–{d['wall_s']['max']:.2f}) | "
        f"{d['img_per_s']['median']:.0f} | {d['main_cpu_s']['median']:.2f} | {d['workers_cpu_s']['median']:.2f} | "
        f"{d['img_per_cpu_s']['median']:.0f} |" for name, d in s.items() if not name.startswith("start_"))
    starts = "; ".join(f"{name[len('start_w'):]} workers {d['wall_s']['median']:.2f} s wall "
                       f"({d['wall_s']['min']:.2f}–{d['wall_s']['max']:.2f}), {d['cpu_s']['median']:.2f} CPU-s"
                       for name, d in s.items() if name.startswith("start_"))
    src = res["source_px"]
    src = f"{src[0]}-{src[1]}" if isinstance(src, (list, tuple)) else src
    per_worker = {k: v["img_per_worker_cpu_s"] for k, v in s.items() if "img_per_worker_cpu_s" in v}
    lines = [f"`{cmd}` on {info['cpu']} ({info['nproc']} cores, shared with other engineers' work; load at start "
             f"{', '.join(f'{x:.1f}' for x in info['loadavg_start'])}), {res['date']}, torch {info['torch']}, one torch "
             "thread in the "
             f"evaluating process. {res['images']} JPEGs of {src} px ({res['mean_kib']} KiB mean, `gpu_data.py`'s "
             f"ImageNet-like), to 3x{res['image_size']}x{res['image_size']}; evaluate = clean + white-box FGSM of "
             f"mobilenet_v3_small (random weights), batch {res['batch_size']}; {res['rounds']} interleaved rounds, "
             "median (range):", "",
             "| side | wall s | img / s | CPU s (evaluating process) | CPU s (loader workers) | img / CPU-s (all) |",
             "|---|---|---|---|---|---|", rows, ""]
    w0 = res["workers"][0]
    for k, v in res["speedup"].items():
        what = "clean + FGSM" if k.startswith("evaluate") else "clean error only"
        lines.append(f"- **{what}: {v:.2f}x the speed of w{w0}** with {k.rpartition('_w')[2]} loader workers "
                     "(median of the per-round ratios of wall times; the errors were "
                     f"{'identical' if res['same_errors'] else 'NOT identical'} across worker counts).")
    for k, v in per_worker.items():
        lines.append(f"- **{k}: {v['median']:.0f} images decoded per CPU-second of a loader worker** "
                     f"(range {v['min']:.0f}–{v['max']:.0f}): the figure that carries over to a host with more "
                     "cores. A projection, not measured here: k cores free for decoding would feed about k times "
                     f"that (15 on a 16-core host: ~{15 * v['median']:,.0f} img/s), against the several thousand "
                     "img/s one GPU evaluates ResNet-50 at; the evaluating process's own share "
                     "(its CPU s on this row) is what stays on the core that drives the device.")
    if starts:
        lines.append(f"- Opening and closing a loader (forking its workers, nothing read): {starts}. evaluate pays "
                     "it once a run; the trainer's validation keeps its loader for the run (`train.kit.Validation`).")
    if f"decode_w{w0}" in s and w0 == 0:
        dec = s["decode_w0"]["cpu_s"]["median"]
        share = {k: dec / s[f"{k}_w0"]["cpu_s"]["median"] for k in ("evaluate", "clean")}
        extra = {w: s[f"decode_w{w}"]["cpu_s"]["median"] - dec for w in res["workers"][1:]}
        lines.append(f"- What workers can win here is bounded by decode's share of the w0 run's CPU: decode_w0's CPU is "
                     f"{100 * share['evaluate']:.0f}% of evaluate_w0's and {100 * share['clean']:.0f}% of clean_w0's, "
                     f"so at most {1 / (1 - share['evaluate']):.2f}x and {1 / (1 - share['clean']):.2f}x even with "
                     "a core idle for the workers. Handing the pixels between processes costs CPU of its own "
                     "(decode's total CPU with workers minus without: "
                     + ", ".join(f"{w} workers {x:+.2f} s" for w, x in extra.items()) +
                     f" for {res['images']} images), and this 2-core machine was shared (load "
                     f"{info['loadavg_start'][0]:.1f} at the start): the workers had what the other work left. Beside "
                     "a GPU the model costs the CPU nearly nothing and decode is the whole of it, which is why the "
                     "per-worker rate above is the number to scale.")
    for other in res.get("also", []):
        o, sp = other["sides"], other["speedup"]
        lines.append(f"- The same command at another time (load {other['machine']['loadavg_start'][0]:.1f} at the "
                     f"start, {other.get('date', '?')}; `{other['path']}`): "
                     + ", ".join(f"{'clean + FGSM' if k.startswith('evaluate') else 'clean only'} {v:.2f}x"
                                 for k, v in sp.items())
                     + "; " + ", ".join(f"{k} {v['img_per_worker_cpu_s']['median']:.0f} img per worker CPU-s"
                                        for k, v in o.items() if "img_per_worker_cpu_s" in v)
                     + ". The wall-clock ratios move with the machine's load; the CPU-second rates far less.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 small images, 1 round: the CI smoke run")
    ap.add_argument("--images", type=int, default=None, help="[default: 512; --quick: 16]")
    ap.add_argument("--image-size", type=int, default=None, help="[default: 224; --quick: 64]")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=None, help="[default: 3; --quick: 1]")
    ap.add_argument("--workers", default="0,2", help="loader worker counts to compare, the first the baseline")
    ap.add_argument("--workdir", default=None, help="where the JPEGs are made [default: a temporary folder]")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of bench_evaluate.json")
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--markdown-from", default=None, metavar="JSON",
                    help="only write BENCHMARKS.md's section from a saved bench_evaluate.json")
    ap.add_argument("--also", action="append", default=[], metavar="JSON",
                    help="with --markdown-from: another saved run of the same command, summed up in one line")
    a = ap.parse_args(argv)
    if a.markdown_from:
        doc = json.loads(Path(a.markdown_from).read_text())
        doc["also"] = [{**json.loads(Path(p).read_text()), "path": p} for p in a.also]
        update_section(REPO / "BENCHMARKS.md", HEADING, markdown(doc, doc["command"], doc["machine"]))
        return
    os.environ.setdefault("ENSPIPE_PROGRESS", "0")
    images = a.images or (16 if a.quick else 512)
    size = 96 if a.quick else IMAGENET
    image_size = a.image_size or (64 if a.quick else 224)
    rounds = a.rounds or (1 if a.quick else 3)
    workers = [int(w) for w in a.workers.split(",")]
    cmd = command_line("bench_evaluate.py", argv)
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(images, size, image_size, min(a.batch_size, images), rounds, workers, Path(a.workdir or tmp))
    doc = {"command": cmd, "machine": info, "date": time.strftime("%Y-%m-%d"), **res}
    publish(a.out, "bench_evaluate", doc, markdown(doc, cmd, info), HEADING, no_md=a.no_md)
    if not res["same_errors"]:
        sys.exit("bench_evaluate: the errors differ between loader worker counts")


if __name__ == "__main__":
    main()
