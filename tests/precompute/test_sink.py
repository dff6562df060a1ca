"""The shard sink's queue is bounded in bytes, the source files riding with each batch included: a
slow writer stalls the compute before those bytes pile up (a wds store keeping ImageNet's JPEGs at a
small image size: the files are most of a batch's bytes, which a count of batches sized by the
directions alone let through 64 at a time). The oracle: the sizes, computed here from the messages."""
from __future__ import annotations

import threading
import time

import numpy as np
import torch

from enspipe.precompute.sink import BatchDone, ShardBegin, ShardEnd, ShardSink

FILE = 400  # bytes of each batch's one file; with its tensors (4 + 8 + 8 bytes) a batch holds 420


class _Writer:
    """Records what the sink writes (the store itself is tested in tests/stores/)."""

    geometry, num_classes, keeps_clean_images = (1, 2, 2), 2, True

    def __init__(self) -> None:
        self.shards: list[dict] = []

    def write_shard(self, s: int, **parts) -> None:
        self.shards.append({"shard": s, **parts})


def _batch(k: int, ready=None) -> BatchDone:
    return BatchDone(k, torch.full((1, 1, 2, 2), k, dtype=torch.int8), torch.zeros(1, 2), torch.tensor([k]),
                     ready, [("jpeg", bytes([k]) * FILE)])


def _begin(writer: _Writer, n: int) -> ShardBegin:
    return ShardBegin(0, 0, n, (writer,), keys=[str(k) for k in range(n)], images=None,
                      true_label=np.arange(n), files=True)


def test_a_slow_writer_stalls_the_producer_once_the_queued_bytes_pass_the_limit():
    writer, gate, n = _Writer(), threading.Event(), 5
    sink = ShardSink(background=True, max_batches=64, max_bytes=1000)
    put = []

    def produce() -> None:
        sink.put(_begin(writer, n))
        for k in range(n):
            # The writer thread takes the first batch and waits in it: its 420 bytes stay counted.
            sink.put(_batch(k, gate.wait if k == 0 else None))
            put.append(k)
        sink.put(ShardEnd(0))

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    deadline = time.monotonic() + 120
    while len(put) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    producer.join(timeout=1.0)
    # 420 + 420 <= 1000 < 3 * 420: the third batch waits for the writer (64 would fit by count).
    assert producer.is_alive() and put == [0, 1]
    gate.set()
    producer.join(timeout=120)
    sink.close()
    assert put == list(range(n))
    (shard,) = writer.shards
    assert shard["image_files"] == [("jpeg", bytes([k]) * FILE) for k in range(n)]
    assert shard["direction"][:, 0, 0, 0].tolist() == list(range(n))


def test_a_batch_above_the_limit_alone_still_goes_through():
    writer = _Writer()
    with ShardSink(background=True, max_bytes=10) as sink:  # each batch is 42x the limit
        sink.put(_begin(writer, 3))
        for k in range(3):
            sink.put(_batch(k))
        sink.put(ShardEnd(0))
    assert [e for e, _ in writer.shards[0]["image_files"]] == ["jpeg"] * 3


def test_files_shared_by_the_attacks_batches_count_once():
    """Two attacks (parts) of one decoded batch carry the same list of files: the queue counts its
    bytes with the first batch only (420 + 20 per decoded batch, not 2 x 420). The writer is held in
    the first batch, so nothing queued is handled yet."""
    writers, gate = (_Writer(), _Writer()), threading.Event()
    sink = ShardSink(background=True, max_batches=64, max_bytes=10_000)
    for part, w in enumerate(writers):
        sink.put(ShardBegin(0, 0, 2, (w,), keys=["0", "1"], images=None, true_label=np.arange(2), files=True,
                            part=part))
    for k in range(2):
        files = [("jpeg", bytes([k]) * FILE)]  # one decoded batch's files, shared by both attacks' batches
        for part in (0, 1):
            sink.put(BatchDone(k, torch.full((1, 1, 2, 2), k - part, dtype=torch.int8), torch.zeros(1, 2),
                               torch.tensor([k]), gate.wait if k == part == 0 else None, files, part))
    assert sink._queued == 2 * (420 + 20)
    gate.set()
    for part in (0, 1):
        sink.put(ShardEnd(0, part=part))
    sink.close()
    assert sink._queued == 0
    for part, w in enumerate(writers):
        (shard,) = w.shards
        assert shard["image_files"] == [("jpeg", bytes([k]) * FILE) for k in range(2)]
        assert shard["direction"][:, 0, 0, 0].tolist() == [-part, 1 - part]
