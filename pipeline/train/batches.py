"""The trainer's batches: the `BatchStream` a TrainConfig asks for, the DataLoader that reads it,
and how a batch becomes the inputs the step trains on (`adversarial_inputs`); with the types of
train()'s seams (where batches come from, how they become inputs, who hears the metrics)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from enspipe import attacks
from enspipe.configs.train import TrainConfig
from enspipe.data import SampleSource
from enspipe.data.decode import device_decoder
from enspipe.precision import Precision
from enspipe.stores import StoreReader
from enspipe.stream import SELF, SourceBatches
from enspipe.util.runtime import resolve_device

__all__ = ["AdversarialFn", "BatchStream", "MetricsFn", "StreamFactory", "adversarial_inputs", "batch_loader",
           "batch_stream", "block_ranges"]


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

    def _source_batch(self, source: int, part: dict[str, np.ndarray], rng: np.random.Generator,
                      **kw: Any) -> dict[str, Any]:
        batch = super()._source_batch(source, part, rng, **kw)
        n_adv = self.adv_rows(len(batch["index"]))
        batch["n_adv"] = n_adv
        batch["eps"] = torch.from_numpy(_draw_eps(rng, n_adv, self.cfg.eps, self.cfg.eps_dist))
        return batch


def adversarial_inputs(model: torch.nn.Module, batch: dict[str, Any], cfg: TrainConfig,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The inputs the step trains on: the first n_adv samples replaced by x_adv.

    Returns (x, y, online) where `online` says whether the model itself was attacked."""
    precision = Precision.resolve(cfg.precision, device)  # cached: the same object every batch
    if isinstance(batch["x"], torch.Tensor):
        x = batch["x"].to(device, non_blocking=True)
    else:  # encoded files (`decoder` on the device: enspipe.train.device_batches)
        from enspipe.train.device_batches import clean_images

        x = clean_images(batch["x"], device, batch.get("aug"), cfg.crop_padding)
    x = precision.memory_format(x.float().div_(255.0))
    y = batch["y"].to(device, non_blocking=True)
    n_adv = batch["n_adv"]
    if n_adv == 0:
        return x, y, False
    eps = batch["eps"].to(device, non_blocking=True)
    if batch["source"] == SELF:
        # Online pass on the model being trained, in its training mode as the reference
        # code did (B's input dropout then diversifies the perturbations, Appendix C.2).
        d, _, _ = attacks.direction(precision.wrap(model), x[:n_adv], attack=cfg.attack, label="pred")
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
                 world: int = 1, *, stores: Sequence[StoreReader] | None = None,
                 decoder: str | None = None) -> BatchStream:
    """train()'s default StreamFactory: the BatchStream over `cfg.shards` (or over `stores`, the
    run's open readers of them, as train() passes). Under DDP every rank must take the same
    number of steps, so only full batches are yielded there. `decoder`: the run's resolved decoder
    (train() passes the one config.json records), else `cfg.decoder` resolved here."""
    cls = BatchStream
    if decoder is None:
        decoder = device_decoder(cfg.decoder, resolve_device(cfg.device), dataset)
    if decoder != "cpu":
        from enspipe.train.device_batches import DeviceDecodedBatchStream as cls  # JPEGs decoded in the step
    return cls(dataset, cfg.shards if stores is None else tuple(stores), cfg, epoch=epoch, rank=rank,
               world_size=world, full_batches_only=world > 1)


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
