"""Where a training run's metrics records go: metrics.jsonl always, plus optional sinks.

  metrics.jsonl   one JSON record per line (see `enspipe.report.curves`); the run's record of truth.
  csv             metrics.csv, one row per scalar (time, epoch, step, name, value): the shape
                  TensorBoard exports, readable without it (pandas: pivot on name).
  tensorboard     event files under tensorboard/ (needs the optional `tensorboard` package).

On `--resume` the run continues from its last checkpoint, so whatever was logged after that
checkpoint's step is cut: metrics.jsonl keeps only records up to the step (no step appears
twice), metrics.csv is rewritten from it (and kept up, even when the resume does not ask for csv), and
TensorBoard purges the later events.
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

from enspipe.config import OptionError
from enspipe.report.curves import read_metrics, scalars
from enspipe.util.fileio import atomic_write, naming

__all__ = ["LOG_SINKS", "RunLog", "check_sinks", "cut_metrics"]

LOG_SINKS = ("csv", "tensorboard")
CSV_HEADER = ("time", "epoch", "step", "name", "value")


def check_sinks(sinks: tuple[str, ...]) -> None:
    """Refuse an unknown sink, or tensorboard without its package, before any training."""
    for s in sinks:
        if s not in LOG_SINKS:
            raise OptionError("log", f"must be csv or tensorboard, not {s!r}")
    if "tensorboard" in sinks:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise OptionError("log", "tensorboard needs the tensorboard package (pip install tensorboard); "
                                     "`log` csv works without it") from None


def _csv_rows(rec: dict[str, Any]) -> list[tuple[Any, ...]]:
    t = rec.get("time", "")
    return [(t, rec.get("epoch"), rec.get("step"), name, value) for name, value in scalars(rec).items()]


def cut_metrics(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """Keep the records of metrics.jsonl up to `step` (a resumed run logs the rest again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    kept = [r for r in read_metrics(path) if int(r["step"]) <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


class RunLog:
    """Writes every record to metrics.jsonl and the chosen sinks (rank 0), and hands it to
    `on_metrics` (every rank)."""

    def __init__(self, run_dir: Path, *, sinks: tuple[str, ...] = (), write: bool = True, resume_step: int | None = None,
                 on_metrics: Callable[[dict[str, Any]], None] | None = None):
        self.on_metrics = on_metrics
        self._jsonl = self._csv = self._tb = None
        if not write:
            return
        kept = cut_metrics(run_dir, resume_step) if resume_step is not None else None
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        # A run resumed without `log` csv whose earlier attempt kept a metrics.csv keeps it
        # too (cut to the checkpoint and continued, like metrics.jsonl): never a stale file
        # holding rows of steps that were redone.
        if "csv" in sinks or (resume_step is not None and (run_dir / "metrics.csv").exists()):
            path = run_dir / "metrics.csv"
            if kept is not None or not path.exists():  # (re)made from the records kept
                buf = io.StringIO()
                w = csv.writer(buf)
                w.writerow(CSV_HEADER)
                for r in kept or []:
                    w.writerows(_csv_rows(r))
                atomic_write(path, buf.getvalue())
            self._csv = open(path, "a", newline="")
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed run wrote after its last checkpoint.
            self._tb = SummaryWriter(str(run_dir / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, rec: dict[str, Any]) -> None:
        rec = {**rec, "time": round(time.time(), 3)}
        for f, line in ((self._jsonl, lambda f: f.write(json.dumps(rec) + "\n")),
                        (self._csv, lambda f: csv.writer(f).writerows(_csv_rows(rec)))):
            if f is None:
                continue
            try:
                line(f)
                f.flush()
            except OSError as e:  # a full disk: one line naming the file
                raise naming(e, f.name) from None
        if self._tb is not None:
            for name, value in scalars(rec).items():
                self._tb.add_scalar(name, value, int(rec["step"]))
            self._tb.flush()
        if self.on_metrics is not None:
            self.on_metrics(rec)

    def close(self) -> None:
        for f in (self._jsonl, self._csv, self._tb):
            if f is not None:
                f.close()
        self._jsonl = self._csv = self._tb = None
