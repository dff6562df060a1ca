"""The GPU benchmarks behind BENCHMARKS.md's GPU rows: a thin driver over their halves.

    python benchmarks/bench_gpu.py --part train --out out/gpu            # benchmarks/gpu_train.py
    python benchmarks/bench_gpu.py --part precompute --out out/gpu       # benchmarks/gpu_precompute.py
    python benchmarks/bench_gpu.py --part all --out out/gpu --small      # both, CPU smoke run

Each half is a module with `add_arguments(parser)` and `run(args) -> dict`; this driver adds
the shared options (--out, --small, --device), runs the halves asked for, and writes
OUT/bench_gpu.json with their results.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = {"precompute": "gpu_precompute", "train": "gpu_train"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--small", action="store_true", help="CPU smoke run of every part asked for")
    p.add_argument("--device", default=None)
    modules = {}
    for part, name in PARTS.items():
        try:
            modules[part] = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        modules[part].add_arguments(p)
    args = p.parse_args(argv)
    wanted = list(PARTS) if args.part == "all" else [args.part]
    results = {}
    for part in wanted:
        if part not in modules:
            print(f"bench_gpu: {PARTS[part]}.py is not in this tree; skipping --part {part}", file=sys.stderr)
            continue
        results[part] = modules[part].run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_gpu.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
