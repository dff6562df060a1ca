"""The sink: computed batches -> numpy shard buffers -> whole shards, written off the compute thread.

    ShardBegin, BatchDone..., ShardEnd  ->  ShardSink  ->  StoreWriter.write_shard (per store)

Stages talk through small frozen messages: `ShardBegin` (which shard, its writers, keys and
how to fetch its clean images), one `BatchDone` per computed batch, `ShardEnd`. The bytes
written depend only on the messages, not on which thread or process sent them.

Parts: every message names its `part`, one per attack of the stream (`compute.stream_shards`
decodes a shard's batch once and attacks it with every attack that lacks the shard, so the
attacks' batches arrive interleaved). The sink keeps one shard buffer per part: with K attacks,
at most K shards are open at once, one per attack, all of the same sample range (the stream
ends them all before it begins the next shard). The queue's byte bound holds the batches still
waiting, whichever part they belong to; the source files the parts' batches share count once.

Overlap: a single background thread, at a lower priority, waits for each batch's
device-to-host copy (started by the compute on a side stream), turns it into numpy and
writes each finished shard, so the next batch (and shard) is computed while the previous
one is copied, encoded and written (benchmarks/bench_precompute.py measures it against
writing in the computing thread). The clean images a wds store carries are the source's files
as the loader read them, handed over with each batch (`BatchDone.files`): each file is opened
once, whatever the attacks computed, not once more here (tests/precompute/test_precompute_reads_once.py
counts the opens; what that saves in I/O time, with the page cache between, is not measured).
A source held as pixels has no files: its pixels are fetched here (`ShardBegin.images`), not in
the thread that drives the device.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from enspipe.stores import StoreWriter

__all__ = ["BatchDone", "CleanImages", "ShardBegin", "ShardEnd", "ShardSink"]

WRITER_NICE = 10  # niceness of the background writer thread (see ShardSink._loop)
# At most about this many bytes of computed batches wait for the writer (the one bound: a count
# of batches would mean K times fewer decoded batches with K attacks): ~13 batches of 256 at
# 3x224x224, several shards' worth of decoupling, and the pinned host memory stays bounded. The
# bytes count each batch's directions, logits and labels and the source files riding with it (a
# wds store's: at 64 px a batch's JPEGs are ~2x its directions, at ImageNet's ~110 KB a JPEG). With several
# attacks the K batches of one decoded batch carry the same files (one list): they count once, with the first.
SINK_BYTES = 512 << 20


# pixels uint8 [n,C,H,W] of a source held as pixels: what a wds store keeps beside the directions
# (a source of files hands over the files themselves, with the batches).
CleanImages = Callable[[], np.ndarray]


@dataclass(frozen=True)
class ShardBegin:
    """A shard starts: its range, the writers that lack it, and what is stored beside the directions."""

    shard: int
    start: int
    stop: int
    writers: tuple[StoreWriter, ...]
    keys: Sequence[str]
    images: CleanImages | None       # for wds stores of a source held as pixels; called in the writer thread
    true_label: np.ndarray | None    # int64 [n], for wds stores only
    files: bool = False              # its batches carry each sample's file (`BatchDone.files`): the wds stores keep those
    part: int = 0                    # whose shard: one open shard buffer per part (an attack of the stream)


@dataclass(frozen=True)
class BatchDone:
    """A computed batch; its tensors may still be on their way to the host (`ready` waits for them)."""

    offset: int                      # first row of the batch inside its shard
    direction: torch.Tensor          # int8 [b, C, H, W] in {-1, 0, 1}
    logits: torch.Tensor             # float32 [b, K]
    labels: torch.Tensor             # int64 [b]: the label the attack used
    ready: Callable[[], None] | None = None  # blocks until the device-to-host copy is done
    files: Sequence[tuple[str, bytes]] | None = None  # each sample's file (extension, bytes), as the loader read it
    part: int = 0                    # the open shard it belongs to (`ShardBegin.part`)


@dataclass(frozen=True)
class ShardEnd:
    """Every batch of the shard was handed over: write it."""

    shard: int
    part: int = 0


Message = ShardBegin | BatchDone | ShardEnd


def _size(msg: Message, files_counted: bool = False) -> int:
    """The host bytes a message holds while it waits for the writer; `files_counted`: its files
    ride with an earlier batch already counted (another attack's batch of the same decoded batch)."""
    if not isinstance(msg, BatchDone):
        return 0
    return (msg.direction.nbytes + msg.logits.nbytes + msg.labels.nbytes
            + (0 if files_counted else sum(len(data) for _, data in msg.files or ())))


class _ShardBuffer:
    """The numpy arrays of the shard being assembled."""

    def __init__(self, begin: ShardBegin) -> None:
        n, w = begin.stop - begin.start, begin.writers[0]
        self.begin = begin
        self.direction = np.empty((n, *w.geometry), np.int8)
        self.logits = np.empty((n, w.num_classes), np.float16)
        self.label = np.empty((n,), np.int64)
        self.files: list[tuple[str, bytes] | None] | None = [None] * n if begin.files else None

    def add(self, batch: BatchDone) -> None:
        if batch.ready is not None:
            batch.ready()
        rows = slice(batch.offset, batch.offset + batch.direction.shape[0])
        self.direction[rows] = batch.direction.cpu().numpy()
        self.logits[rows] = batch.logits.float().cpu().numpy()  # float32 -> float16, nearest
        self.label[rows] = batch.labels.cpu().numpy()
        if self.files is not None:
            if batch.files is None or len(batch.files) != batch.direction.shape[0]:
                raise RuntimeError(f"shard sink: a batch of shard {self.begin.shard} came without its samples' files")
            self.files[rows] = batch.files

    def write(self) -> None:
        """The whole shard, to every store that lacks it."""
        b = self.begin
        pixels = files = None
        if b.files:
            files = self.files
        elif b.images is not None and any(w.keeps_clean_images for w in b.writers):
            pixels = b.images()
        for w in b.writers:
            keep = w.keeps_clean_images  # the format stores the clean image and true label beside d
            w.write_shard(b.shard, direction=self.direction, logits=self.logits, label=self.label,
                          keys=b.keys, images=pixels if keep else None, image_files=files if keep else None,
                          true_label=b.true_label if keep else None)


class ShardSink:
    """Turns computed batches into numpy shard buffers and writes whole shards.

    With `background=True` a single thread does this while the caller computes the next
    batch; the queue is bounded (`max_batches`, and `max_bytes` of the batches' tensors and
    files, `_size`; one batch is always let in), so a slow writer stalls the compute rather
    than memory filling up. The caller sees a writer error at its next call (or at `close`).
    """

    def __init__(self, *, background: bool, max_batches: int = 64, max_bytes: int = SINK_BYTES) -> None:
        # Each message queued with the bytes it was counted for (`_size`).
        self._queue: queue.Queue[tuple[Message, int] | None] | None = (queue.Queue(maxsize=max_batches)
                                                                      if background else None)
        self._max_bytes, self._queued = max_bytes, 0  # bytes handed over and not yet handled
        # The files of the last batch counted: the attacks' batches of one decoded batch share the list.
        # Held (not its id, which a new list may reuse); once the first is written the others' copy of
        # the files goes uncounted: at most one decoded batch's files under the bound.
        self._last_files: Sequence[tuple[str, bytes]] | None = None
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._bufs: dict[int, _ShardBuffer] = {}  # the open shard of each part (at most one per attack)
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
        files = msg.files if isinstance(msg, BatchDone) else None
        size = _size(msg, files_counted=files is not None and files is self._last_files)
        if files is not None:
            self._last_files = files
        with self._room:
            while self._queued and self._queued + size > self._max_bytes:
                self._room.wait(timeout=0.5)  # poll so a dead writer thread cannot block the producer forever
                self._raise()
            self._queued += size
        self._enqueue((msg, size))

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

    def _enqueue(self, item: tuple[Message, int] | None) -> None:
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
            msg, size = item
            if self._error is None:
                try:
                    self._handle(msg)
                except BaseException as e:  # handed to the producer, which raises it
                    self._error = e
            with self._room:
                self._queued -= size
                self._room.notify_all()

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, ShardBegin):
            if msg.part in self._bufs:
                raise RuntimeError(f"shard sink got the start of shard {msg.shard} inside shard "
                                   f"{self._bufs[msg.part].begin.shard} (part {msg.part})")
            self._bufs[msg.part] = _ShardBuffer(msg)
            return
        buf = self._bufs.get(msg.part)
        if buf is None:
            raise RuntimeError(f"shard sink got {type(msg).__name__} outside a shard (part {msg.part})")
        if isinstance(msg, BatchDone):
            buf.add(msg)
        else:
            del self._bufs[msg.part]
            if msg.shard != buf.begin.shard:
                raise RuntimeError(f"shard sink got the end of shard {msg.shard} inside shard {buf.begin.shard}")
            buf.write()
