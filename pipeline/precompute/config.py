"""What to precompute: `PrecomputeConfig`, checked when built (before torch is imported)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enspipe.attack_records import attack_names
from enspipe.config import check, check_declared, config_to_dict, normalize, option, renamed
from enspipe.configs import fields
from enspipe.configs.fields import DECODERS
from enspipe.precision import STORE_PRECISIONS as PRECISIONS
from enspipe.stores.registry import FORMATS as STORE_FORMATS

__all__ = ["ATTACKS", "DECODERS", "FORMATS", "LABEL_MODES", "PRECISIONS", "WDS_IMAGES", "PrecomputeConfig"]

ATTACKS = attack_names(storable=True)  # what a store can hold: read from the attack records
LABEL_MODES = ("pred", "true")
# `format` -> store formats: each registered store format, and "both" (zarr and wds at once).
FORMATS = {**{f: (f,) for f in STORE_FORMATS}, "both": ("zarr", "wds")}
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
    weights: str | None = fields.weights("Weights for an architecture name: an enspipe checkpoint or a "
                                         "torchvision/timm state dict (.safetensors, .pth).")
    pretrained: bool = fields.pretrained("Hub weights for an architecture name (offline: from the hub cache).")
    dataset: str = fields.dataset()
    data_root: str | None = fields.data_root()
    split: str = fields.split("train", "to compute directions over (test: the evaluation images, whose stores "
                              "evaluate reads as sources)", job=True)
    limit: int | None = fields.limit()
    image_size: int | None = fields.image_size()
    attacks: tuple[str, ...] = option(("step_ll",), sep=",", metavar="ATTACKS", choices=ATTACKS,
                                      help=f"{', '.join(ATTACKS)}, or several as a comma list (each gets its own "
                                      "store).")
    label: str = option("pred", choices=LABEL_MODES,
                        help="Label the FGSM direction uses (pred avoids label leaking).")
    format: str = option("zarr", choices=tuple(FORMATS), help="Store format: zarr, wds (WebDataset tars) or both.")
    shard_size: int = option(1024, minimum=1, help="Samples per shard: the unit of work, writing and retry.")
    batch_size: int = option(256, minimum=1, help="Samples per forward/backward pass of the static model.")
    device: str = fields.device()
    dask_workers: int | None = option(None, runtime=True, help="Start a local dask cluster of N worker processes "
                                      "[default: in-process; one per GPU on a multi-GPU machine].")
    scheduler: str | None = option(None, runtime=True, help="Address of an existing dask scheduler (tcp://host:port).")
    loader_workers: int | None = fields.loader_workers(
        "Processes that decode and resize images ahead of the compute "
        "(default: cores - 2, at least 1: one core drives the compute and one is the writer's, which "
        "compresses and checksums the shards; 0 decodes in the computing process).")
    precision: str = option(
        "fp32", choices=PRECISIONS, help="fp32, or bf16 (autocast; channels_last on CUDA): a store of its own.")
    decoder: str = fields.decoder("images", "nvJPEG's pixels differ from PIL's by a few levels: a store of "
                                  "its own.")
    wds_images: str = option(
        "source", choices=WDS_IMAGES, help="wds stores: carry each image as the source encoded it, or none.")

    def __post_init__(self) -> None:
        names = (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks)
        object.__setattr__(self, "attacks", names)
        normalize(self, paths=("model", "out", "weights", "data_root"))
        check_declared(self)  # every field's choices and minimum; below, what no one field declares
        check(isinstance(self.model, str) and bool(self.model.strip()), "model",
              "must name a static model (a run dir, checkpoint or architecture)")
        check(isinstance(self.out, str) and bool(self.out.strip()), "out", "must name the store root directory")
        check(bool(names), "attacks", f"must name at least one of {', '.join(ATTACKS)}")
        check(len(set(names)) == len(names), "attacks", f"lists an attack twice: {','.join(names)}")
        check(self.dask_workers is None or self.dask_workers >= 1, "dask_workers",
              f"must be at least 1 (leave it out to compute in-process), not {self.dask_workers!r}")
        check(self.scheduler is None or bool(str(self.scheduler).strip()), "scheduler",
              "must be a dask scheduler address such as tcp://host:8786")
        check(self.dask_workers is None or self.scheduler is None, "dask_workers",
              "starts a local cluster and `scheduler` uses an existing one: pass only one")
        check(self.weights is None or not self.pretrained, "weights",
              "and `pretrained` exclude each other: pass one source of weights")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)
