"""What to precompute: `PrecomputeConfig`, checked when built (before torch is imported)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enspipe.config import OptionError, check, config_to_dict, normalize, option, renamed

__all__ = ["ATTACKS", "FORMATS", "LABEL_MODES", "PRECISIONS", "WDS_IMAGES", "PrecomputeConfig"]

ATTACKS = ("fgsm", "step_ll")
LABEL_MODES = ("pred", "true")
FORMATS = {"zarr": ("zarr",), "wds": ("wds",), "both": ("zarr", "wds")}  # `format` -> store formats
PRECISIONS = ("fp32", "bf16")
WDS_IMAGES = ("source", "none")


@renamed(fmt="format", workers="dask_workers")
@dataclass(frozen=True)
class PrecomputeConfig:
    """What to precompute; the CLI and the job runner build it from their options.

    Each field is a flag of `enspipe precompute` and (where a job can set it) a key of a job
    spec's `[stores.NAME]` table, with the default and help declared here once."""

    model: str = option(job=False, help="The static model: a run dir / checkpoint, or an architecture with "
                        "--weights / --pretrained.")
    out: str = option(path="dir", job=False, help="Store ROOT; each store's path is derived under it.")
    weights: str | None = option(None, path="existing", job=False,
                                 help="Weights for an architecture name: an enspipe checkpoint or a "
                                 "torchvision/timm state dict (.safetensors, .pth).")
    pretrained: bool = option(False, job=False, help="Hub weights for an architecture name (offline: from the "
                              "hub cache).")
    dataset: str = option("digits", job=False, help="digits, mnist, cifar10, imagefolder:PATH or wds:PATTERN.")
    data_root: str | None = option(None, path="dir", job=False,
                                   help="Where datasets live (else $ENSPIPE_DATA, else ~/.cache/enspipe/data).")
    split: str = option("train", help="The dataset split to compute directions over (test: the evaluation "
                        "images, whose stores evaluate reads as sources).")
    limit: int | None = option(None, minimum=1, job=False, help="Use only the first N samples of the canonical order.")
    image_size: int | None = option(None, minimum=8, job=False,
                                    help="Resize (imagefolder: resize + center-crop) images to this square size.")
    attacks: tuple[str, ...] = option(("step_ll",), sep=",", metavar="ATTACKS",
                                      help="fgsm, step_ll, or both as a comma list (each gets its own store).")
    label: str = option("pred", choices=LABEL_MODES,
                        help="Label the FGSM direction uses (pred avoids label leaking).")
    format: str = option("zarr", choices=tuple(FORMATS), help="Store format: zarr, wds (WebDataset tars) or both.")
    shard_size: int = option(1024, minimum=1, help="Samples per shard: the unit of work, writing and retry.")
    batch_size: int = option(256, minimum=1, help="Samples per forward/backward pass of the static model.")
    device: str = option("auto", job=False, help="auto, cpu or cuda[:N].")
    dask_workers: int | None = option(None, runtime=True, help="Start a local dask cluster of N worker processes "
                                      "[default: in-process; one per GPU on a multi-GPU machine].")
    scheduler: str | None = option(None, runtime=True, help="Address of an existing dask scheduler (tcp://host:port).")
    loader_workers: int | None = option(
        None, minimum=0, runtime=True, help="Processes that decode and resize images ahead of the compute "
                                            "(default: from the cores; 0 decodes in the computing process).")
    precision: str = option(
        "fp32", choices=PRECISIONS, help="fp32, or bf16 (autocast; channels_last on CUDA): a store of its own.")
    wds_images: str = option(
        "source", choices=WDS_IMAGES, help="wds stores: carry each image as the source encoded it, or none.")

    def __post_init__(self) -> None:
        names = (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks)
        object.__setattr__(self, "attacks", names)
        normalize(self, paths=("model", "out", "weights", "data_root"))
        check(isinstance(self.model, str) and bool(self.model.strip()), "model",
              "must name a static model (a run dir, checkpoint or architecture)")
        check(isinstance(self.out, str) and bool(self.out.strip()), "out", "must name the store root directory")
        check(bool(names), "attacks", f"must name at least one of {', '.join(ATTACKS)}")
        for a in names:
            check(a in ATTACKS, "attacks", f"names an unknown attack {a!r}: precompute stores "
                  f"{' and '.join(ATTACKS)} directions")
        check(len(set(names)) == len(names), "attacks", f"lists an attack twice: {','.join(names)}")
        check(self.label in LABEL_MODES, "label", f"must be pred or true, not {self.label!r}")
        check(self.format in FORMATS, "format", f"must be zarr, wds or both, not {self.format!r}")
        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
        for name in ("shard_size", "batch_size", "limit"):
            value = getattr(self, name)
            if not positive(value) and not (name == "limit" and value is None):
                raise OptionError(name, f"must be a positive integer, not {value!r}")
        check(self.dask_workers is None or positive(self.dask_workers), "dask_workers",
              f"must be at least 1 (leave it out to compute in-process), not {self.dask_workers!r}")
        check(self.scheduler is None or bool(str(self.scheduler).strip()), "scheduler",
              "must be a dask scheduler address such as tcp://host:8786")
        check(self.dask_workers is None or self.scheduler is None, "dask_workers",
              "starts a local cluster and `scheduler` uses an existing one: pass only one")
        check(self.weights is None or not self.pretrained, "weights",
              "and `pretrained` exclude each other: pass one source of weights")
        lw = self.loader_workers
        if lw is not None and (isinstance(lw, bool) or not isinstance(lw, int) or lw < 0):
            raise OptionError("loader_workers", f"must be 0 (decode in the computing process) or more, not {lw!r}")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"must be fp32 or bf16, not {self.precision!r}")
        if self.wds_images not in WDS_IMAGES:
            raise OptionError("wds_images", f"must be source or none, not {self.wds_images!r}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)
