"""Training: clean, online single-step adversarial, and ensemble adversarial (§3.4, §4.2).

One loop serves the three modes. Per batch an adversarial *source* is drawn:
  clean    no source; the batch is trained as is.
  adv      always the model itself: one online forward+backward to get its direction.
  ens-adv  uniformly from {the model itself} + every precomputed store. Only when the model
           itself is drawn is an online pass made; otherwise the stored direction d of the
           drawn static model gives x_adv = clip(x + eps*d, 0, 1) for free.
A fraction (`adv_fraction`, default 1/2) of each batch is replaced by its adversarial
version (Kurakin et al. 2017b). Attacks on the model itself use its predicted label, never
the true one (label leaking, Appendix C.2).

Streaming: the clean images and every store's directions are joined by sample index. A
`BatchStream` (an IterableDataset run in DataLoader workers) reads contiguous blocks in a
shuffled block order (the same order for data and stores), shuffles a buffer of blocks in
memory, draws each batch's source, applies identical crops/flips to image and direction,
and hands the main process ready batches, so the training step never waits on per-sample
I/O. Data order and source draws depend only on (seed, epoch, rank, worker), so a run
resumed from an epoch checkpoint replays exactly what an uninterrupted run would have.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from enspipe import attacks
from enspipe.data import SampleSource, create_dataset
from enspipe.errors import ConfigError, EnspipeError, StoreError
from enspipe.fileio import atomic_target
from enspipe.models import EnsModel, load_model_for, save_model
from enspipe.runtime import progress, read_json, resolve_device, seed_everything, versions, write_json

MODES = ("clean", "adv", "ens-adv")
OPTIMIZERS = {"adam": 1e-3, "rmsprop": 0.045, "sgd": 0.01}  # default learning rates (paper / reference code)
SELF = 0  # source id of the model being trained; store i has source id i + 1


@dataclass(frozen=True)
class TrainConfig:
    """A training run, fully resolved; saved as `config.json` beside the weights."""

    model: str
    dataset: str = "digits"
    split: str = "train"
    data_root: str | None = None
    limit: int | None = None
    image_size: int | None = None  # resize (and center-crop) the data to this square size
    mode: str = "clean"
    shards: tuple[str, ...] = ()
    attack: str | None = None      # the stores' attack (ens-adv), else fgsm; the model attacks itself with it
    eps: float = 0.3
    eps_dist: str = "fixed"        # fixed | truncnorm (Kurakin: |N(0, eps/2)| truncated to [0, eps])
    adv_fraction: float = 0.5
    epochs: int = 6
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float | None = None
    lr_decay: float = 1.0          # multiply lr by this every `lr_decay_every` epochs
    lr_decay_every: int = 2
    augment: str = "none"          # none | crop | flip | crop+flip (applied to image and direction alike)
    crop_padding: int = 2
    seed: int = 0
    block_size: int = 256
    buffer_blocks: int = 8
    workers: int = 0
    device: str = "auto"
    weights: str | None = None     # initial weights
    new_head: bool = False         # load `weights` except the classifier head (another number of classes)
    log_every: int = 20
    record_indices: bool = False   # write each rank's sample order per epoch (audits, DDP tests)

    def __post_init__(self) -> None:
        # Paths are accepted as str or PathLike (precompute() returns Paths); stored as str.
        if isinstance(self.shards, (str, os.PathLike)):
            raise ConfigError("shards must be a list of store paths, not one string")
        object.__setattr__(self, "shards", tuple(os.fspath(s) for s in self.shards))
        if any(not s.strip() for s in self.shards):
            raise ConfigError("--shards needs a store path, got an empty one")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "ens-adv" and not self.shards:
            raise ConfigError("--mode ens-adv needs at least one --shards STORE (the static models' directions)")
        if self.mode != "ens-adv" and self.shards:
            raise ConfigError(f"--shards is only used by --mode ens-adv, not {self.mode}")
        if self.attack not in (None, "fgsm", "step_ll"):
            raise ConfigError(f"--attack must be fgsm or step_ll, not {self.attack!r}")
        if self.new_head and self.weights is None:
            raise ConfigError("--new-head fits a fresh classifier head to --weights; pass --weights FILE")
        if not (0.0 < self.adv_fraction <= 1.0) or math.isnan(self.adv_fraction):
            raise ConfigError(f"--adv-fraction must be in (0, 1], not {self.adv_fraction}")
        if not (0.0 < self.eps <= 1.0) or math.isnan(self.eps):
            raise ConfigError(f"--eps must be in (0, 1], not {self.eps}")
        if self.eps_dist not in ("fixed", "truncnorm"):
            raise ConfigError(f"--eps-dist must be fixed or truncnorm, not {self.eps_dist!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.augment not in ("none", "crop", "flip", "crop+flip"):
            raise ConfigError(f"--augment must be none, crop, flip or crop+flip, not {self.augment!r}")
        for name in ("epochs", "batch_size", "block_size", "buffer_blocks", "log_every", "lr_decay_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, not {self.workers}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, not {self.lr}")
        if not (0 < self.lr_decay <= 1):
            raise ConfigError(f"--lr-decay must be in (0, 1], not {self.lr_decay}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, not {self.limit}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else OPTIMIZERS[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"] = list(self.shards)
        return d

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        d["shards"] = tuple(d.get("shards", ()))
        return cls(**d)


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


def _augment(rng: np.random.Generator, n: int, mode: str, pad: int) -> np.ndarray:
    """Per-sample (dy, dx, flip): a crop offset into the zero-padded image and a flip flag."""
    params = np.zeros((n, 3), dtype=np.int64)
    params[:, :2] = rng.integers(0, 2 * pad + 1, size=(n, 2)) if "crop" in mode else pad
    if "flip" in mode:
        params[:, 2] = rng.random(n) < 0.5
    return params


def _apply_augment(a: np.ndarray, params: np.ndarray, pad: int) -> np.ndarray:
    """Apply per-sample crops/flips to `a` [n, C, H, W]; the same params give the same
    transform on an image and on its direction."""
    n, _, h, w = a.shape
    padded = np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty_like(a)
    for i, (dy, dx, flip) in enumerate(params):
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop[..., ::-1] if flip else crop
    return out


class BatchStream(torch.utils.data.IterableDataset):
    """Yields ready batches: clean pixels, labels, the drawn source and its directions."""

    def __init__(self, dataset: SampleSource, store_paths: tuple[str, ...], cfg: TrainConfig, *,
                 epoch: int, rank: int = 0, world_size: int = 1, full_batches_only: bool = False):
        self.dataset, self.store_paths, self.cfg = dataset, store_paths, cfg
        self.epoch, self.rank, self.world_size = epoch, rank, world_size
        self.full_batches_only = full_batches_only

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from enspipe.stores import open_store

        cfg = self.cfg
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        # Readers are opened inside the worker: file handles do not cross processes.
        readers = [open_store(p) for p in self.store_paths]
        blocks = block_ranges(len(self.dataset), cfg.block_size, seed=cfg.seed, epoch=self.epoch,
                              rank=self.rank, world_size=self.world_size)[wid::nworkers]
        rng = np.random.default_rng([cfg.seed, self.epoch, self.rank, wid, 0x5EED])
        nsources = 1 + len(readers) if cfg.mode == "ens-adv" else 1
        carry: dict[str, np.ndarray] | None = None
        for g in range(0, len(blocks), cfg.buffer_blocks):
            group = blocks[g:g + cfg.buffer_blocks]
            buf = {
                "index": np.concatenate([np.arange(s, e) for s, e in group]),
                "x": np.concatenate([self.dataset.images_uint8(slice(s, e)) for s, e in group]),
            }
            buf["y"] = self.dataset.labels[buf["index"]]
            for k, r in enumerate(readers):
                buf[f"d{k}"] = np.concatenate([r.read_directions(s, e) for s, e in group])
            if carry is not None:  # leftovers of the previous buffer go first
                buf = {k: np.concatenate([carry[k], v]) for k, v in buf.items()}
            perm = rng.permutation(len(buf["index"]))
            buf = {k: v[perm] for k, v in buf.items()}
            last = g + cfg.buffer_blocks >= len(blocks)
            n = len(buf["index"])
            stop = n if (last and not self.full_batches_only) else n - n % cfg.batch_size
            for b in range(0, stop, cfg.batch_size):
                yield self._batch({k: v[b:b + cfg.batch_size] for k, v in buf.items()}, rng, nsources)
            carry = {k: v[stop:] for k, v in buf.items()} if stop < n else None

    def _batch(self, part: dict[str, np.ndarray], rng: np.random.Generator, nsources: int) -> dict[str, Any]:
        cfg = self.cfg
        n = len(part["index"])
        source = SELF if cfg.mode != "ens-adv" else int(rng.integers(0, nsources))
        n_adv = 0 if cfg.mode == "clean" else max(1, int(round(cfg.adv_fraction * n)))
        x = part["x"]
        d = part[f"d{source - 1}"][:n_adv] if source != SELF else None
        aug = None
        if cfg.augment != "none":
            aug = _augment(rng, n, cfg.augment, cfg.crop_padding)
            x = _apply_augment(x, aug, cfg.crop_padding)
            if d is not None:
                d = _apply_augment(d, aug[:n_adv], cfg.crop_padding)
        return {
            "index": torch.from_numpy(part["index"].astype(np.int64)),
            "x": torch.from_numpy(np.ascontiguousarray(x)),
            "y": torch.from_numpy(part["y"].astype(np.int64)),
            "source": source,
            "n_adv": n_adv,
            "eps": torch.from_numpy(_draw_eps(rng, n_adv, cfg.eps, cfg.eps_dist)),
            "d": torch.from_numpy(np.ascontiguousarray(d)) if d is not None else None,
            "aug": torch.from_numpy(aug) if aug is not None else None,
        }


def adversarial_inputs(model: torch.nn.Module, batch: dict[str, Any], cfg: TrainConfig,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The inputs the step trains on: the first n_adv samples replaced by x_adv.

    Returns (x, y, online) where `online` says whether the model itself was attacked."""
    x = batch["x"].to(device, non_blocking=True).float().div_(255.0)
    y = batch["y"].to(device, non_blocking=True)
    n_adv = batch["n_adv"]
    if n_adv == 0:
        return x, y, False
    eps = batch["eps"].to(device)
    if batch["source"] == SELF:
        # Online pass on the model being trained, in its training mode as the reference
        # code did (B's input dropout then diversifies the perturbations, Appendix C.2).
        d, _, _ = attacks.direction(model, x[:n_adv], attack=cfg.attack, label="pred")
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
"""(dataset, cfg, epoch, rank, world) -> the epoch's batches for this rank, as BatchStream yields them."""
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
    """The DataLoader train() runs an epoch's stream in: the stream yields whole batches,
    `cfg.workers` processes build them ahead of the step."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                       pin_memory=device.type == "cuda", persistent_workers=False,
                                       prefetch_factor=4 if cfg.workers else None)


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
        raise StoreError(f"--attack {attack} conflicts with the stores, which hold {kinds[0]} directions "
                         f"({next(iter(held))}); leave --attack out to train with {kinds[0]}, or precompute "
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
                                num_samples=len(dataset), num_classes=dataset.num_classes)
        # The checksums above sit beside the data they cover; the keys bind every shard to its
        # samples (a zarr shard copied over another, records and all, still fails here).
        reader.check_keys(0, len(dataset), dataset.keys)
        out.append({"path": str(p), "model": reader.identity.model_name, "attack": reader.identity.attack,
                    "weights_sha256": reader.identity.weights_sha256})
    return out


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("epoch-*.pt"))


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          stream_factory: StreamFactory | None = None, on_metrics: MetricsFn | None = None,
          adversarial: AdversarialFn | None = None) -> TrainResult:
    """Train `cfg.model` on `cfg.dataset` into `run_dir` (see the module docstring).

    The seams (none of them is recorded in config.json, so a resumed run may differ in them):
      stream_factory(dataset, cfg, epoch, rank, world) -> the IterableDataset of the epoch's
          batches (default `batch_stream`: the BatchStream over cfg.shards);
      on_metrics(record) is called with every metrics record this rank makes (rank 0 also
          writes each one to metrics.jsonl, as without it);
      adversarial(model, batch, cfg, device) -> (x, y, online) makes a batch's training
          inputs (default `adversarial_inputs`).
    """
    run_dir = Path(run_dir)
    rank, world, local_rank = _distributed()
    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, run_dir, resume=resume, rank=rank, world=world, device=device,
                      stream_factory=stream_factory or batch_stream, on_metrics=on_metrics,
                      adversarial=adversarial or adversarial_inputs)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, run_dir: Path, *, resume: bool, rank: int, world: int, device: torch.device,
           stream_factory: StreamFactory, on_metrics: MetricsFn | None, adversarial: AdversarialFn) -> TrainResult:
    config_path = run_dir / "config.json"
    # Resolved before anything else: config.json records the attack actually used, and a
    # resumed run compares resolved configurations.
    cfg = replace(cfg, attack=resolve_attack(cfg.shards, cfg.attack))
    if resume and not config_path.exists():
        # Killed before it wrote anything: re-running with --resume starts it (so a requeue
        # loop that always passes --resume recovers from every kill point).
        resume = False
    if resume:
        # Options added since the run was started compare at their defaults.
        old = {**TrainConfig.defaults(), **read_json(config_path).get("train", {})}
        mine = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "workers")}
        diff = [k for k, v in mine.items() if old.get(k) != v]
        if diff:
            raise ConfigError(f"--resume: {run_dir} was trained with another configuration "
                              f"(differs in: {', '.join(diff)})")
    elif config_path.exists() and _checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")

    dataset = create_dataset(cfg.dataset, split=cfg.split, limit=cfg.limit, data_root=cfg.data_root,
                             image_size=cfg.image_size)
    stores = _check_stores(dataset, cfg.shards)
    seed_everything(cfg.seed)
    model = load_model_for(cfg.model, dataset, device, weights=cfg.weights, new_head=cfg.new_head).train()
    if not isinstance(model, EnsModel):  # "binarized:SPEC" is an evaluation baseline, not a trainable model
        raise ConfigError(f"--model {cfg.model} cannot be trained; name a model, run dir or checkpoint")
    optimizer = _make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay)

    start_epoch, step = 0, 0
    if resume and (ckpts := _checkpoints(run_dir)):
        try:
            state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated file, or a pickle that weights_only refuses
            raise EnspipeError(f"--resume: checkpoint {ckpts[-1]} is unreadable ({type(e).__name__}); "
                               "delete it to resume from the one before") from None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
    if resume and start_epoch >= cfg.epochs and rank == 0:
        # Killed between the last checkpoint and its model files: write them from it.
        _save_final(run_dir, model, dataset, cfg, start_epoch - 1)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(config_path, {"train": cfg.to_dict(), "run_dir": str(run_dir), "world_size": world,
                                 "device": str(device), "dataset": dataset.identity(), "stores": stores,
                                 "model": model.config.to_dict(), "versions": versions()})

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None

    def log_metrics(rec: dict[str, Any]) -> None:
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if on_metrics is not None:
            on_metrics(rec)

    per_rank = _batches_per_rank(len(dataset), cfg, world) if world > 1 else None
    totals = {"online_passes": 0, "batches": 0, "samples": 0}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # The epoch's batches, read, shuffled, source-drawn and augmented ahead of the step
            # (in cfg.workers processes) in an order fixed by (seed, epoch, rank), so that a
            # resumed run replays exactly what an uninterrupted one would have.
            loader = batch_loader(stream_factory(dataset, cfg, epoch, rank, world), cfg, device)
            nbatches = per_rank or math.ceil(len(dataset) / world / cfg.batch_size)
            window = _Window(1 + len(cfg.shards))
            model.train()
            bar = progress(total=nbatches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                           disable=None if rank == 0 else True)
            order: list[torch.Tensor] = []
            for i, batch in enumerate(loader):
                if per_rank is not None and i >= per_rank:
                    break
                if cfg.record_indices:
                    order.append(batch["index"])
                # The inputs: a share of the batch replaced by x_adv, from a stored direction or,
                # when the model itself is the drawn source, from an online pass.
                x, y, online = adversarial(model, batch, cfg, device)
                # Forward; a non-finite loss stops the run before it can reach a checkpoint.
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    last = _checkpoints(run_dir)
                    raise EnspipeError(
                        f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; stopping "
                        + (f"(last good checkpoint: {last[-1]})" if last else "(no checkpoint yet)")
                        + "; try a lower --lr")
                # Backward and step.
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                # Bookkeeping: a metrics record every log_every steps.
                window.add(batch, loss.item(), (logits.argmax(1) == y).float().mean().item(), online)
                totals["online_passes"] += int(online)
                totals["batches"] += 1
                totals["samples"] += len(y)
                bar.update(1)
                if step % cfg.log_every == 0:
                    rec = window.flush(epoch, step, scheduler.get_last_lr()[0])
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['accuracy']:.3f}",
                                    sps=f"{rec['samples_per_s']:.0f}")
                    log_metrics(rec)
            bar.close()
            # End of the epoch: the sample order (audits), the last partial window (every rank
            # hears its records; rank 0 writes them), and the checkpoint --resume continues from.
            if cfg.record_indices:
                (run_dir / "indices").mkdir(parents=True, exist_ok=True)
                np.save(run_dir / "indices" / f"rank{rank}-epoch{epoch:04d}.npy", torch.cat(order).numpy())
            if window.batches:
                log_metrics(window.flush(epoch, step, scheduler.get_last_lr()[0]))
            scheduler.step()
            if rank == 0:
                _save_epoch(run_dir, model, optimizer, scheduler, epoch, step, dataset, cfg, device)
    finally:
        if metrics:
            metrics.close()
    return TrainResult(run_dir, cfg.epochs, totals)


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
    return max(1, min(counts) - max(cfg.workers - 1, 0))


def _make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate)
    if cfg.optimizer == "rmsprop":
        # Kurakin et al. / the paper's ImageNet setup: RMSProp, decay 0.9, eps 1.0.
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, alpha=0.9, eps=1.0)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9)


def _save_epoch(run_dir: Path, model: EnsModel, optimizer, scheduler, epoch: int, step: int,
                dataset: SampleSource, cfg: TrainConfig, device: torch.device) -> None:
    ckdir = run_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "epoch": epoch,
        "step": step,
    }
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    path = ckdir / f"epoch-{epoch:04d}.pt"
    try:
        with atomic_target(path) as tmp:
            torch.save(state, tmp)
    except RuntimeError as e:
        # torch reports a failed write (e.g. a full disk) as RuntimeError: free the space,
        # keep the previous checkpoint, and say what happened in one line.
        raise EnspipeError(f"could not write checkpoint {path} ({str(e).splitlines()[0]}); "
                           "free space and re-run with --resume") from None
    _save_final(run_dir, model, dataset, cfg, epoch)


def _save_final(run_dir: Path, model: EnsModel, dataset: SampleSource, cfg: TrainConfig, epoch: int) -> None:
    save_model(model, run_dir, classes=list(dataset.classes), provenance={
        "trained_by": "enspipe train", "mode": cfg.mode, "epochs_done": epoch + 1,
        "dataset": dataset.identity(), "shards": list(cfg.shards), "seed": cfg.seed})


class _Window:
    """Running metrics between two log lines."""

    def __init__(self, nsources: int):
        self.nsources = nsources
        self._reset()

    def _reset(self) -> None:
        self.t0, self.batches, self.samples = time.perf_counter(), 0, 0
        self.loss = self.correct = 0.0
        self.online = 0
        self.sources = [0] * self.nsources

    def add(self, batch: dict[str, Any], loss: float, acc: float, online: bool) -> None:
        n = len(batch["y"])
        self.batches += 1
        self.samples += n
        self.loss += loss * n
        self.correct += acc * n
        self.online += int(online)
        if batch["n_adv"]:
            self.sources[batch["source"]] += 1

    def flush(self, epoch: int, step: int, lr: float) -> dict[str, Any]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rec = {"epoch": epoch + 1, "step": step, "loss": self.loss / max(self.samples, 1),
               "accuracy": self.correct / max(self.samples, 1), "batches": self.batches,
               "samples": self.samples, "seconds": dt,
               "source_counts": self.sources, "online_passes": self.online,
               "samples_per_s": self.samples / dt, "lr": lr}
        self._reset()
        return rec
