"""Reading a training run's files in tests: metrics records, weights, comparisons."""
from __future__ import annotations

import json
from pathlib import Path

import torch

CLOCK_FIELDS = ("time", "seconds", "samples_per_s", "wait_s", "boundary_s")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steady(recs: list[dict]) -> list[dict]:
    """Records without their clock fields (times differ between runs, nothing else may)."""
    return [{k: v for k, v in r.items() if k not in CLOCK_FIELDS} for r in recs]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
