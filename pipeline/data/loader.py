"""The batch source: pixels decoded and resized by worker processes, ahead of the compute.

Every stage that feeds a device from a dataset reads it here: precompute (shard-aligned spans,
`ChunkLoader` + `batch_to_device`), and evaluate, the trainer's held-out validation and diagnose
through `batches` (the dataset's batches in order, on the device), so none of them decodes a
JPEG in the process that drives the device unless asked to (`workers` 0).

    spans (shard-aligned [start, stop) pieces of batches) -> ChunkLoader -> uint8 chunks (pinned)
        -> to_device: one batch's chunks copied to the device (non-blocking), then / 255 there

With the device decoder (`decoder` nvjpeg, `enspipe.data.decode`) the workers only read each
file's bytes and check its header; the chunks carry those bytes, and `batch_to_device` decodes a
batch's JPEGs in one nvJPEG call, resizes and crops them on the device, then / 255 as above.

Batch boundaries are precompute's (`batch_spans`: a shard's batches start at its first sample),
so a shard's directions do not depend on how its pixels were decoded. A batch is cut into
chunks of a few samples so that many loader workers fill one batch at once: the first batch
is ready after one chunk's decode, not one batch's. The loader is a torch DataLoader whose
sampler hands out the spans of the current pass; its workers persist across passes, so a
dask worker decoding one shard task after another forks them once.

uint8 travels to the device (4x less than float32) and is turned into float there through a
256-entry table computed on the CPU by `uint8 / 255` (what `SampleSource.images` computes):
bit-identical on every device, where a device-side division may round differently (CUDA
multiplies by the reciprocal, which differs from true division for 126 of the 256 values).
"""
from __future__ import annotations

import math
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from enspipe.data.decode import encoded_chunk
from enspipe.util.errors import EnspipeError

if TYPE_CHECKING:
    import torch

__all__ = ["ChunkLoader", "batch_spans", "batch_to_device", "batches", "chunk_size", "default_workers",
           "encoded_chunk", "gather", "needs_decoding", "open_loader", "spans_of", "to_device"]

Span = tuple[int, int]
MAX_WORKERS = 32
PREFETCH_CHUNKS = 4    # per loader worker: with chunk_size ~ batch / workers, about 4 batches ahead
MIN_CHUNK = 8          # samples: smaller chunks cost more in inter-process overhead than they save


def batch_spans(start: int, stop: int, batch_size: int) -> list[Span]:
    """The fixed batches of shard [start, stop): they start at the shard's first sample."""
    return [(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]


def chunk_size(batch_size: int, workers: int) -> int:
    """Samples per chunk: one batch spread over the workers, but never tiny."""
    if workers <= 1:
        return batch_size
    return min(batch_size, max(MIN_CHUNK, math.ceil(batch_size / workers)))


def needs_decoding(dataset) -> bool:
    """Whether the source decodes files (imagefolder, wds) rather than slicing pixels in memory."""
    from enspipe.data import LazySource

    return isinstance(dataset, LazySource)


def default_workers(dataset, cores: int | None = None, *, spare: int = 2) -> int:
    """Loader workers when the user names none, for sources that decode: every core but `spare`.
    Precompute spares two, one for the process that drives the compute and one for the sink's
    thread that writes the shards (it compresses and checksums ~1,600 img/s per core, issue 26:
    with cores - 1 decoders it would take its time from them); evaluate and diagnose write
    nothing and spare one. At least one. None for sources held in memory (slicing them is a
    copy, not a decode)."""
    if not needs_decoding(dataset):
        return 0
    return max(1, min(MAX_WORKERS, (cores or os.cpu_count() or 2) - spare))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Failure:
    """A user error raised in a loader worker, carried back whole (the DataLoader would wrap it
    in a multi-line message whose first line no longer says what went wrong)."""

    kind: type
    message: str


class _Pixels:
    """Map-style dataset whose index is a span: `pixels[(a, b)]` is uint8 [b - a, C, H, W]."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, span: Span):
        import torch

        try:
            return torch.from_numpy(self.dataset.images_uint8(slice(*span)))
        except EnspipeError as e:
            return _Failure(type(e), str(e))


class _Encoded(_Pixels):
    """`encoded[(a, b)]`: the span's samples for the device decode (`EncodedChunk`): each JPEG's
    bytes, read and header-checked, or the PIL path's pixels for a file the device does not take
    (and each sample's file, where `files`)."""

    def __init__(self, dataset, files: bool) -> None:
        super().__init__(dataset)
        self.files = files

    def __getitem__(self, span: Span):
        try:
            return encoded_chunk(self.dataset, range(*span), files=self.files)
        except EnspipeError as e:
            return _Failure(type(e), str(e))


class _Spans:
    """The sampler: the spans of the current pass, set before each pass starts."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def __iter__(self) -> Iterator[Span]:
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)


class ChunkLoader:
    """uint8 pixels of any list of spans, in order, decoded by `workers` processes ahead of use
    (0: in the calling thread). Chunks are in pinned memory when `pin` (for fast, non-blocking
    copies to a GPU). With `encoded` the workers decode nothing: chunks are `EncodedChunk`s (the
    files' bytes) for `batch_to_device` to decode on the device; with `files` too (an encoded
    loader only) they also carry each sample's file (`EncodedChunk.files`). Close it (or use it as a context
    manager) to stop the worker processes."""

    def __init__(self, dataset, workers: int, *, pin: bool = False, encoded: bool = False, files: bool = False,
                 log: Callable[[str], None] = _stderr) -> None:
        if files and not encoded:
            raise ValueError("a ChunkLoader's chunks carry files only when encoded")
        self.dataset, self.pin, self.encoded, self.files = dataset, pin, encoded, files
        if workers and multiprocessing.current_process().daemon:
            # A daemonic process (a dask worker started with the default distributed.worker.daemon)
            # may not start children: decode here rather than fail.
            log("loader: this process is daemonic and cannot start loader workers; decoding in-process "
                "(a dask worker: start dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False to decode "
                "in parallel)")
            workers = 0
        self.workers = workers
        self._spans = _Spans()
        self._loader = None
        if workers:
            from torch.utils.data import DataLoader

            # fork: the dataset (a file list that may hold a million paths) is not pickled per
            # worker, and workers start in milliseconds. They never touch the GPU.
            ctx = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            source = _Encoded(dataset, files) if encoded else _Pixels(dataset)
            self._loader = DataLoader(source, batch_size=None, sampler=self._spans, num_workers=workers,
                                      pin_memory=pin, prefetch_factor=PREFETCH_CHUNKS, persistent_workers=True,
                                      multiprocessing_context=ctx)
            for _ in self._loader:  # an empty pass starts the workers now, outside anyone's timing
                pass

    def __call__(self, spans: Sequence[Span]) -> Iterator[torch.Tensor]:
        """The pixels of each span, in order."""
        if self._loader is None:
            return self._in_process(spans)
        self._spans.spans = list(spans)
        return self._checked(iter(self._loader))

    def _in_process(self, spans: Sequence[Span]) -> Iterator[torch.Tensor]:
        import torch

        for a, b in spans:
            if self.encoded:
                yield encoded_chunk(self.dataset, range(a, b), files=self.files)
                continue
            t = torch.from_numpy(self.dataset.images_uint8(slice(a, b)))
            yield t.pin_memory() if self.pin else t

    @staticmethod
    def _checked(chunks: Iterator) -> Iterator[torch.Tensor]:
        for chunk in chunks:
            if isinstance(chunk, _Failure):
                raise chunk.kind(chunk.message)
            yield chunk

    def close(self) -> None:
        it = getattr(self._loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()  # persistent workers otherwise live until the loader is collected
            self._loader._iterator = None
        self._loader = None

    def __enter__(self) -> ChunkLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_TABLES: dict[str, torch.Tensor] = {}


def _to_float_table(device: torch.device) -> torch.Tensor:
    """float32 k / 255 for k = 0..255, computed on the CPU, cached per device."""
    import torch

    key = str(device)
    if key not in _TABLES:
        _TABLES[key] = torch.arange(256, dtype=torch.uint8).to(torch.float32).div_(255).to(device)
    return _TABLES[key]


def to_device(chunks: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One batch: its uint8 chunks copied into one device tensor (non-blocking from pinned
    memory), then float32 in [0, 1], equal bit for bit to `SampleSource.images`. Contiguous: a
    run's memory format is its `Precision`'s (`memory_format`), the one place that decides it."""
    import torch

    n = sum(len(c) for c in chunks)
    if device.type == "cpu" and len(chunks) == 1:
        u8 = chunks[0]
    else:
        u8 = torch.empty((n, *chunks[0].shape[1:]), dtype=torch.uint8, device=device)
        off = 0
        for c in chunks:
            u8[off:off + len(c)].copy_(c, non_blocking=True)
            off += len(c)
    return _to_float_table(device)[u8.int()]


def batch_to_device(chunks: Sequence, device: torch.device, dataset=None) -> torch.Tensor:
    """`to_device` of a batch's chunks, which are `EncodedChunk`s when the loader is `encoded`:
    then its JPEGs are decoded, resized and cropped on `device` first (`dataset` says how)."""
    from enspipe.data.decode import EncodedChunk, UndecodableJPEG, decode_batch, named

    if not chunks or not isinstance(chunks[0], EncodedChunk):
        return to_device(chunks, device)
    try:
        u8 = decode_batch(chunks, dataset.device_transform(), dataset.geometry.shape, device)
    except UndecodableJPEG as e:  # the batch knows the sample, the source its file: the trainer's line
        raise named(dataset, e) from None
    # decode_batch's batch is contiguous, as `to_device`'s (a convolution over another layout gives
    # other bits: other kernels).
    return _to_float_table(device)[u8.int()]


def gather(chunks: Iterator[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The next chunks of the stream that make up exactly n samples."""
    out, got = [], 0
    while got < n:
        c = next(chunks)
        out.append(c)
        got += len(c)
    if got != n:
        raise RuntimeError(f"loader chunks do not line up with a batch of {n} samples")
    return out


def spans_of(batches: Sequence[Span], chunk: int) -> list[Span]:
    """Each batch cut into chunks of at most `chunk` samples (never across a batch boundary)."""
    return [(a, min(a + chunk, e)) for b, e in batches for a in range(b, e, chunk)]



def open_loader(data, device: torch.device, *, workers: int | None, decoder: str = "cpu", files: bool = False,
                spare: int = 1, cores: int | None = None) -> ChunkLoader:
    """The `ChunkLoader` of every stage that feeds `device` from `data` (precompute, evaluate,
    validation, diagnose): `workers` processes (None: `default_workers(data, cores, spare=spare)`;
    precompute spares 2). A source held in memory is sliced, not decoded: no processes for it.
    Pinned chunks for a CUDA device. `decoder` (auto | cpu | nvjpeg, `data.decode.device_decoder`)
    says whether the workers decode (PIL) or only read the bytes the device then decodes (nvJPEG).

    With `files` (precompute, where a wds store keeps the source's files) the chunks carry each
    sample's file as the worker read it (`EncodedChunk.files`; for a JPEG on the device path the
    file is the item the device decodes); the PIL path then reads each file once, decodes those
    bytes (`_PilFiles`: the same pixels as from the path) and hands both over. `loader.files` says
    whether its chunks carry them."""
    from enspipe.data.decode import device_decoder

    decodes = needs_decoding(data)
    if files and not decodes:
        raise ValueError("a loader's chunks carry files only for a source that reads files")
    if not decodes:
        workers = 0
    elif workers is None:
        workers = default_workers(data, cores, spare=spare)
    pin = device.type == "cuda"
    if device_decoder(decoder, device, data) != "cpu":
        return ChunkLoader(data, workers, pin=pin, encoded=True, files=files)
    if files:
        return ChunkLoader(_PilFiles(data), workers, pin=pin, encoded=True, files=True)
    return ChunkLoader(data, workers, pin=pin)


class _PilFiles:
    """A source of files as `encoded_chunk` reads it for the PIL path: every sample's pixels are
    the PIL path's (no file goes to the device decoder), made from the file's bytes read once,
    which the chunk carries beside them."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def encoded_image(self, i: int) -> tuple[str, bytes]:
        return self.dataset.encoded_image(i)

    def jpeg_of(self, i: int, data: bytes) -> None:
        return None

    def pixels_of(self, i: int, data: bytes):
        return self.dataset.pixels_of(i, data)


def batches(data, batch_size: int, device: torch.device, *, workers: int | None = 0, decoder: str = "cpu",
            loader: ChunkLoader | None = None) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(samples, x, y) for the batches [0, b), [b, 2b), ... of `data`, in order, the last one
    partial: x float32 [n, C, H, W] in [0, 1] and y int64 [n] on `device`. The pixels are decoded
    ahead of use by `workers` loader processes (0: in this process; None: from the cores), with PIL, or on the device
    where `decoder` resolves to nvjpeg (`open_loader`). On the PIL path x equals
    `data.images(samples)` bit for bit, whatever the worker count. `loader` (from `open_loader`,
    over `data`) is used instead of a new one, so a caller that reads the same data again forks
    its workers once; one made here is closed when the iteration ends, fails or is closed."""
    import torch

    own = loader is None
    loader = open_loader(data, device, workers=workers, decoder=decoder) if own else loader
    try:
        spans = batch_spans(0, len(data), batch_size)
        chunks = loader(spans_of(spans, chunk_size(batch_size, loader.workers)))
        for a, b in spans:
            x = batch_to_device(gather(chunks, b - a), device, data)
            yield slice(a, b), x, torch.as_tensor(data.labels[a:b], device=device)
    finally:
        if own:
            loader.close()
