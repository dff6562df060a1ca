"""Benchmark on one accelerator: enspipe against bare PyTorch loops on the same device (DESIGN §4).

    python benchmarks/bench_gpu.py --part precompute --out OUT      # one H200: under 4 minutes
    python benchmarks/bench_gpu.py --part all --out OUT
    python benchmarks/bench_gpu.py --small --part precompute        # CPU, tiny: CI keeps it working
    python benchmarks/bench_gpu.py --from-json OUT/bench_gpu.json --write-benchmarks

A thin driver: it makes the synthetic ImageFolder both halves use (`gpu_data.make_jpeg_folder`:
4,096 ImageNet-like JPEGs, 400-500 px a side and ~100 KB each, in parallel, so that decoding
costs what ImageNet's does; --small: 64 of 64 px), records the machine, and runs the parts in
one process, each `--rounds` times (3; --small: 1) on the same JPEGs, each round in a scratch
directory of its own:

  precompute   benchmarks/gpu_precompute.py
  train        benchmarks/gpu_train.py (the trainer's half; --part all skips it when absent)

A part is a module with `PART`, `measure(opts, env) -> dict` (JSON-ready; its "rows" are the
[measure, value, ratio / target] of the compact table), `render(results, record) -> str` (its
BENCHMARKS.md section body) and, optionally, `add_arguments(parser)` for flags of its own
(prefixed with its name). `env` holds "device", "work" (a scratch directory outside OUT),
"small", "jpegs" (the ImageFolder root), "images", "size", "classes" and "log".

With several rounds a part's results are the median of its rounds, number by number (a ratio
is the median of the rounds' ratios; a yes/no holds only if it held in every round), its rows
are rebuilt from those medians (`rows(results)` of the part), every round's own results are
kept under "rounds", and the section ends with the spread: median and range over the rounds of
every rate, ratio and stall share.

Writes OUT/bench_gpu.json (machine, command, data, every part's results; rewritten as each part ends), OUT/bench_gpu.md
(one `## gpu <part>` section per part) and prints the compact table last. BENCHMARKS.md is
only rewritten with --write-benchmarks (its `## gpu <part>` sections), e.g. after copying OUT
back from the GPU machine: `--from-json OUT/bench_gpu.json --write-benchmarks`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, logger, machine, update_section  # noqa: E402
from gpu_data import IMAGENET, make_jpeg_folder, size_text  # noqa: E402

PARTS = ("precompute", "train")
FULL_DATA = dict(images=4096, size=IMAGENET, classes=16)
SMALL_DATA = dict(images=64, size=64, classes=4)
log = logger("bench_gpu")


def load_part(name: str):
    """The module of a part, or None when its file is not in this tree."""
    if not (Path(__file__).resolve().parent / f"gpu_{name}.py").exists():
        return None
    return importlib.import_module(f"gpu_{name}")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=(*PARTS, "all"), default="all")
    ap.add_argument("--small", action="store_true", help="tiny run on the CPU (64 images of 64 px): CI's check")
    ap.add_argument("--device", default=None, help="auto (the default; --small: cpu), cpu or cuda[:N]")
    ap.add_argument("--out", default=str(REPO / ".benchmarks" / "gpu"), help="results directory (small files only)")
    ap.add_argument("--work", default=None, help="scratch directory for images and stores (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of each part, median and range [3; --small: 1]")
    ap.add_argument("--from-json", default=None, help="re-render the tables of a saved bench_gpu.json")
    ap.add_argument("--write-benchmarks", action="store_true", help="rewrite BENCHMARKS.md's `## gpu <part>` sections")
    for name in PARTS:
        mod = load_part(name)
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(ap)
    args = sys.argv[1:] if argv is None else argv
    return ap.parse_args(args), command_line("bench_gpu.py", args)


def sections(doc: dict[str, Any]) -> dict[str, str]:
    """Each part's BENCHMARKS.md section: what ran where, its table."""
    m = doc["machine"]
    where = (f"{m.get('gpu', 'no GPU (device ' + m.get('device', '?') + ')')}, {m['nproc']} cores ({m['cpu']}), "
             f"torch {m['torch']}, Python {m['python']}; {doc['date']}")
    out = {}
    for name, res in doc["parts"].items():
        mod = load_part(name)
        body = mod.render(res, doc) if mod is not None and hasattr(mod, "render") else _table(res["rows"])
        rounds = len(res.get("rounds", [])) or 1
        kb = doc["data"].get("jpeg_kb_mean")
        out[name] = (f"Measured on {where}. Command: `{doc['command']}` ({doc['parts_wall_s'][name]:.0f} s, "
                     f"{rounds} round{'s' if rounds > 1 else ''}{': medians' if rounds > 1 else ''}; "
                     f"{doc['data']['images']} JPEGs of {size_text(doc['data']['size'])} px"
                     + (f", {kb:.0f} KB on average," if kb else "") + f" made in {doc['data']['seconds']:.1f} s)."
                     f"\n\n{body}" + (f"\n\n{spread_table(res['rounds'])}" if rounds > 1 else ""))
    return out


# --- rounds: medians and ranges -----------------------------------------------------------------------

# What a run was set up with, not what it measured: the first round's, never a median.
_AS_GIVEN = ("config", "settings", "machine")


def combine(values: list[Any]) -> Any:
    """One result from the same result of several rounds: numbers -> their median (rounds where it
    is missing left out; equal in every round -> as is), yes/no -> all, dicts and equal-length
    lists element by element, settings and anything else (text) -> the first round's."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, bool):
        return all(bool(v) for v in present)
    if isinstance(first, (int, float)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return first if all(v == first for v in present) else statistics.median(present)
    if isinstance(first, dict) and all(isinstance(v, dict) for v in present):
        return {k: first[k] if k in _AS_GIVEN else combine([v.get(k) for v in present]) for k in first}
    if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in present):
        return [combine([v[i] for v in present]) for i in range(len(first))]
    return first


# The numbers a spread table shows: rates, ratios and stall shares (by their key's name).
_SPREAD_KEY = re.compile(r"img_per_s|images_per_s|steady|end_to_end|_vs_|/|share|stall|boundary_s_median|^(fp32|bf16)")


def _leaves(doc: Any, path: str = "") -> dict[str, float]:
    if isinstance(doc, dict):
        out: dict[str, float] = {}
        for k, v in doc.items():
            if k not in ("rounds", "rows", "config", "settings", "machine"):
                out.update(_leaves(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        return {path: float(doc)} if _SPREAD_KEY.search(path.rsplit(".", 1)[-1]) else {}
    return {}


def spread_table(rounds: list[dict[str, Any]]) -> str:
    """Median and range over the rounds of every rate, ratio and stall share."""
    per = [_leaves(r) for r in rounds]
    lines = [f"Spread over {len(rounds)} rounds:", "", "| result | median | range |", "|---|---|---|"]
    for path in per[0]:
        vals = [p[path] for p in per if path in p]
        fmt = ".3f" if max(abs(v) for v in vals) < 10 else ",.0f"
        lines.append(f"| {path} | {format(statistics.median(vals), fmt)} | {format(min(vals), fmt)}-"
                     f"{format(max(vals), fmt)} |")
    return "\n".join(lines)


def measure_rounds(mod: Any, opts: argparse.Namespace, env: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The part `rounds` times, each in its own scratch directory; one round's results as they
    are, several rounds' combined (see the module doc)."""
    results = []
    for r in range(rounds):
        if rounds > 1:
            env["log"](f"round {r + 1} of {rounds}")
        round_env = {**env, "work": Path(env["work"]) / f"round{r}"} if rounds > 1 else env
        results.append(mod.measure(opts, round_env))
        if rounds > 1 and not opts.keep:  # stores and runs of a round are not needed again
            shutil.rmtree(round_env["work"], ignore_errors=True)
    if rounds == 1:
        return results[0]
    res = combine(results)
    if hasattr(mod, "rows"):
        res["rows"] = mod.rows(res)
    res["rounds"] = results
    return res


def _table(rows: list[list[str]]) -> str:
    head = ["| measure | value | ratio / target |", "|---|---|---|"]
    return "\n".join([*head, *[f"| {a} | {b} | {c} |" for a, b, c in rows]])


def report(doc: dict[str, Any], out: Path | None, write_benchmarks: bool) -> None:
    secs = sections(doc)
    md = "\n".join(f"## gpu {name}\n\n{text}" for name, text in secs.items())
    if out is not None:
        (out / "bench_gpu.md").write_text(md)
    if write_benchmarks:
        for name, text in secs.items():
            update_section(REPO / "BENCHMARKS.md", f"gpu {name}", text)
        log(f"updated the `## gpu ...` sections of {REPO / 'BENCHMARKS.md'}")
    # The compact table last, so it is what a person sees at the end of the run.
    print(md if len(secs) > 1 else "")
    for name, res in doc["parts"].items():
        print(f"\n{name} ({doc['machine'].get('gpu') or doc['machine'].get('device')}):\n")
        print(_table(res["rows"]))


def main(argv: list[str] | None = None) -> int:
    opts, command = parse_args(argv)
    if opts.from_json:
        report(json.loads(Path(opts.from_json).read_text()), None, opts.write_benchmarks)
        return 0
    import torch

    from enspipe.util.runtime import resolve_device

    parts = PARTS if opts.part == "all" else (opts.part,)
    mods = {name: load_part(name) for name in parts}
    missing = [n for n, m in mods.items() if m is None]
    if missing and opts.part != "all":
        raise SystemExit(f"bench_gpu: the {missing[0]} half (benchmarks/gpu_{missing[0]}.py) is not in this tree")
    mods = {n: m for n, m in mods.items() if m is not None}
    device = resolve_device(opts.device or ("cpu" if opts.small else "auto"))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(opts.work or tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = dict(SMALL_DATA if opts.small else FULL_DATA)
    try:
        t0 = time.perf_counter()
        jpegs = make_jpeg_folder(work / "jpegs", **data)
        data["seconds"] = time.perf_counter() - t0
        files = list((jpegs / "train").rglob("*.JPEG"))
        data["jpeg_kb_mean"] = sum(f.stat().st_size for f in files) / max(1, len(files)) / 1024
        log(f"{data['images']} JPEGs of {size_text(data['size'])} px ({data['jpeg_kb_mean']:.0f} KB on average) in "
            f"{data['seconds']:.1f} s ({os.cpu_count()} processes)")
        env = {"device": device, "work": work, "small": opts.small, "jpegs": jpegs, "log": log, **data}
        doc: dict[str, Any] = {
            "command": command, "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": machine(device, packages=("zarr", "webdataset", "dask", "distributed", "timm")),
            "small": opts.small, "data": data, "parts": {}, "parts_wall_s": {},
        }
        for name, mod in mods.items():
            log(f"part {name}")
            t0 = time.perf_counter()
            doc["parts"][name] = measure_rounds(mod, opts, env, opts.rounds or (1 if opts.small else 3))
            doc["parts_wall_s"][name] = time.perf_counter() - t0
            # Each finished part is on disk at once: a device command stopped at its time limit
            # in a later part keeps the earlier parts' results (the last write below completes it).
            (out / "bench_gpu.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
            log(f"part {name} done in {doc['parts_wall_s'][name]:.0f} s; wrote {out / 'bench_gpu.json'}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if not opts.keep and not opts.work:
            shutil.rmtree(work, ignore_errors=True)
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["wall_s"] = time.perf_counter() - t_start
    (out / "bench_gpu.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    log(f"wrote {out / 'bench_gpu.json'} ({doc['wall_s']:.0f} s in all)")
    report(doc, out, opts.write_benchmarks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
