"""Computing one shard: a batch source, the compute, and a sink that writes whole shards.

    batches (shard_batches) -> directions (compute_batch) -> ShardSink -> StoreWriter.write_shard

Stages talk through small frozen messages: `ShardBegin` (which shard, its writers, keys and
clean images), one `BatchDone` per computed batch, `ShardEnd`. Each stage can be replaced on
its own (a parallel decoder as the source, another precision in the compute) without
touching the bytes the sink writes.

Determinism: batches start at the shard's first sample and have `batch_size` samples (the
last one fewer), so a shard's directions do not depend on which process computed it or when.
On CPU the kernels give bit-identical results for any thread count (tests check this: a
2-worker run with one torch thread each equals the in-process run with two). Across GPU
models this is not guaranteed; a store records the device that started it.

Overlap: batches are computed in the calling thread; a single background thread, at a lower
priority, turns each finished batch into numpy and writes each finished shard, so the next
batch (and shard) is computed while the previous one is encoded and written
(benchmarks/bench_precompute.py measures it against writing in the computing thread). In a
dask task the shard is written before the task returns: a finished task is a durable shard.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from enspipe.errors import EnspipeError

from .plan import ShardJob, _open_inputs

if TYPE_CHECKING:
    import torch

    from enspipe.stores import StoreWriter

__all__ = [
    "BatchDone",
    "InputBatch",
    "ShardBegin",
    "ShardEnd",
    "ShardSink",
    "batch_containing",
    "compute_batch",
    "compute_shard",
    "run_in_process",
    "shard_batches",
    "shard_task",
]

WRITER_NICE = 10  # niceness of the background writer thread (see ShardSink._loop)


# --- Stage 1: the batch source ------------------------------------------------------------------

@dataclass(frozen=True)
class InputBatch:
    """One batch of a shard, ready for the model."""

    offset: int                  # first row of the batch inside its shard
    x: torch.Tensor              # float32 [b, C, H, W] in [0, 1], on the device
    y: torch.Tensor | None       # the true labels, when the attack uses them


def shard_batches(job: ShardJob, dataset, start: int, stop: int, pixels: np.ndarray,
                  device: torch.device) -> Iterator[InputBatch]:
    """The fixed batches of shard [start, stop), from its uint8 pixels read once per shard."""
    import torch

    for b in range(start, stop, job.batch_size):
        e = min(b + job.batch_size, stop)
        # The same conversion as SampleSource.images (uint8 / 255).
        x = torch.from_numpy(pixels[b - start:e - start]).to(torch.float32).div_(255).to(device)
        y = torch.from_numpy(dataset.labels[b:e]).to(device) if job.label == "true" else None
        yield InputBatch(b - start, x, y)


def batch_containing(i: int, *, shard_size: int, batch_size: int, num_samples: int) -> tuple[int, int]:
    """[start, stop) of the batch `shard_batches` puts sample i in (batches start at their shard's start)."""
    shard_start = i // shard_size * shard_size
    b = shard_start + (i - shard_start) // batch_size * batch_size
    return b, min(b + batch_size, shard_start + shard_size, num_samples)


# --- Stage 2: the compute -----------------------------------------------------------------------

@dataclass(frozen=True)
class BatchDone:
    """A computed batch, still on the device (the sink moves it to numpy off the compute thread)."""

    offset: int                  # first row of the batch inside its shard
    direction: torch.Tensor      # int8 [b, C, H, W] in {-1, 0, 1}
    logits: torch.Tensor         # float32 [b, K]
    labels: torch.Tensor         # int64 [b]: the label the attack used


def compute_batch(model: torch.nn.Module, batch: InputBatch, job: ShardJob) -> BatchDone:
    """The attack's direction, logits and label of one batch."""
    from enspipe import attacks

    d, logits, labels = attacks.direction(model, batch.x, batch.y, attack=job.attack, label=job.label)
    return BatchDone(batch.offset, d, logits, labels)


# --- Stage 3: the sink ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardBegin:
    """A shard starts: its range, the writers that lack it, and what is stored beside the directions."""

    shard: int
    start: int
    stop: int
    writers: tuple[StoreWriter, ...]
    keys: Sequence[str]
    images: np.ndarray | None        # uint8 [n, C, H, W], for wds stores only
    true_label: np.ndarray | None    # int64 [n], for wds stores only


@dataclass(frozen=True)
class ShardEnd:
    """Every batch of the shard was handed over: write it."""

    shard: int


Message = ShardBegin | BatchDone | ShardEnd


class _ShardBuffer:
    """The numpy arrays of the shard being assembled."""

    def __init__(self, begin: ShardBegin) -> None:
        n, w = begin.stop - begin.start, begin.writers[0]
        self.begin = begin
        self.direction = np.empty((n, *w.geometry), np.int8)
        self.logits = np.empty((n, w.num_classes), np.float16)
        self.label = np.empty((n,), np.int64)

    def add(self, batch: BatchDone) -> None:
        rows = slice(batch.offset, batch.offset + batch.direction.shape[0])
        self.direction[rows] = batch.direction.cpu().numpy()
        self.logits[rows] = batch.logits.float().cpu().numpy()  # float32 -> float16, nearest
        self.label[rows] = batch.labels.cpu().numpy()

    def write(self) -> None:
        """The whole shard, to every store that lacks it."""
        b = self.begin
        for w in b.writers:
            wds = w.fmt == "wds"  # wds keeps the clean image and true label beside d
            w.write_shard(b.shard, direction=self.direction, logits=self.logits, label=self.label,
                          keys=b.keys, images=b.images if wds else None,
                          true_label=b.true_label if wds else None)


class ShardSink:
    """Turns computed batches into numpy shard buffers and writes whole shards.

    With `background=True` a single thread does this while the caller computes the next
    batch; the queue is bounded, so at most about two shards are held in memory. The
    caller sees a writer error at its next call (or at `close`).
    """

    def __init__(self, *, background: bool, max_batches: int = 64) -> None:
        self._queue: queue.Queue[Message | None] | None = queue.Queue(maxsize=max_batches) if background else None
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._buf: _ShardBuffer | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="enspipe-shard-writer", daemon=True)
            self._thread.start()

    # producer side
    def put(self, msg: Message) -> None:
        """Hand over the next message; raises a writer error from an earlier one."""
        self._raise()
        if self._queue is None:
            self._handle(msg)
            return
        self._enqueue(msg)

    def close(self) -> None:
        """Wait until everything handed over is written; re-raise a writer error."""
        if self._thread is not None:
            self._raise()
            self._enqueue(None)
            self._thread.join()
            self._thread = None
        self._raise()

    def abort(self) -> None:
        """Stop without writing what is still queued (the caller failed)."""
        self._abort.set()
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._thread.join(timeout=60)
            self._thread = None

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _enqueue(self, item: Message | None) -> None:
        while True:  # poll so a dead writer thread cannot block the producer forever
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # consumer side
    def _loop(self) -> None:
        # Lower this thread's priority (Linux: per thread): the writer should fill the gaps in
        # the compute, not preempt torch's threads, whose parallel regions all wait for the
        # slowest one. If it falls behind, the bounded queue stalls the compute and it runs.
        # Measured on 2 cores: faster than both writing inline and an equal-priority thread.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        while True:
            item = self._queue.get()
            if item is None or self._abort.is_set():
                return
            if self._error is None:
                try:
                    self._handle(item)
                except BaseException as e:  # handed to the producer, which raises it
                    self._error = e

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, ShardBegin):
            self._buf = _ShardBuffer(msg)
            return
        if self._buf is None:
            raise RuntimeError(f"shard sink got {type(msg).__name__} outside a shard")
        if isinstance(msg, BatchDone):
            self._buf.add(msg)
        else:
            buf, self._buf = self._buf, None
            if msg.shard != buf.begin.shard:
                raise RuntimeError(f"shard sink got the end of shard {msg.shard} inside shard {buf.begin.shard}")
            buf.write()


# --- One shard, start to end --------------------------------------------------------------------

def compute_shard(job: ShardJob, s: int, sink: ShardSink, device: torch.device) -> None:
    """Compute shard s of every store in job that lacks it and hand it to the sink."""
    from enspipe.stores import open_writer

    dataset, model, sha = _open_inputs(job.model, job.weights, job.pretrained, job.dataset, job.split,
                                       job.limit, job.data_root, device, job.image_size)
    if dataset.fingerprint != job.fingerprint or sha != job.weights_sha256:
        what = "dataset" if dataset.fingerprint != job.fingerprint else "model weights"
        raise EnspipeError(f"a worker sees other {what} than the client ({job.dataset} / {job.model}); "
                           "every worker needs the same files at the same paths")
    # Writers are reopened per shard (a manifest read): cheap, and never stale.
    writers = tuple(w for w in (open_writer(p) for p in job.stores) if not w.shard_done(s))
    if not writers:  # a retried or duplicated task whose shard is already written
        return
    start, stop = writers[0].shard_range(s)
    pixels = dataset.images_uint8(slice(start, stop))
    wants_images = any(w.fmt == "wds" for w in writers)  # wds keeps the clean image beside d
    sink.put(ShardBegin(s, start, stop, writers, keys=dataset.keys[start:stop],
                        images=pixels if wants_images else None,
                        true_label=dataset.labels[start:stop] if wants_images else None))
    for batch in shard_batches(job, dataset, start, stop, pixels, device):
        sink.put(compute_batch(model, batch, job))
    sink.put(ShardEnd(s))


@contextlib.contextmanager
def _deterministic(threads: int | None = None) -> Iterator[None]:
    """Deterministic kernels (and a thread count) for the duration; restored afterwards."""
    import torch

    # cuBLAS needs this before its first use to be deterministic; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    fill = torch.utils.deterministic
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.get_num_threads(), fill.fill_uninitialized_memory)
    # warn_only: an op without a deterministic kernel warns instead of failing the store.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also NaN-fills every torch.empty (~10% of a CPU step, profiled);
    # that only guards against reading uninitialized memory, which no kernel here does.
    fill.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.set_num_threads(saved[3])
        fill.fill_uninitialized_memory = saved[4]


def run_in_process(units: list[tuple[ShardJob, int]], *, overlap: bool) -> None:
    """Every (job, shard) in this process, writing in a background thread unless `overlap=False`."""
    import torch

    from enspipe.runtime import progress

    with _deterministic(), ShardSink(background=overlap) as sink:
        bar = progress(units, total=len(units), desc="precompute", unit="shard")
        for job, s in bar:
            compute_shard(job, s, sink, torch.device(job.device))


def shard_task(job: ShardJob, s: int) -> int:
    """One dask task: compute and write shard s, returning only once it is written."""
    from enspipe.runtime import resolve_device

    with _deterministic(job.torch_threads), ShardSink(background=True) as sink:
        compute_shard(job, s, sink, resolve_device(job.device))
    return s
