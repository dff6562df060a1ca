"""The training loop's machinery, kept out of `enspipe.train` so the loop stays one visible loop:
epochs of batches from loader workers that live for the whole run, running metrics kept on
the device, checkpoints written in the background, the held-out validation.
"""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from enspipe.util.errors import EnspipeError
from enspipe.precision import Precision

__all__ = ["CheckpointWriter", "EpochChain", "FrozenModel", "Validation", "Window", "epoch_batches", "prune_checkpoints",
           "snapshot", "validate"]


# --- epochs of batches ----------------------------------------------------------------------

class EpochChain(torch.utils.data.IterableDataset):
    """Several epochs' streams as one, so one set of loader workers serves the whole run and
    starts reading the next epoch while the current one ends (no idle GPU at the boundary).

    Each batch is tagged with its epoch, its worker and its number within that worker's epoch,
    and each worker ends each epoch with a marker holding its batch count: `epoch_batches`
    puts the batches back in the order a fresh per-epoch loader would give them."""

    def __init__(self, streams: Sequence[torch.utils.data.IterableDataset], first_epoch: int):
        self.streams, self.first_epoch = list(streams), first_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        for k, stream in enumerate(self.streams):
            e, n = self.first_epoch + k, 0
            for batch in stream:
                # A stream that numbers its batches (SourceBatches' `seq`, the same whatever the
                # worker count) is put back in that order; any other in the DataLoader's.
                yield {**batch, "_epoch": e, "_worker": wid, "_seq": batch.get("seq", n), "_numbered": "seq" in batch}
                n += 1
            yield {"_epoch": e, "_worker": wid, "_end": n}


class _Reorder:
    """Takes a tagged multi-epoch stream apart into epochs, each in canonical order: the batches'
    own numbers where the stream gives them (`seq`), else round robin over the workers by batch
    number, skipping a worker once its epoch is done (a DataLoader's order). Batches that arrive
    early (a fast worker already in the next epoch or window) wait here."""

    def __init__(self, it: Iterator[dict[str, Any]], workers: int):
        self.it, self.workers = it, workers
        self.pending: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.ends: dict[tuple[int, int], int] = {}
        self.numbered: set[int] = set()  # epochs whose batches carry their own numbers

    def _first(self, e: int) -> bool:
        """Pull until the epoch's first item is here (a batch, or every worker's end), so the
        epoch is known to be numbered or not."""
        while not any(k[0] == e for k in self.pending) and not self._ended(e):
            self._pull()
        return e in self.numbered

    def _pull(self) -> None:
        item = next(self.it, None)
        if item is None:
            raise EnspipeError("the data loader ended before its epochs did (a loader worker died?)")
        e, w = item.pop("_epoch"), item.pop("_worker")
        if "_end" in item:
            self.ends[(e, w)] = item["_end"]
        elif item.pop("_numbered"):
            self.numbered.add(e)
            self.pending[(e, item.pop("_seq"), 0)] = item
        else:
            self.pending[(e, item.pop("_seq"), w)] = item

    def epoch(self, e: int, limit: int | None) -> Iterator[dict[str, Any]]:
        """The epoch's batches: in their own order where the stream numbers them (`seq`: the
        same batches in the same order whatever the worker count), else the DataLoader's."""
        yield from (self._numbered(e, limit) if self._first(e) else self._round_robin(e, limit))

    def _ended(self, e: int) -> bool:
        return all((e, w) in self.ends for w in range(self.workers))

    def _numbered(self, e: int, limit: int | None) -> Iterator[dict[str, Any]]:
        taken, seq = 0, 0
        while True:
            while (e, seq, 0) not in self.pending and not self._ended(e):
                self._pull()
            batch = self.pending.pop((e, seq, 0), None)
            if batch is None:
                break
            seq += 1
            if limit is None or taken < limit:  # DDP: every rank takes the same count
                taken += 1
                yield batch
        for w in range(self.workers):
            self.ends.pop((e, w), None)
        self.numbered.discard(e)

    def _round_robin(self, e: int, limit: int | None) -> Iterator[dict[str, Any]]:
        taken, seq = 0, 0
        while True:
            live = False
            for w in range(self.workers):
                key = (e, seq, w)
                while key not in self.pending and self.ends.get((e, w), seq + 1) > seq:
                    self._pull()
                if key in self.pending:
                    live = True
                    batch = self.pending.pop(key)
                    if limit is None or taken < limit:  # DDP: every rank takes the same count
                        taken += 1
                        yield batch
            if not live:
                break
            seq += 1
        for w in range(self.workers):
            self.ends.pop((e, w), None)


def epoch_batches(make_stream: Callable[[int], torch.utils.data.IterableDataset],
                  make_loader: Callable[[torch.utils.data.IterableDataset], torch.utils.data.DataLoader],
                  epochs: range, workers: int, limit: int | None = None) -> Iterator[tuple[int, Iterator[dict[str, Any]]]]:
    """(epoch, its batches) for every epoch of `epochs`; consume each epoch's batches in full.

    Without workers an epoch's stream is made when the epoch starts and read in this process.
    With workers, every epoch's stream is made up front and the loader's workers read them in
    turn for the whole run; each epoch's order is the one a fresh loader would give, so a run
    resumed at an epoch replays exactly the batches of the uninterrupted run."""
    if workers == 0:
        for e in epochs:
            batches = iter(make_loader(make_stream(e)))
            yield e, (b for i, b in enumerate(batches) if limit is None or i < limit)
        return
    chain = EpochChain([make_stream(e) for e in epochs], epochs.start)
    reorder = _Reorder(iter(make_loader(chain)), workers)
    for e in epochs:
        yield e, reorder.epoch(e, limit)


# --- running metrics ------------------------------------------------------------------------

class Window:
    """Running metrics between two log lines, accumulated on the device: loss, accuracy and
    the first non-finite loss are read (one host synchronisation) only when a line is written."""

    def __init__(self, nsources: int, device: torch.device):
        self.nsources, self.device = nsources, device
        self.boundary: float | None = None  # seconds from the previous epoch's last step to this one's first
        self._reset()

    def _reset(self) -> None:
        self.t0, self.batches, self.samples, self.wait = time.perf_counter(), 0, 0, 0.0
        # loss sum, correct count, step of the first non-finite loss (-1: none), that loss
        self.acc = torch.tensor([0.0, 0.0, -1.0, 0.0], device=self.device)
        self.online = 0
        self.sources = [0] * self.nsources

    def add(self, batch: dict[str, Any], loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
            online: bool, step: int) -> None:
        n = len(y)
        loss = loss.detach().float()
        first = (~torch.isfinite(loss)) & (self.acc[2] < 0)
        self.acc += torch.stack([loss * n, (logits.argmax(1) == y).sum().float(),
                                 torch.where(first, step + 1.0, 0.0), torch.where(first, loss, 0.0)])
        self.batches += 1
        self.samples += n
        self.online += int(online)
        if batch["n_adv"]:
            self.sources[batch["source"]] += 1

    def flush(self, epoch: int, step: int, lr: float) -> dict[str, Any]:
        loss, correct, bad_step, bad_loss = self.acc.tolist()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rec = {"kind": "train", "epoch": epoch + 1, "step": step, "loss": loss / max(self.samples, 1),
               "accuracy": correct / max(self.samples, 1), "batches": self.batches,
               "samples": self.samples, "seconds": dt,
               "source_counts": self.sources, "online_passes": self.online,
               "samples_per_s": self.samples / dt, "lr": lr, "wait_s": round(self.wait, 6)}
        if self.boundary is not None:
            rec["boundary_s"], self.boundary = round(self.boundary, 6), None
        if bad_step >= 0:
            rec["nonfinite"] = {"step": int(bad_step), "loss": bad_loss}
        self._reset()
        return rec


# --- checkpoints ----------------------------------------------------------------------------

def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def snapshot(obj: Any) -> Any:
    """A deep CPU copy of a state (dicts, lists, tensors): what a checkpoint keeps of this
    moment while training goes on changing the live tensors."""
    return _to_cpu(obj)


class FrozenModel:
    """What `save_model` reads of a model (state_dict, config, provenance), frozen at a moment."""

    def __init__(self, model: Any):
        self.config, self.provenance = model.config, dict(model.provenance)
        self._state = snapshot(model.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time, so the next epoch starts while
    the last one is saved (a ResNet-50 with Adam is ~300 MB: about a second of disk writes at
    every boundary otherwise). A file appears whole (atomic rename) or not at all, so a kill
    mid-write resumes from the checkpoint before. `wait()` re-raises a failed write."""

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if not self.background:
            job()
            return

        def run() -> None:
            try:
                job()
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="enspipe-checkpoint", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Let a write in progress finish (its file stays valid) without raising: for the way
        out of a run that already failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def prune_checkpoints(checkpoints: list[Path], keep: int | None) -> None:
    """Delete all but the last `keep` epoch checkpoints (the last one is what --resume reads)."""
    if keep is None:
        return
    for old in checkpoints[:-keep]:
        old.unlink(missing_ok=True)


# --- held-out validation ------------------------------------------------------------------

def validate(model: torch.nn.Module, data: Any, *, eps: float, device: torch.device, batch_size: int = 256,
             precision: Precision | None = None, loader: Any = None) -> dict[str, Any]:
    """Clean and white-box FGSM error (true labels, as `evaluate`) of `model` on `data`, in eval
    mode, its forward passes at the run's `precision` (default fp32); the model's mode is
    restored. No random numbers are drawn, so training is unchanged. The images are decoded by
    `loader` (a `data.loader.open_loader` kept for the run: `Validation`), else with PIL in this process."""
    from enspipe import attacks
    from enspipe.data.loader import batches

    was_training = model.training
    model.eval()
    net = precision.wrap(model) if precision is not None else model
    t0 = time.perf_counter()
    wrong = torch.zeros(2, device=device)
    try:
        with contextlib.closing(batches(data, batch_size, device, loader=loader)) as stream:
            for _, x, y in stream:
                with torch.no_grad():
                    clean = net(x).argmax(1) != y
                x_adv = attacks.fgsm(net, x, y, eps=eps)
                with torch.no_grad():
                    adv = net(x_adv).argmax(1) != y
                wrong += torch.stack([clean.sum(), adv.sum()]).float()
    finally:
        model.train(was_training)
    clean_wrong, adv_wrong = wrong.tolist()
    n = len(data)
    return {"n": n, "eps": eps, "clean_error": clean_wrong / max(n, 1), "fgsm_error": adv_wrong / max(n, 1),
            "seconds": time.perf_counter() - t0}


class Validation:
    """A run's held-out validation, once per epoch: `validate` with the run's loader workers and
    decoder (resolved: the run's record), whose processes are forked here, once, and kept until
    `close` (forking them again every epoch would cost a fork per worker and their first chunks'
    latency, each time). Made before the training loader starts its workers and threads, so its
    fork copies none of them. Without workers it decodes in this process, as `validate` does."""

    def __init__(self, data: Any, *, eps: float, device: torch.device, precision: Precision | None = None,
                 workers: int = 0, decoder: str = "cpu", batch_size: int = 256):
        from enspipe.data.loader import open_loader

        self.data, self.eps, self.device, self.precision, self.batch_size = data, eps, device, precision, batch_size
        self._loader: Any = open_loader(data, device, workers=workers, decoder=decoder)

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        return validate(model, self.data, eps=self.eps, device=self.device, batch_size=self.batch_size,
                        precision=self.precision, loader=self._loader)

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None
