"""Computing shards: a stream of decoded batches -> the attack on the device -> the sink.

    ChunkLoader (worker processes) -> batch_to_device -> compute_batches (attacks.directions) -> host copy -> ShardSink

Each sample's file is read and decoded once, however many attacks are computed: a shard's
batches are decoded once and each is attacked by every attack (job) that lacks the shard, in
turn, into that attack's own part of the sink (`stream_shards`). Where a wds store keeps the
source's files beside its directions, the loader's workers hand over the bytes they read with
the pixels (or with the JPEG bytes the device decodes), and the sink writes those (see `open_loader`).

`stream_shards` is the one data path, in-process and inside every dask worker: the pixels
of all the shards it is given are decoded ahead, once per shard whatever the attacks, by the loader's processes (the process that
drives the device never decodes), copied to the device from pinned memory without blocking,
attacked there (the sign narrowed to int8 on the device), and copied back on a side stream
while the next batch computes; the sink's thread waits for each copy and writes whole shards.

Determinism: batches start at the shard's first sample and have `batch_size` samples (the
last one fewer), so a shard's directions do not depend on which process computed it, how
its pixels were decoded, or when, nor on which other attacks shared the decode (each attack
gets the same batch tensor, which no attack modifies; tests/precompute/test_precompute_decodes_once.py
compares a two-attack run's stores with two one-attack runs' file by file). On CPU the kernels give bit-identical results for any
thread count (tests check this: a 2-worker run with one torch thread each equals the
in-process run with two). Across GPU models this is not guaranteed; a store records the
device that started it. bf16 (autocast; channels_last on CUDA) gives other directions than
fp32, so it is part of the store identity; for one precision and device a resumed store
is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from enspipe.data.loader import (ChunkLoader, batch_spans, batch_to_device, chunk_size, gather, needs_decoding,
                                  open_loader, spans_of)
from enspipe.util.errors import EnspipeError
from enspipe.precision import Precision

from .plan import ShardJob, _open_inputs
from .sink import BatchDone, ShardBegin, ShardEnd, ShardSink

if TYPE_CHECKING:
    import torch

__all__ = [
    "InputBatch",
    "batch_containing",
    "compute_batches",
    "compute_shard",
    "run_in_process",
    "shard_task",
    "stream_shards",
    "stream_task",
]


@dataclass(frozen=True)
class InputBatch:
    """One batch of a shard, ready for the model."""

    offset: int                  # first row of the batch inside its shard
    x: torch.Tensor              # float32 [b, C, H, W] in [0, 1], on the device
    y: torch.Tensor | None       # the true labels, when the attack uses them


def batch_containing(i: int, *, shard_size: int, batch_size: int, num_samples: int) -> tuple[int, int]:
    """[start, stop) of the batch precompute puts sample i in (batches start at their shard's start)."""
    shard_start = i // shard_size * shard_size
    b = shard_start + (i - shard_start) // batch_size * batch_size
    return b, min(b + batch_size, shard_start + shard_size, num_samples)


# --- The compute ------------------------------------------------------------------------------------

class _HostCopy:
    """Starts each result's copy to pinned host memory on a side stream (CUDA); the sink's thread
    waits for it. On the CPU the results are already on the host."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, *tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Callable[[], None] | None]:
        import torch

        if self.stream is None:
            return tensors, None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in tensors)
            done = torch.cuda.Event()
            done.record(self.stream)
        for t in tensors:  # the compute stream's allocator must not reuse them before the copy ends
            t.record_stream(self.stream)
        return host, done.synchronize


Files = Sequence[tuple[str, bytes]]  # each sample's file (extension, bytes) as the loader read it, for a wds store


def compute_batches(model: torch.nn.Module, batch: InputBatch, jobs: Sequence[tuple[ShardJob, Files | None, int]],
                    precision: Precision, host_copy: Callable | None = None) -> list[BatchDone]:
    """Each job's (attack's) direction (int8, on the device), logits and labels of one batch, as the
    sink's `BatchDone` with the files the job's stores keep and its part; `jobs`: (job, files, part).
    One precision and label rule (the stream's); one forward pass for all (`attacks.directions`,
    bit-identical to one forward per attack)."""
    from enspipe import attacks

    out: list[BatchDone] = []
    copied: dict[int, torch.Tensor] = {}  # the attacks share one forward's logits: copied to the host once
    for (_, files, part), (d, logits, labels) in zip(jobs, attacks.directions(
            model, batch.x, batch.y, attacks=[job.attack for job, _, _ in jobs], label=jobs[0][0].label,
            autocast=precision.autocast_dtype), strict=True):
        ready = None
        if host_copy is not None:
            if id(logits) in copied:
                (d, labels), ready = host_copy(d, labels)
                logits = copied[id(logits)]
            else:
                key = id(logits)
                (d, logits, labels), ready = host_copy(d, logits, labels)
                copied[key] = logits
        out.append(BatchDone(batch.offset, d, logits, labels, ready, files, part))
    return out


# (job, shard, the job's writers that lack the shard, whether they keep the clean images + true
# labels, whether those are the source's files the loader carries)
_Member = tuple[ShardJob, int, tuple, bool, bool]


# --- The stream -------------------------------------------------------------------------------------

def _inputs(job: ShardJob, device: torch.device):
    """(dataset, model, sha256) of the job in this process (cached), checked against the client's."""
    dataset, model, sha = _open_inputs(job.model, job.weights, job.pretrained, job.dataset, job.split,
                                       job.limit, job.data_root, device, job.image_size)
    if dataset.fingerprint != job.fingerprint or sha != job.weights_sha256:
        what = "dataset" if dataset.fingerprint != job.fingerprint else "model weights"
        raise EnspipeError(f"a worker sees other {what} than the client ({job.dataset} / {job.model}); "
                           "every worker needs the same files at the same paths")
    return dataset, model, sha


def _clean_pixels(dataset, start: int, stop: int):
    """What a wds store keeps of shard [start, stop)'s images when the source holds pixels, not files."""
    return lambda: dataset.images_uint8(slice(start, stop))


def stream_shards(units: Sequence[tuple[ShardJob, int]], sink: ShardSink, device: torch.device, *,
                  loader_for: Callable[[bool], ChunkLoader] | None = None,
                  done: Callable[[int], None] | None = None) -> None:
    """Compute every (job, shard) into the sink, each shard's pixels decoded once for all the jobs
    (attacks) that lack it, ahead of use by `loader_for(files)` (a ChunkLoader over the jobs' dataset
    whose chunks carry each sample's file when `files`; by default `data.loader.open_loader`'s, made
    and closed here). Shards go in the order of their first unit; `done(1)` per (job, shard) written."""
    import torch

    from enspipe.stores import open_writer

    if not units:
        return
    first = units[0][0]
    # Jobs of one precompute share the precision and label rule (plan.plan_stores): one forward pass
    # serves all the attacks of a batch (`attacks.directions`).
    if any((job.precision, job.label) != (first.precision, first.label) for job, _ in units):
        raise ValueError("stream_shards: the jobs of one stream share a precision and a label rule")
    dataset, model, _ = _inputs(first, device)
    # One writer per store and stream (a manifest read each); whether a shard is done is read
    # from its completion record now, so a retried or duplicated dask task skips what is written.
    opened = {p: open_writer(p) for job, _ in units for p in job.stores}
    # A group: the jobs lacking one sample range, cut into the same batches: decoded once, each
    # batch attacked by every job of the group in turn. Jobs of one precompute share the dataset,
    # model, precision and decoder (plan.plan_stores); the batch size differs only where a resumed
    # store keeps the size it was started with: those shards decode once per batch size.
    groups: dict[tuple[int, int, int], list[_Member]] = {}
    for job, s in units:
        writers = tuple(w for w in (opened[p] for p in job.stores) if not w.shard_done(s))
        if writers:
            keep = any(w.keeps_clean_images for w in writers)  # a format that stores the clean image + true label
            # The jobs whose wds stores keep the source's files get them from the loader, read once.
            carries = keep and job.wds_images == "source" and needs_decoding(dataset)
            groups.setdefault((*writers[0].shard_range(s), job.batch_size), []).append((job, s, writers, keep, carries))
    if not groups:
        return
    files = any(m[4] for members in groups.values() for m in members)
    with contextlib.ExitStack() as stack:
        if loader_for is None:
            loader = stack.enter_context(_open_loader(dataset, units[0][0], device, files))
        else:
            loader = loader_for(files)
        batches = {key: batch_spans(key[0], key[1], key[2]) for key in groups}  # (start, stop, batch size)
        chunk = chunk_size(units[0][0].batch_size, loader.workers)
        chunks = loader([span for spans in batches.values() for span in spans_of(spans, chunk)])
        host_copy = _HostCopy(device)
        # Resolved once per stream (a store's bytes need the device's native kernels: strict).
        precision = Precision.resolve(first.precision, device, strict=True)
        precision.prepare_model(model)
        for key, members in groups.items():
            start, stop = key[:2]
            # The k-th job of a group sends its shard to the sink as part k: one shard buffer open per
            # job, all ended before the next group begins.
            for k, (job, s, writers, keep, carries) in enumerate(members):
                sink.put(ShardBegin(s, start, stop, writers, keys=dataset.keys[start:stop],
                                    images=_clean_pixels(dataset, start, stop)
                                    if keep and job.wds_images == "source" and not carries else None,
                                    true_label=dataset.labels[start:stop] if keep else None,
                                    files=carries, part=k))
            for b, e in batches[key]:
                got = gather(chunks, e - b)
                pixels = batch_to_device(got, device, dataset)  # decoded once, for every job of the group
                kept = [f for c in got for f in c.files] if files else None
                y = torch.from_numpy(dataset.labels[b:e]).to(device) if first.label == "true" else None
                batch = InputBatch(b - start, precision.memory_format(pixels), y)
                todo = [(m[0], kept if m[4] else None, k) for k, m in enumerate(members)]
                for done_batch in compute_batches(model, batch, todo, precision, host_copy):
                    sink.put(done_batch)
            for k, (_, s, *_rest) in enumerate(members):
                sink.put(ShardEnd(s, part=k))
                if done is not None:
                    done(1)


def _open_loader(dataset, job: ShardJob, device: torch.device, files: bool) -> ChunkLoader:
    """`job`'s loader: its loader workers, or every core of its torch threads but two (one for the
    process that drives the device, one for the sink's thread, `default_workers`)."""
    return open_loader(dataset, device, workers=job.loader_workers, decoder=job.decoder, files=files, spare=2,
                       cores=job.torch_threads)


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

    from enspipe.util.runtime import progress

    if not units:
        return
    bar = progress(total=len(units), desc="precompute", unit="shard")
    try:
        with _deterministic(), ShardSink(background=overlap) as sink:
            stream_shards(units, sink, torch.device(units[0][0].device), done=bar.update)
    finally:
        bar.close()


# --- Inside a dask worker -----------------------------------------------------------------------------

_WORKER_LOADER: dict[tuple, ChunkLoader] = {}
_WORKER_LOCK = threading.Lock()


def _worker_loader(dataset, job: ShardJob, device: torch.device, files: bool) -> ChunkLoader:
    """The dask worker process's loader, kept across tasks: its processes are forked once (again
    only when a task needs files and it carries none; one that carries files serves any task)."""
    key = (dataset.name, dataset.fingerprint, job.loader_workers, job.torch_threads, device.type, job.decoder)
    with _WORKER_LOCK:
        if key not in _WORKER_LOADER or (files and not _WORKER_LOADER[key].files):
            for old in _WORKER_LOADER.values():
                old.close()
            _WORKER_LOADER.clear()  # one dataset per worker process at a time, as in plan._open_inputs
            _WORKER_LOADER[key] = _open_loader(dataset, job, device, files)
        return _WORKER_LOADER[key]


def stream_task(units: list[tuple[ShardJob, int]]) -> int:
    """One dask task: compute and write these shards in order, returning once all are written."""
    from enspipe.util.runtime import resolve_device

    job = units[0][0]
    device = resolve_device(job.device)
    dataset, _, _ = _inputs(job, device)
    with _deterministic(job.torch_threads), ShardSink(background=True) as sink:
        stream_shards(units, sink, device, loader_for=lambda files: _worker_loader(dataset, job, device, files))
    return len(units)


def shard_task(job: ShardJob, s: int) -> int:
    """One shard as a dask task (a stream of one)."""
    stream_task([(job, s)])
    return s


def compute_shard(job: ShardJob, s: int, sink: ShardSink, device: torch.device) -> None:
    """Compute shard s of every store in job that lacks it and hand it to the sink (a stream of one)."""
    stream_shards([(job, s)], sink, device)
