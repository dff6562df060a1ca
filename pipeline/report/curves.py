"""A training run's metrics.jsonl: read it, summarise it per epoch, draw its curves.

metrics.jsonl holds one JSON record per line. Training windows (every `log_every` steps
and each epoch's last window) carry `kind: "train"` (records of older runs have no kind),
`epoch` (1-based), `step`, `loss`, `accuracy`, `samples`, `samples_per_s`, `lr`, ...;
validation records (`train --val-limit N`) carry `kind: "val"`, `epoch`, `step`,
`clean_error`, `fgsm_error`, `n`, `eps`. No torch here: `enspipe report` stays quick.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

__all__ = ["epoch_summary", "is_val", "plot_training_curves", "read_metrics", "scalars", "training_markdown"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every readable record of a metrics.jsonl (a line cut short by a kill is skipped)."""
    out = []
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def is_val(rec: dict[str, Any]) -> bool:
    return rec.get("kind") == "val"


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The plottable numbers of a record, named as TensorBoard tags (`train/loss`, `val/fgsm_error`)."""
    if is_val(rec):
        return {f"val/{k}": float(rec[k]) for k in ("clean_error", "fgsm_error") if rec.get(k) is not None}
    keys = ("loss", "accuracy", "samples_per_s", "lr", "online_passes")
    return {f"train/{k}": float(rec[k]) for k in keys if isinstance(rec.get(k), (int, float))}


def epoch_summary(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch: sample-weighted loss and accuracy over its windows, its rate, and
    its validation errors when recorded."""
    rows: dict[int, dict[str, Any]] = {}
    for rec in records:
        row = rows.setdefault(int(rec["epoch"]), {"epoch": int(rec["epoch"]), "samples": 0, "loss": 0.0,
                                                  "accuracy": 0.0, "seconds": 0.0})
        row["step"] = max(row.get("step", 0), int(rec["step"]))
        if is_val(rec):
            row["val_clean_error"], row["val_fgsm_error"] = rec.get("clean_error"), rec.get("fgsm_error")
            continue
        n = int(rec.get("samples", 0))
        row["samples"] += n
        row["loss"] += float(rec.get("loss", 0.0)) * n
        row["accuracy"] += float(rec.get("accuracy", 0.0)) * n
        row["seconds"] += float(rec.get("seconds", 0.0))
    out = []
    for e in sorted(rows):
        row = rows[e]
        n = max(row["samples"], 1)
        row["loss"] /= n
        row["accuracy"] /= n
        row["samples_per_s"] = row["samples"] / row["seconds"] if row["seconds"] else None
        out.append(row)
    return out


def training_markdown(records: list[dict[str, Any]]) -> str:
    """The per-epoch table of a run."""
    rows = epoch_summary(records)
    val = any("val_clean_error" in r for r in rows)

    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * float(v):.1f}%"

    head = ["epoch", "step", "loss", "accuracy", "samples/s"] + (["val clean error", "val FGSM error"] if val else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["epoch"]), str(r["step"]), f"{r['loss']:.4f}", pct(r["accuracy"]),
                 f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "–"]
        if val:
            cells += [pct(r.get("val_clean_error")), pct(r.get("val_fgsm_error"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_training_curves(records: list[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Loss, training accuracy and (when recorded) validation errors against the step."""
    from enspipe.report.plots import new_figure, save_png

    train = [r for r in records if not is_val(r)]
    val = [r for r in records if is_val(r)]
    panels = 3 if val else 2
    fig = new_figure(4.2 * panels, 3.4)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r.get("loss") for r in train], lw=1.2)
    axes[0].set_title("training loss")
    axes[1].plot(steps, [100 * float(r.get("accuracy", 0.0)) for r in train], lw=1.2)
    axes[1].set_title("training accuracy (%)")
    if val:
        vsteps = [r["step"] for r in val]
        axes[2].plot(vsteps, [100 * float(r["clean_error"]) for r in val], marker="o", label="clean")
        axes[2].plot(vsteps, [100 * float(r["fgsm_error"]) for r in val], marker="s", label=f"FGSM eps {val[-1].get('eps')}")
        axes[2].set_title(f"validation error (%), {val[-1].get('n')} held-out samples")
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, y=1.04)
    return save_png(fig, path)
