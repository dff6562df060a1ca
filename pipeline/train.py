"""Training: clean, online single-step adversarial, and ensemble adversarial (§3.4, §4.2).

(Over 400 lines on purpose: the run's configuration, its batches and the one training loop
read best together; the loop's machinery lives in `enspipe.trainkit`.)

One loop serves the three modes. Per batch an adversarial *source* is drawn:
  clean    no source; the batch is trained as is.
  adv      always the model itself: one online forward+backward to get its direction.
  ens-adv  uniformly from {the model itself} + every precomputed store. Only when the model
           itself is drawn is an online pass made; otherwise the stored direction d of the
           drawn static model gives x_adv = clip(x + eps*d, 0, 1) for free.
A fraction (`adv_fraction`, default 1/2) of each batch is replaced by its adversarial
version (Kurakin et al. 2017b). Attacks on the model itself use its predicted label, never
the true one (label leaking, Appendix C.2).

Streaming: the clean images and the stores' directions are joined by sample index. A
`BatchStream` (`enspipe.stream.SourceBatches` configured by a TrainConfig, run in DataLoader
workers) reads contiguous blocks in a shuffled block order, draws each block's source before
reading it so that only the drawn store's directions are read (a batch uses one source),
shuffles a buffer of blocks in memory, applies identical crops/flips to image and direction,
and hands the main process ready batches, so the training step never waits on per-sample
I/O. The loader's workers live for the whole run and read the next epoch while the current
one ends. Data order and source draws depend only on (seed, epoch, rank, worker), so a run
resumed from an epoch checkpoint replays exactly what an uninterrupted run would have.

The step never waits for the GPU: loss, accuracy and the non-finite-loss check accumulate on
the device and are read every `log_every` steps (a non-finite loss still stops the run before
any checkpoint holds it). `precision` bf16/fp16 runs the forward passes under autocast (fp16
with a grad scaler) and, on CUDA, in channels_last.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from enspipe import attacks, losses
from enspipe._callable import callable_stage
from enspipe.attacks import parse_eps
from enspipe.config import (
    OptionError,
    check,
    check_fraction,
    config_defaults,
    config_to_dict,
    normalize,
    option,
    parse_config,
    renamed,
    runtime_fields,
)
from enspipe.data import SampleSource, create_dataset
from enspipe.errors import ConfigError, EnspipeError, StoreError
from enspipe.fileio import atomic_target
from enspipe.models import EnsModel, load_model_for, save_model
from enspipe.paths import check_output
from enspipe.runlog import LOG_SINKS, RunLog, check_sinks
from enspipe.runtime import progress, read_json, resolve_device, seed_everything, versions, write_json
from enspipe.schedule import SCHEDULES, learning_rate, param_groups, set_learning_rate
from enspipe.stream import SELF, SourceBatches
from enspipe.trainkit import (AutocastModel, CheckpointWriter, FrozenModel, Window, autocast, channels_last,
                              epoch_batches, memory_format, prune_checkpoints, snapshot, validate)

MODES = ("clean", "adv", "ens-adv")
OPTIMIZERS = {"adam": 1e-3, "rmsprop": 0.045, "sgd": 0.01}  # default learning rates (paper / reference code)
PRECISIONS = ("fp32", "bf16", "fp16")


# Fields that say where and how a run goes, not what it computes: a resumed run may change
# them (config.json's other fields must match). The rest are declared `runtime=True`.
NOT_IDENTITY = ("device", "out", "resume")


@renamed(workers="loader_workers")
@dataclass(frozen=True)
class TrainConfig:
    """A training run, fully resolved; saved as `config.json` beside the weights.

    Each field is a flag of `enspipe train` (`--adv-fraction`) and a key of a job spec's
    `[models.NAME]` table (`adv_fraction`), with the default and help declared here once."""

    model: str = option(help="Architecture (A, B, B*, C, C-code, D, resnet50, timm:NAME) or a run dir / "
                        "checkpoint to start from.", job=False)
    dataset: str = option("digits", help="digits, mnist, cifar10, imagefolder:PATH or wds:PATTERN.", job=False)
    split: str = option("train", help="The dataset split to train on.", job=False)
    data_root: str | None = option(None, path="dir", job=False,
                                   help="Where datasets live (else $ENSPIPE_DATA, else ~/.cache/enspipe/data).")
    limit: int | None = option(None, minimum=1, job=False, help="Use only the first N samples of the canonical order.")
    image_size: int | None = option(None, minimum=8, job=False,
                                    help="Resize (imagefolder: resize + center-crop) images to this square size.")
    mode: str = option("clean", choices=MODES, help="clean, online single-step adversarial (adv), or ensemble "
                       "adversarial from precomputed stores (ens-adv).")
    shards: tuple[str, ...] = option((), metavar="STORE", help="A precomputed store (repeat for several static "
                                     "models). ens-adv only.")
    attack: str | None = option(None, choices=("fgsm", "step_ll"), help="Single-step attack of the training-time "
                                "examples [default: the stores' own (ens-adv), else fgsm].")
    eps: float = option(0.3, parse=parse_eps, metavar="EPS", help="l-inf budget: 0.3 or 16/256.")
    eps_dist: str = option("fixed", choices=("fixed", "truncnorm"), help="truncnorm draws eps per example from "
                           "|N(0, eps/2)| truncated to [0, eps] (Kurakin et al.).")
    adv_fraction: float = option(0.5, help="Share of each batch replaced by adversarial examples.")
    epochs: int = option(6, help="Epochs to train.")
    batch_size: int = option(64, help="Samples per batch.")
    optimizer: str = option("adam", choices=tuple(OPTIMIZERS), help="adam, rmsprop (the paper's ImageNet "
                            "setup) or sgd (momentum 0.9).")
    lr: float | None = option(None, help="Learning rate [adam 1e-3, rmsprop 0.045, sgd 0.01].")
    lr_decay: float = option(1.0, help="Multiply lr by this every --lr-decay-every epochs (ImageNet: 0.94).")
    lr_decay_every: int = option(2, help="Epochs between two lr decays.")
    augment: str = option("none", choices=("none", "crop", "flip", "crop+flip"),
                          help="Random crops / flips, applied to the image and its direction alike.")
    crop_padding: int = option(2, minimum=0, help="Zero padding (pixels) around the image for random crops.")
    seed: int = option(0, help="Seed of the data order, source draws, eps draws and initialisation.")
    block_size: int = option(256, help="Samples per contiguous read from the data and the stores.")
    buffer_blocks: int = option(8, help="Blocks shuffled together in memory.")
    loader_workers: int = option(0, minimum=0, runtime=True, help="DataLoader worker processes that read, decode and "
                                 "augment batches ahead of the step.")
    device: str = option("auto", job=False, help="auto, cpu or cuda[:N].")
    weights: str | None = option(None, path="existing", help="Initial weights: an enspipe run/checkpoint or a "
                                 "torchvision/timm state dict (.safetensors, .pth).")
    new_head: bool = option(False, help="Load --weights except the classifier head, which starts fresh "
                            "(fine-tune on another number of classes).")
    log_every: int = option(20, minimum=1, help="Batches per metrics.jsonl line.")
    record_indices: bool = option(False, hidden=True, help="Save each rank's sample order per epoch (audits).")
    pretrained: bool = option(False, help="Start from the architecture's hub weights (torchvision / timm; "
                              "offline: from the hub cache).")
    out: str | None = option(None, path="dir", job=False, help="Run directory to create (or continue with --resume).")
    resume: bool = option(False, job=False, help="Continue a killed run from its last epoch checkpoint.")
    adv_loss: str = option("replace", choices=losses.ADV_LOSSES, help=(
        "replace: adversarial examples replace --adv-fraction of each batch (the paper's ImageNet "
        "setup); paired: they come in addition to the whole clean batch (the reference code's "
        "MNIST loss with --adv-fraction 1)."))
    adv_weight: float = option(1.0, help=(
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
    val_limit: int | None = option(None, minimum=1, metavar="N", runtime=True, help="Each epoch, clean and FGSM error on N held-out test samples.")
    log: tuple[str, ...] = option((), sep=",", metavar="csv|tensorboard", runtime=True, help="Also log metrics to csv (metrics.csv) or tensorboard (repeatable).")

    def __post_init__(self) -> None:
        # Paths are accepted as str or PathLike (precompute() returns Paths); stored as str.
        normalize(self, paths=("model", "out", "weights", "data_root"), path_lists=("shards",))
        check(all(s.strip() for s in self.shards), "shards", "needs a store path, got an empty one")
        check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, not {self.mode!r}")
        check(not (self.mode == "ens-adv" and not self.shards), "mode",
              "ens-adv needs at least one `shards` STORE (the static models' directions)")
        check(self.mode == "ens-adv" or not self.shards, "shards", f"is only used by `mode` ens-adv, not {self.mode}")
        check(self.attack in (None, "fgsm", "step_ll"), "attack", f"must be fgsm or step_ll, not {self.attack!r}")
        check(not self.new_head or self.weights is not None, "new_head",
              "fits a fresh classifier head to `weights`; pass `weights` FILE")
        check(self.weights is None or not self.pretrained, "weights",
              "and `pretrained` exclude each other: pass one source of weights")
        check_fraction(self.adv_fraction, "adv_fraction")
        check_fraction(self.eps, "eps")
        check(self.eps_dist in ("fixed", "truncnorm"), "eps_dist", f"must be fixed or truncnorm, not {self.eps_dist!r}")
        check(self.optimizer in OPTIMIZERS, "optimizer",
              f"must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        check(self.augment in ("none", "crop", "flip", "crop+flip"), "augment",
              f"must be none, crop, flip or crop+flip, not {self.augment!r}")
        for name in ("epochs", "batch_size", "block_size", "buffer_blocks", "log_every", "lr_decay_every"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, not {getattr(self, name)}")
        check(self.loader_workers >= 0, "loader_workers", f"must be 0 or more, not {self.loader_workers}")
        check(self.crop_padding >= 0, "crop_padding", f"must be 0 or more, not {self.crop_padding}")
        check(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "lr",
              f"must be a positive number, not {self.lr}")
        check(0 < self.lr_decay <= 1, "lr_decay", f"must be in (0, 1], not {self.lr_decay}")
        check(self.limit is None or self.limit >= 1, "limit", f"must be at least 1, not {self.limit}")
        losses.check_adv_loss(self.adv_loss, self.adv_weight)
        object.__setattr__(self, "log", tuple(self.log))
        check(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay",
              f"must be 0 or more, not {self.weight_decay}")
        check(self.schedule in SCHEDULES, "schedule", f"must be step or cosine, not {self.schedule!r}")
        check(self.warmup_epochs >= 0, "warmup_epochs", f"must be 0 or more, not {self.warmup_epochs}")
        check(self.schedule != "cosine" or self.warmup_epochs < self.epochs, "warmup_epochs",
              f"must be fewer than `epochs` ({self.epochs}) with the cosine schedule, not {self.warmup_epochs}")
        check(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "keep_checkpoints",
              f"must be at least 1, not {self.keep_checkpoints}")
        check(self.precision in PRECISIONS, "precision", f"must be fp32, bf16 or fp16, not {self.precision!r}")
        check(self.val_limit is None or self.val_limit >= 1, "val_limit", f"must be at least 1, not {self.val_limit}")
        for sink in self.log:
            check(sink in LOG_SINKS, "log", f"must be csv or tensorboard, not {sink!r}")

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


# --- The batch stream ---------------------------------------------------------------------

def block_ranges(num_samples: int, block_size: int, *, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1) -> list[tuple[int, int]]:
    """Contiguous blocks in a shuffled order; rank r takes every world_size-th block."""
    from enspipe.sampling import block_order

    return block_order(num_samples, block_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size)


def _draw_eps(rng: np.random.Generator, n: int, eps: float, dist: str) -> np.ndarray:
    if dist == "fixed":
        return np.full(n, eps, dtype=np.float32)
    # Kurakin et al. 2017b: eps ~ N(0, sigma=eps/2) truncated to [0, eps] (folded at 0).
    out = np.abs(rng.normal(0.0, eps / 2, size=n))
    while (bad := out > eps).any():
        out[bad] = np.abs(rng.normal(0.0, eps / 2, size=int(bad.sum())))
    return out.astype(np.float32)


class BatchStream(SourceBatches):
    """The trainer's batches: `SourceBatches` as a TrainConfig asks (stores only in ens-adv,
    where each block's source is drawn from the model itself + the stores), and per batch
    `n_adv` (the leading samples to perturb, `adv_fraction` of it; 0 in clean mode) and
    their `eps` (fixed, or drawn per example). Only the first n_adv rows of the drawn
    store's directions are handed on (`d`)."""

    def __init__(self, dataset: SampleSource, store_paths: tuple[str, ...], cfg: TrainConfig, *,
                 epoch: int, rank: int = 0, world_size: int = 1, full_batches_only: bool = False):
        self.cfg = cfg
        super().__init__(dataset, store_paths if cfg.mode == "ens-adv" else (), batch_size=cfg.batch_size,
                         seed=cfg.seed, epoch=epoch, block_size=cfg.block_size, buffer_blocks=cfg.buffer_blocks,
                         augment=cfg.augment, crop_padding=cfg.crop_padding, rank=rank, world_size=world_size,
                         drop_last=full_batches_only, check=False)
        self.store_paths = self.stores

    def adv_rows(self, n: int) -> int:
        return 0 if self.cfg.mode == "clean" else max(1, int(round(self.cfg.adv_fraction * n)))

    def _source_batch(self, source: int, part: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
        batch = super()._source_batch(source, part, rng)
        n_adv = self.adv_rows(len(batch["index"]))
        batch["n_adv"] = n_adv
        batch["eps"] = torch.from_numpy(_draw_eps(rng, n_adv, self.cfg.eps, self.cfg.eps_dist))
        return batch


def adversarial_inputs(model: torch.nn.Module, batch: dict[str, Any], cfg: TrainConfig,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The inputs the step trains on: the first n_adv samples replaced by x_adv.

    Returns (x, y, online) where `online` says whether the model itself was attacked."""
    x = memory_format(batch["x"].to(device, non_blocking=True).float().div_(255.0), cfg.precision, device)
    y = batch["y"].to(device, non_blocking=True)
    n_adv = batch["n_adv"]
    if n_adv == 0:
        return x, y, False
    eps = batch["eps"].to(device, non_blocking=True)
    if batch["source"] == SELF:
        # Online pass on the model being trained, in its training mode as the reference
        # code did (B's input dropout then diversifies the perturbations, Appendix C.2).
        d, _, _ = attacks.direction(AutocastModel.wrap(model, cfg.precision, device), x[:n_adv], attack=cfg.attack, label="pred")
    else:
        d = batch["d"].to(device, non_blocking=True)
    x_adv = attacks.apply_direction(x[:n_adv], d, eps)
    return torch.cat([x_adv, x[n_adv:]]), y, batch["source"] == SELF


# --- The trainer's seams --------------------------------------------------------------------
#
# train() takes where its batches come from, how a batch becomes the inputs it trains on, and
# who hears its metrics as call arguments (not configuration: config.json stays the run's
# identity). Benchmarks and later streams plug in here instead of patching module globals.

StreamFactory = Callable[[SampleSource, TrainConfig, int, int, int], torch.utils.data.IterableDataset]
"""(dataset, cfg, epoch, rank, world) -> the epoch's batches for this rank, as BatchStream yields them.
With cfg.loader_workers > 0 every epoch's stream is made when training starts (the loader's workers
read them in turn); with 0, each when its epoch starts."""
AdversarialFn = Callable[[torch.nn.Module, dict[str, Any], TrainConfig, torch.device],
                         tuple[torch.Tensor, torch.Tensor, bool]]
"""(model, batch, cfg, device) -> (x, y, online), as adversarial_inputs."""
MetricsFn = Callable[[dict[str, Any]], None]
"""Receives each metrics record (one line of metrics.jsonl) as it is made."""


def batch_stream(dataset: SampleSource, cfg: TrainConfig, epoch: int, rank: int = 0,
                 world: int = 1) -> BatchStream:
    """train()'s default StreamFactory: the BatchStream over `cfg.shards`. Under DDP every
    rank must take the same number of steps, so only full batches are yielded there."""
    return BatchStream(dataset, cfg.shards, cfg, epoch=epoch, rank=rank, world_size=world,
                       full_batches_only=world > 1)


def batch_loader(stream: torch.utils.data.IterableDataset, cfg: TrainConfig,
                 device: torch.device) -> torch.utils.data.DataLoader:
    """The DataLoader train() reads its batches through: the stream yields whole batches,
    `cfg.loader_workers` processes build them ahead of the step into pinned memory (CUDA). train()
    iterates it once over all its epochs, so its workers persist across epochs. The loader
    seeds its workers from its own generator: making one never draws from the training RNG,
    so a resumed run (which makes its loader at another epoch) keeps the RNG stream."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.loader_workers,
                                       pin_memory=device.type == "cuda", persistent_workers=False,
                                       prefetch_factor=4 if cfg.loader_workers else None,
                                       generator=torch.Generator().manual_seed(cfg.seed))


# --- The run ------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    final: dict[str, Any] = field(default_factory=dict)


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_attack(shards: tuple[str, ...], attack: str | None) -> str:
    """The attack a run trains with: `attack` if given, else the stores' own (they must all
    hold the same one), else FGSM. A given attack that the stores do not hold is an error."""
    from enspipe.stores import open_store

    held: dict[str, str] = {}
    for p in shards:
        if not Path(p).exists():
            raise EnspipeError(f"store {p} does not exist")
        held[p] = open_store(p).identity.attack
    kinds = sorted(set(held.values()))
    if len(kinds) > 1:
        which = ", ".join(f"{p} holds {a}" for p, a in held.items())
        raise StoreError(f"the stores hold directions of different attacks ({which}); train on stores of one attack")
    if attack is not None and kinds and attack != kinds[0]:
        raise StoreError(f"`attack` {attack} conflicts with the stores, which hold {kinds[0]} directions "
                         f"({next(iter(held))}); leave `attack` out to train with {kinds[0]}, or precompute "
                         f"{attack} directions")
    return attack or (kinds[0] if kinds else "fgsm")


def _check_stores(dataset: SampleSource, paths: tuple[str, ...]) -> list[dict[str, Any]]:
    """Refuse, before training starts, any store that does not match the training data."""
    from enspipe.stores import open_store, verify_store

    out = []
    for p in paths:
        if not Path(p).exists():
            raise EnspipeError(f"store {p} does not exist")
        # Every checksum is checked before training starts (one read of the store): a
        # corrupt store must never feed wrong directions silently.
        report = verify_store(p)
        if not report.ok:
            raise StoreError(f"store {p} failed verification: {report.problems[0]}"
                             + (f" (and {len(report.problems) - 1} more problems)" if len(report.problems) > 1 else "")
                             + "; run enspipe verify for details")
        reader = open_store(p)
        reader.check_compatible(fingerprint=dataset.fingerprint, geometry=dataset.geometry.shape,
                                num_samples=len(dataset), num_classes=dataset.num_classes,
                                dataset=dataset)
        # The checksums above sit beside the data they cover; the keys bind every shard to its
        # samples (a zarr shard copied over another, records and all, still fails here).
        reader.check_keys(0, len(dataset), dataset.keys)
        out.append({"path": str(p), "model": reader.identity.model_name, "attack": reader.identity.attack,
                    "weights_sha256": reader.identity.weights_sha256})
    return out


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("epoch-*.pt"))


def train(cfg: TrainConfig, run_dir: str | os.PathLike | None = None, *, resume: bool | None = None,
          stream_factory: StreamFactory | None = None, on_metrics: MetricsFn | None = None,
          adversarial: AdversarialFn | None = None) -> TrainResult:
    """Train `cfg.model` on `cfg.dataset` into the run directory `cfg.out` (see the module
    docstring); `cfg.resume` continues a killed run. `train(cfg, run_dir, resume=...)` is the
    deprecated form of `train(replace(cfg, out=run_dir, resume=...))`.

    `resume` continues the run from its last epoch checkpoint, with the same configuration
    except the runtime options (`config.runtime_fields`) and `epochs`: a larger `epochs` extends a
    finished run (see `enspipe.schedule` for what the schedule then does).

    The seams (none of them is recorded in config.json, so a resumed run may differ in them):
      stream_factory(dataset, cfg, epoch, rank, world) -> the IterableDataset of the epoch's
          batches (default `batch_stream`: the BatchStream over cfg.shards);
      on_metrics(record) is called with every metrics record this rank makes (rank 0 also
          writes each one to metrics.jsonl, as without it);
      adversarial(model, batch, cfg, device) -> (x, y, online) makes a batch's training
          inputs (default `adversarial_inputs`).
    """
    if run_dir is not None or resume is not None:
        warnings.warn("train(cfg, run_dir, resume=...) is deprecated: put them in the config, "
                      "train(TrainConfig(..., out=run_dir, resume=...))", DeprecationWarning, stacklevel=2)
        cfg = replace(cfg, **({} if run_dir is None else {"out": os.fspath(run_dir)}),
                      **({} if resume is None else {"resume": resume}))
    if cfg.out is None:
        raise OptionError("out", "is required: the run directory to write")
    run_dir = Path(cfg.out)
    check_output(run_dir)  # never inside a store
    rank, world, local_rank = _distributed()
    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, run_dir, resume=cfg.resume, rank=rank, world=world, device=device,
                      stream_factory=stream_factory or batch_stream, on_metrics=on_metrics,
                      adversarial=adversarial or adversarial_inputs)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _resume_history(cfg: TrainConfig, config_path: Path, run_dir: Path) -> list[dict[str, int]]:
    """Refuse to resume with another configuration; return the run's epochs history. Runtime
    options and `epochs` may differ: a larger `epochs` extends a finished run."""
    saved = read_json(config_path)
    # Options added since the run was started compare at their defaults.
    old = {**TrainConfig.defaults(), **saved.get("train", {})}
    skip = (*NOT_IDENTITY, *runtime_fields(TrainConfig), "epochs")
    mine = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    diff = [k for k, v in mine.items() if old.get(k) != v]
    if diff:
        raise OptionError("resume", f"{run_dir} was trained with another configuration "
                          f"(differs in: {', '.join(f'`{k}`' for k in diff)})")
    return saved.get("epochs_history") or [{"epochs": old["epochs"], "from_epoch": 0}]


def _train(cfg: TrainConfig, run_dir: Path, *, resume: bool, rank: int, world: int, device: torch.device,
           stream_factory: StreamFactory, on_metrics: MetricsFn | None, adversarial: AdversarialFn) -> TrainResult:
    config_path = run_dir / "config.json"
    # Resolved before anything else: config.json records the attack actually used, and a
    # resumed run compares resolved configurations.
    cfg = replace(cfg, attack=resolve_attack(cfg.shards, cfg.attack))
    check_sinks(cfg.log)
    if resume and not config_path.exists():
        # Killed before it wrote anything: re-running with --resume starts it (so a requeue
        # loop that always passes --resume recovers from every kill point).
        resume = False
    history: list[dict[str, int]] = []
    if resume:
        history = _resume_history(cfg, config_path, run_dir)
    elif config_path.exists() and _checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; pass `resume` to continue it or choose another `out`")

    dataset = create_dataset(cfg.dataset, split=cfg.split, limit=cfg.limit, data_root=cfg.data_root,
                             image_size=cfg.image_size)
    stores = _check_stores(dataset, cfg.shards)
    val = (create_dataset(cfg.dataset, split="test", limit=cfg.val_limit, data_root=cfg.data_root,
                          image_size=cfg.image_size) if cfg.val_limit else None)
    seed_everything(cfg.seed)
    model = load_model_for(cfg.model, dataset, device, weights=cfg.weights, pretrained=cfg.pretrained,
                           new_head=cfg.new_head).train()
    if not isinstance(model, EnsModel):  # "binarized:SPEC" is an evaluation baseline, not a trainable model
        raise OptionError("model", f"{cfg.model} cannot be trained; name a model, run dir or checkpoint")
    if channels_last(cfg.precision, device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(cfg, model)
    # fp16 needs loss scaling (its gradients underflow); bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    start_epoch, step = 0, 0
    if resume and (ckpts := _checkpoints(run_dir)):
        try:
            state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated file, or a pickle that weights_only refuses
            raise EnspipeError(f"`resume`: checkpoint {ckpts[-1]} is unreadable ({type(e).__name__}); "
                               "delete it to resume from the one before") from None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
    if start_epoch > cfg.epochs:
        raise OptionError("epochs", f"{cfg.epochs} is fewer than the {start_epoch} epochs {run_dir} has done")
    if resume and start_epoch == cfg.epochs and rank == 0:
        # Killed between the last checkpoint and its model files: write them from it.
        _save_final(run_dir, model, dataset, cfg, start_epoch - 1)
    if not history or history[-1]["epochs"] != cfg.epochs:
        history = [*history, {"epochs": cfg.epochs, "from_epoch": start_epoch}]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(config_path, {"train": cfg.to_dict(), "run_dir": str(run_dir), "world_size": world,
                                 "device": str(device), "dataset": dataset.identity(), "stores": stores,
                                 "model": model.config.to_dict(), "versions": versions(),
                                 "epochs_history": history})

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # Records after the checkpoint's step were made by a killed run; they are made again.
    log = RunLog(run_dir, sinks=cfg.log, write=rank == 0, resume_step=step, on_metrics=on_metrics)
    writer = CheckpointWriter()
    per_rank = _batches_per_rank(len(dataset), cfg, world) if world > 1 else None
    nbatches = per_rank or math.ceil(len(dataset) / world / cfg.batch_size)
    epochs_bar = progress(total=cfg.epochs, initial=start_epoch, desc=f"train {run_dir.name}", unit="epoch",
                          bar=False, disable=None if rank == 0 else True)
    totals = {"online_passes": 0, "batches": 0, "samples": 0}
    schedule = dict(schedule=cfg.schedule, batches=nbatches, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                    lr_decay=cfg.lr_decay, lr_decay_every=cfg.lr_decay_every)
    # The epochs' batches: read, shuffled, source-drawn and augmented ahead of the step (in
    # cfg.loader_workers processes that live for the whole run) in an order fixed by (seed, epoch,
    # rank), so that a resumed run replays exactly what an uninterrupted one would have.
    epochs = epoch_batches(lambda e: stream_factory(dataset, cfg, e, rank, world),
                           lambda stream: batch_loader(stream, cfg, device),
                           range(start_epoch, cfg.epochs), cfg.loader_workers, per_rank)
    ended = None  # when the previous epoch's work was done: its boundary is the time to this epoch's first batch
    try:
        for epoch, batches in epochs:
            window = Window(1 + len(cfg.shards), device)
            model.train()
            bar = progress(total=nbatches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", lines=False,
                           leave=True, disable=None if rank == 0 else True)
            order: list[torch.Tensor] = []
            records: list[dict[str, Any]] = []
            asked = time.perf_counter()
            for i, batch in enumerate(batches):
                window.wait += time.perf_counter() - asked
                if i == 0 and ended is not None:
                    window.boundary = time.perf_counter() - ended
                if cfg.record_indices:
                    order.append(batch["index"])
                lr = learning_rate(cfg.learning_rate, epoch=epoch, batch=i, **schedule)
                set_learning_rate(optimizer, lr)
                # The inputs: a share of the batch replaced by x_adv, from a stored direction or,
                # when the model itself is the drawn source, from an online pass.
                x, y, online = adversarial(model, batch, cfg, device)
                x = memory_format(x, cfg.precision, device)
                # Forward at the run's precision, the loss in fp32. A non-finite loss is caught at
                # the next metrics line (no host sync per step), before any checkpoint holds it.
                with autocast(cfg.precision, device):
                    logits = net(x).float()
                    # Inside autocast: the paired loss runs a second (clean) forward pass.
                    loss = losses.training_loss(model, logits, y, batch, cfg)
                # Backward and step (fp16: through the grad scaler).
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                step += 1
                # Bookkeeping, on the device: a metrics record every log_every steps.
                window.add(batch, loss, logits, y, online, step)
                totals["online_passes"] += int(online)
                totals["batches"] += 1
                totals["samples"] += len(y)
                bar.update(1)
                if step % cfg.log_every == 0:
                    records.append(_flush(window, epoch, step, lr, run_dir, writer))
                    bar.set_postfix(loss=records[-1]["loss"], acc=records[-1]["accuracy"],
                                    sps=round(records[-1]["samples_per_s"]))
                    log.write(records[-1])
                asked = time.perf_counter()
            bar.close()
            # End of the epoch: the sample order (audits), the last partial window (every rank
            # hears its records; rank 0 writes them), the held-out errors, and the checkpoint
            # --resume continues from (written in the background while the next epoch runs).
            if cfg.record_indices:
                (run_dir / "indices").mkdir(parents=True, exist_ok=True)
                np.save(run_dir / "indices" / f"rank{rank}-epoch{epoch:04d}.npy", torch.cat(order).numpy())
            if window.batches:
                records.append(_flush(window, epoch, step, lr, run_dir, writer))
                log.write(records[-1])
            ended = time.perf_counter()  # the device is drained (the flush read it): from here it waits
            summary = _epoch_summary(records)
            if val is not None and rank == 0:
                v = validate(model, val, eps=cfg.eps, device=device, forward=lambda m: AutocastModel.wrap(m, cfg.precision, device))
                log.write({"kind": "val", "epoch": epoch + 1, "step": step, **v})
                summary.update(val_clean_error=round(v["clean_error"], 4), val_fgsm_error=round(v["fgsm_error"], 4))
            epochs_bar.update(1, **summary)
            if rank == 0:
                writer.submit(_checkpoint_job(run_dir, model, optimizer, scaler, epoch, step, dataset, cfg, device))
        writer.wait()
    finally:
        writer.close()
        log.close()
        epochs_bar.close()
    return TrainResult(run_dir, cfg.epochs, totals)


def _flush(window: Window, epoch: int, step: int, lr: float, run_dir: Path, writer: CheckpointWriter) -> dict[str, Any]:
    """The window's metrics record; a non-finite loss in it stops the run here, before the
    epoch's checkpoint could keep its weights."""
    rec = window.flush(epoch, step, lr)
    if "nonfinite" in rec:
        writer.close()
        last = _checkpoints(run_dir)
        bad = rec["nonfinite"]
        raise EnspipeError(
            f"loss became {bad['loss']} at epoch {epoch + 1} step {bad['step']}; stopping "
            + (f"(last good checkpoint: {last[-1]})" if last else "(no checkpoint yet)")
            + "; try a lower `lr`")
    return rec


def _epoch_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch's line: its windows' sample-weighted loss and accuracy, its rate."""
    samples = sum(r["samples"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    if not samples:
        return {}
    return {"loss": round(sum(r["loss"] * r["samples"] for r in records) / samples, 4),
            "accuracy": round(sum(r["accuracy"] * r["samples"] for r in records) / samples, 4),
            "samples/s": round(samples / max(seconds, 1e-9)),
            "online": f"{sum(r['online_passes'] for r in records)}/{sum(r['batches'] for r in records)}"}


def _batches_per_rank(n: int, cfg: TrainConfig, world: int) -> int:
    """DDP needs every rank to take the same number of steps in every epoch: the smallest
    full-batch count over ranks and epochs (block orders are cheap permutations)."""
    counts = []
    for epoch in range(cfg.epochs):
        for r in range(world):
            blocks = block_ranges(n, cfg.block_size, seed=cfg.seed, epoch=epoch, rank=r, world_size=world)
            # Leftovers carry across a rank's buffers, so only the rank's total matters.
            counts.append(sum(e - s for s, e in blocks) // cfg.batch_size)
    if min(counts) == 0:
        raise ConfigError(f"{n} samples over {world} ranks leave a rank without a full batch of {cfg.batch_size}")
    # Each DataLoader worker drops its own partial batch: up to one batch per extra worker.
    return max(1, min(counts) - max(cfg.loader_workers - 1, 0))


def _make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate)
    if cfg.optimizer == "rmsprop":
        # Kurakin et al. / the paper's ImageNet setup: RMSProp, decay 0.9, eps 1.0.
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, alpha=0.9, eps=1.0)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9)


def _checkpoint_job(run_dir: Path, model: EnsModel, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, epoch: int, step: int, dataset: SampleSource,
                    cfg: TrainConfig, device: torch.device) -> Callable[[], None]:
    """Copy this moment's state (the live tensors change as soon as the next epoch starts) and
    return the job that writes it: the epoch checkpoint, then the model files beside it."""
    frozen = FrozenModel(model)
    state = {
        "model": frozen.state_dict(),
        "optimizer": snapshot(optimizer.state_dict()),
        "rng_cpu": torch.get_rng_state(),
        "epoch": epoch,
        "step": step,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    path = run_dir / "checkpoints" / f"epoch-{epoch:04d}.pt"

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_target(path) as tmp:
                torch.save(state, tmp)
        except RuntimeError as e:
            # torch reports a failed write (e.g. a full disk) as RuntimeError: free the space,
            # keep the previous checkpoint, and say what happened in one line.
            raise EnspipeError(f"could not write checkpoint {path} ({str(e).splitlines()[0]}); "
                               "free space and re-run with `resume`") from None
        _save_final(run_dir, frozen, dataset, cfg, epoch)  # type: ignore[arg-type]
        prune_checkpoints(_checkpoints(run_dir), cfg.keep_checkpoints)

    return write


def _save_final(run_dir: Path, model: EnsModel, dataset: SampleSource, cfg: TrainConfig, epoch: int) -> None:
    save_model(model, run_dir, classes=list(dataset.classes), provenance={
        "trained_by": "enspipe train", "mode": cfg.mode, "epochs_done": epoch + 1,
        "dataset": dataset.identity(), "shards": list(cfg.shards), "seed": cfg.seed})


callable_stage(__name__)  # `enspipe.train(cfg)` is train(cfg)
