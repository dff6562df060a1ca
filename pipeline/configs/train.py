"""`TrainConfig`: a training run, fully resolved; torch-free, so the job parser and the CLI read
its options without importing the trainer (`enspipe.train` re-exports it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enspipe.attack_records import attack_names
from enspipe.config import (
    check,
    check_declared,
    config_defaults,
    config_to_dict,
    normalize,
    option,
    parse_config,
    renamed,
)
from enspipe.configs import fields
from enspipe.precision import PRECISIONS
from enspipe.report.runlog import LOG_SINKS

__all__ = ["ADV_LOSSES", "AUGMENTS", "EPS_DISTS", "MODES", "OPTIMIZERS", "SCHEDULES", "STORABLE", "TrainConfig"]

MODES = ("clean", "adv", "ens-adv")

STORABLE = attack_names(storable=True)  # the attacks a run can train with: online, or read from stores
OPTIMIZERS = {"adam": 1e-3, "rmsprop": 0.045, "sgd": 0.01}  # default learning rates (paper / reference code)
ADV_LOSSES = ("replace", "paired")  # see enspipe.train.losses
SCHEDULES = ("step", "cosine")      # see enspipe.train.schedule
AUGMENTS = ("none", "crop", "flip", "crop+flip")
EPS_DISTS = ("fixed", "truncnorm")


@renamed(workers="loader_workers")
@dataclass(frozen=True)
class TrainConfig:
    """A training run, fully resolved; saved as `config.json` beside the weights.

    Each field is a flag of `enspipe train` (`--adv-fraction`) and a key of a job spec's
    `[models.NAME]` table (`adv_fraction`), with the default and help declared here once."""

    # The MNIST names are models.MNIST_ARCHS (a test keeps them equal): enspipe.models imports
    # torch, which `enspipe train --help` must not.
    model: str = option(help="Architecture (A, B, B*, C, C-code, D, resnet50, timm:NAME) or a run dir / "
                        "checkpoint to start from.", job=False)
    dataset: str = fields.dataset()
    split: str = fields.split("train", "to train on")
    data_root: str | None = fields.data_root()
    limit: int | None = fields.limit()
    image_size: int | None = fields.image_size()
    mode: str = option("clean", choices=MODES, help="clean, online single-step adversarial (adv), or ensemble "
                       "adversarial from precomputed stores (ens-adv).")
    shards: tuple[str, ...] = option((), metavar="STORE", help="A precomputed store (repeat for several static "
                                     "models). ens-adv only.")
    attack: str | None = option(None, choices=STORABLE, help="Single-step attack of the training-time "
                                "examples [default: the stores' own (ens-adv), else fgsm].")
    eps: float = fields.eps()
    eps_dist: str = option("fixed", choices=EPS_DISTS, help="truncnorm draws eps per example from "
                           "|N(0, eps/2)| truncated to [0, eps] (Kurakin et al.).")
    adv_fraction: float = option(0.5, above=0, maximum=1, help="Share of each batch replaced by adversarial examples.")
    epochs: int = option(6, minimum=1, help="Epochs to train.")
    batch_size: int = option(64, minimum=1, help="Samples per batch.")
    grad_accum: int = option(1, minimum=1, help="Batches whose gradients add up before one optimizer step: an "
                             "effective batch of batch_size x grad_accum on one device (the paper's ImageNet runs "
                             "stepped on 50 replicas x 16).")
    optimizer: str = option("adam", choices=tuple(OPTIMIZERS), help="adam, rmsprop (the paper's ImageNet "
                            "setup) or sgd (momentum 0.9).")
    lr: float | None = option(None, above=0, help="Learning rate [" + ", ".join(
        f"{name} {lr:g}" for name, lr in OPTIMIZERS.items()) + "].")  # the defaults, from OPTIMIZERS
    lr_decay: float = option(1.0, above=0, maximum=1, help="Multiply lr by this every --lr-decay-every epochs (ImageNet: 0.94).")
    lr_decay_every: int = option(2, minimum=1, help="Epochs between two lr decays.")
    augment: str = option("none", choices=AUGMENTS,
                          help="Random crops / flips, applied to the image and its direction alike.")
    crop_padding: int = option(2, minimum=0, help="Zero padding (pixels) around the image for random crops.")
    seed: int = option(0, help="Seed of the data order, source draws, eps draws and initialisation.")
    block_size: int = option(256, minimum=1, help="Samples per contiguous read from the data and the stores.")
    buffer_blocks: int = option(8, minimum=1, help="Blocks shuffled together in memory.")
    loader_workers: int = fields.loader_workers("DataLoader worker processes that read, decode and augment batches "
                                                "ahead of the step (and decode the held-out validation's).", 0)
    device: str = fields.device()
    weights: str | None = fields.weights("Initial weights: an enspipe run/checkpoint or a torchvision/timm state "
                                        "dict (.safetensors, .pth).", job=True)
    new_head: bool = option(False, help="Load --weights except the classifier head, which starts fresh "
                            "(fine-tune on another number of classes).")
    log_every: int = option(20, minimum=1, help="Batches per metrics.jsonl line.")
    record_indices: bool = option(False, hidden=True, help="Save each rank's sample order per epoch (audits).")
    pretrained: bool = fields.pretrained("Start from the architecture's hub weights (torchvision / timm; "
                                         "offline: from the hub cache).", job=True)
    out: str | None = option(None, path="dir", job=False, help="Run directory to create (or continue with --resume).")
    resume: bool = option(False, job=False, help="Continue a killed run from its last epoch checkpoint.")
    adv_loss: str = option("replace", choices=ADV_LOSSES, help=(
        "replace: adversarial examples replace --adv-fraction of each batch (the paper's ImageNet "
        "setup); paired: they come in addition to the whole clean batch (the reference code's "
        "MNIST loss with --adv-fraction 1)."))
    adv_weight: float = option(1.0, above=0, help=(
        "lambda of Kurakin et al.'s loss (sum clean + lambda * sum adv) / (n_clean + lambda * n_adv); "
        "1 weighs every example alike (ImageNet: 0.3)."))
    # Issues 14 and 17: optimisation knobs, precision, validation and where metrics go.
    weight_decay: float = option(0.0, minimum=0, help="Weight decay (not on biases and norm weights, as timm); 0: none.")
    schedule: str = option("step", choices=SCHEDULES,
                           help="step: lr x lr_decay every lr_decay_every epochs; cosine: to 0 over the epochs.")
    warmup_epochs: int = option(0, minimum=0, help="Epochs of linear lr warmup (per batch) before the schedule.")
    keep_checkpoints: int | None = option(1, minimum=1, metavar="K", runtime=True, help="Keep only the last K epoch checkpoints (the last is what --resume reads; the final weights are model.safetensors beside them, always kept); a large K keeps them all.")
    precision: str = option("fp32", choices=PRECISIONS,
                            help="bf16/fp16: autocast (fp16 with a grad scaler), channels_last on CUDA.")
    decoder: str = fields.decoder("training images", "The batch's augmentation runs on the device "
                                  "too, and the held-out validation's images are decoded the same way.")
    val_limit: int | None = option(None, minimum=1, metavar="N", runtime=True, help="Each epoch, clean and FGSM error on N held-out test samples.")
    log: tuple[str, ...] = option((), sep=",", metavar="|".join(LOG_SINKS), choices=LOG_SINKS, runtime=True, help="Also log metrics to csv (metrics.csv) or tensorboard (repeatable).")

    def __post_init__(self) -> None:
        # Paths are accepted as str or PathLike (precompute() returns Paths); stored as str.
        normalize(self, paths=("model", "out", "weights", "data_root"), path_lists=("shards",))
        object.__setattr__(self, "log", tuple(self.log))
        check_declared(self)  # every field's choices and minimum; below, what no one field declares
        check(all(s.strip() for s in self.shards), "shards", "needs a store path, got an empty one")
        check(not (self.mode == "ens-adv" and not self.shards), "mode",
              "ens-adv needs at least one `shards` STORE (the static models' directions)")
        check(self.mode == "ens-adv" or not self.shards, "shards", f"is only used by `mode` ens-adv, not {self.mode}")
        check(not self.new_head or self.weights is not None, "new_head",
              "fits a fresh classifier head to `weights`; pass `weights` FILE")
        check(self.weights is None or not self.pretrained, "weights",
              "and `pretrained` exclude each other: pass one source of weights")
        check(self.schedule != "cosine" or self.warmup_epochs < self.epochs, "warmup_epochs",
              f"must be fewer than `epochs` ({self.epochs}) with the cosine schedule, not {self.warmup_epochs}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else OPTIMIZERS[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        """The run's configuration as config.json records it; where it lives (`out`) is the
        run dir's own path, recorded beside it as `run_dir`."""
        return {k: v for k, v in config_to_dict(self).items() if k != "out"}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return config_defaults(cls)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from its `to_dict()` (config.json), old field names included."""
        return parse_config(cls, d)
