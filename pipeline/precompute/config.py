"""What to precompute: `PrecomputeConfig`, checked when built (before torch is imported)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from enspipe.config import OptionError, option
from enspipe.errors import ConfigError

__all__ = ["ATTACKS", "FORMATS", "LABEL_MODES", "PRECISIONS", "WDS_IMAGES", "PrecomputeConfig"]

ATTACKS = ("fgsm", "step_ll")
LABEL_MODES = ("pred", "true")
FORMATS = {"zarr": ("zarr",), "wds": ("wds",), "both": ("zarr", "wds")}  # --format -> store formats
PRECISIONS = ("fp32", "bf16")
WDS_IMAGES = ("source", "none")


@dataclass(frozen=True)
class PrecomputeConfig:
    """What to precompute; the CLI and the job runner build it from their options."""

    model: str                      # a run dir / checkpoint, or a registry name with weights/pretrained
    out: str                        # store ROOT: store paths are derived under it
    weights: str | None = None
    pretrained: bool = False
    dataset: str = "digits"
    data_root: str | None = None
    split: str = "train"
    limit: int | None = None
    image_size: int | None = None   # resize (imagefolder: resize + center-crop) to this square size
    attacks: tuple[str, ...] = ("step_ll",)  # each attack gets its own store
    label: str = "pred"             # FGSM's label; Step-LL always uses the least-likely class
    fmt: str = "zarr"               # zarr | wds | both
    shard_size: int = 1024
    batch_size: int = 256
    device: str = "auto"
    workers: int | None = None      # local dask cluster of N worker processes
    scheduler: str | None = None    # address of an existing dask scheduler
    loader_workers: int | None = option(
        None, minimum=0, help="Processes that decode and resize images ahead of the compute (default: from the "
                              "cores; 0 decodes in the computing process).")
    precision: str = option(
        "fp32", choices=PRECISIONS, help="fp32, or bf16 (autocast; channels_last on CUDA): a store of its own.")
    wds_images: str = option(
        "source", choices=WDS_IMAGES, help="wds stores: carry each image as the source encoded it, or none.")

    def __post_init__(self) -> None:
        names = (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks)
        object.__setattr__(self, "attacks", names)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("--model must name a static model (a run dir, checkpoint or architecture)")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ConfigError("--out must name the store root directory")
        if not names:
            raise ConfigError(f"--attack must name at least one of {', '.join(ATTACKS)}")
        for a in names:
            if a not in ATTACKS:
                raise ConfigError(f"unknown attack {a!r}: precompute stores {' and '.join(ATTACKS)} directions")
        if len(set(names)) != len(names):
            raise ConfigError(f"--attack lists an attack twice: {','.join(names)}")
        if self.label not in LABEL_MODES:
            raise ConfigError(f"--label must be pred or true, not {self.label!r}")
        if self.fmt not in FORMATS:
            raise ConfigError(f"--format must be zarr, wds or both, not {self.fmt!r}")
        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
        for name in ("shard_size", "batch_size", "limit"):
            value = getattr(self, name)
            if not positive(value) and not (name == "limit" and value is None):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        if self.workers is not None and not positive(self.workers):
            raise ConfigError(f"--workers must be at least 1 (leave it out to compute in-process), "
                              f"not {self.workers!r}")
        if self.scheduler is not None and not str(self.scheduler).strip():
            raise ConfigError("--scheduler must be a dask scheduler address such as tcp://host:8786")
        if self.workers is not None and self.scheduler is not None:
            raise ConfigError("--workers starts a local cluster and --scheduler uses an existing one: pass only one")
        if self.weights is not None and self.pretrained:
            raise ConfigError("--weights and --pretrained exclude each other: pass one source of weights")
        lw = self.loader_workers
        if lw is not None and (isinstance(lw, bool) or not isinstance(lw, int) or lw < 0):
            raise OptionError("loader_workers", f"must be 0 (decode in the computing process) or more, not {lw!r}")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"must be fp32 or bf16, not {self.precision!r}")
        if self.wds_images not in WDS_IMAGES:
            raise OptionError("wds_images", f"must be source or none, not {self.wds_images!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attacks"] = list(self.attacks)
        return d
