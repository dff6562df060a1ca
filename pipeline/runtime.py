"""Small runtime helpers shared by the stages: device choice, seeding, progress, JSON files."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, TypeVar

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


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", disable: bool | None = None):
    """A tqdm bar on stderr (stdout is for results); silent when stderr is not a terminal
    unless ENSPIPE_PROGRESS=1, so logs and CI output stay readable."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = not (sys.stderr.isatty() or os.environ.get("ENSPIPE_PROGRESS") == "1")
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically, so a killed process never leaves half a file."""
    from enspipe.fileio import atomic_write_json

    return atomic_write_json(path, obj)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def versions() -> dict[str, str]:
    import enspipe

    return {"enspipe": enspipe.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}
