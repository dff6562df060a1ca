"""Small runtime helpers shared by the stages: device choice, seeding, progress (bars on a
terminal, timestamped lines in logs), JSON files."""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch

from enspipe.config import OptionError

T = TypeVar("T")


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is a clear error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("device", f"{spec} was asked for but this machine has no CUDA GPU")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise OptionError("device", f"{spec!r} is no device: use auto, cpu or cuda[:N]") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _progress_mode() -> str:
    """How long work shows itself on stderr: "bar" (a terminal, or ENSPIPE_PROGRESS=1),
    "lines" (redirected to a file: nohup, SLURM, CI) or "off" (ENSPIPE_PROGRESS=0)."""
    forced = os.environ.get("ENSPIPE_PROGRESS")
    if forced == "0":
        return "off"
    if forced == "1" or sys.stderr.isatty():
        return "bar"
    return "lines"


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _field(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_line(message: str) -> None:
    """One timestamped line on stderr (stdout is for results); above any bar on a terminal."""
    if _progress_mode() == "off":
        return
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
    if _progress_mode() == "bar":
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


class Progress:
    """Progress of long work, in the form its reader can use.

    On a terminal: a tqdm bar (`bar=True`), and for `bar=False` trackers one summary line per
    update (train's epochs, which leave a line each under their batch bars). Redirected to a
    file (nohup, SLURM, CI), bars are useless, so every update (one unit of work: an epoch, a
    shard, an attack, a diagnostic) is one timestamped line saying what, how far, how fast and
    when it will end; `min_interval` spaces the lines of fine-grained units (evaluate's
    batches) out to a heartbeat. ENSPIPE_PROGRESS=0 silences both, =1 forces the bars.
    Iterating a Progress over an iterable updates it once per item.
    """

    def __init__(self, iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool | None = None, bar: bool = True, lines: bool = True,
                 leave: bool = False, initial: int = 0, min_interval: float = 0.0):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.initial = total, initial, initial
        self.min_interval = min_interval
        self.fields: dict[str, Any] = {}
        mode = "off" if disable else _progress_mode()
        self._bar = None
        if mode == "bar" and bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr,
                             dynamic_ncols=True, leave=leave)
        # Summary lines on a terminal only for trackers without a bar; always when redirected.
        self._lines = lines and (mode == "lines" or (mode == "bar" and not bar))
        self._t0 = self._last = time.perf_counter()

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)

    def set_postfix(self, **fields: Any) -> None:
        """Fields shown on the bar now and in the next line."""
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.set_postfix({k: _field(v) for k, v in self.fields.items()})

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def update(self, n: int = 1, **fields: Any) -> None:
        """n more units done; `fields` (loss=..., store=...) go on the bar and the line."""
        self.n += n
        if fields:
            self.set_postfix(**fields)
        if self._bar is not None:
            self._bar.update(n)
        now = time.perf_counter()
        last = self.total is not None and self.n >= self.total
        if self._lines and (last or now - self._last >= self.min_interval):
            self._last = now
            log_line(self.line(now))

    def line(self, now: float | None = None) -> str:
        """`what: k/total units (pct), rate, elapsed, ETA, fields`."""
        elapsed = (now or time.perf_counter()) - self._t0
        done = self.n - self.initial
        parts = [f"{self.unit} {self.n}/{self.total}" if self.total else f"{self.n} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        rate = done / elapsed if elapsed > 0 else 0.0
        if done:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{elapsed / done:.3g} s/{self.unit}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and done and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        parts += [f"{k} {_field(v)}" for k, v in self.fields.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def write(self, message: str) -> None:
        """A line in every mode but off: above the bar on a terminal, timestamped otherwise."""
        log_line(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", disable: bool | None = None, **kw: Any) -> Progress:
    """A `Progress` (see there): a bar on a terminal, one timestamped line per unit of work
    when stderr is a file. Precompute: one `update(1)` per shard done (iterating the
    Progress over the shards does it)."""
    return Progress(iterable, total=total, desc=desc, unit=unit, disable=disable, **kw)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically, so a killed process never leaves half a file."""
    from enspipe.util.fileio import atomic_write_json

    return atomic_write_json(path, obj)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file enspipe wrote (a run's config.json): truncated, malformed or deeply nested
    content is one line naming the file (a ConfigError), not a traceback."""
    from enspipe.util.fileio import parse_json

    path = Path(path)
    return parse_json(path.read_bytes(), path)


def versions() -> dict[str, str]:
    import enspipe

    return {"enspipe": enspipe.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}
