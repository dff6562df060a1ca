"""JPEG decode on the device: batched nvJPEG (torchvision.io.decode_jpeg) with the resize / crop done there.

    loader worker: source.jpeg_of(i, its file) -> the file's bytes (its header checked, nothing decoded)
                   or, for what the device path does not take (PNG, CMYK, ...), the PIL pixels
    compute process: decode_batch(chunk items, transform, device) -> uint8 [N, C, H, W] on the device

Precompute runs it per batch (`data.loader.batch_to_device`), train in its step
(`enspipe.train.device_batches`, where the batch's crops / flips follow on the device too).

`decoder` (a precompute and a train option): `auto` is nvjpeg on a CUDA device and the PIL path elsewhere;
`cpu` forces the PIL path; `nvjpeg` on a device without CUDA is a one-line error. The decoder is
part of a store's identity only when it is not the PIL path (`decoder_params`), so every store
written before decoders existed keeps its key, while nvJPEG's pixels (which differ from PIL's by a
few levels: another IDCT, another resize) make stores of their own.

The same code runs with device="cpu" (torchvision's libjpeg-turbo decode on CPU tensors): the
tests check that path against PIL, and benchmarks/bench_decode.py measures it beside PIL. This
module imports torch only inside its functions: `DECODERS` is declared with the option in configs/fields.py.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from enspipe.configs.fields import DECODERS  # declared once, with the option
from enspipe.util.errors import DataError

if TYPE_CHECKING:
    import torch

__all__ = ["DECODERS", "DeviceTransform", "EncodedChunk", "UndecodableJPEG", "augment_on_device", "check_jpeg",
           "decode_batch", "decoder_params", "device_decoder", "encoded_chunk", "named", "other_decoder_line", "resolve_decoder",
           "store_decoder"]

JPEG_MODES = ("RGB", "L")  # what decode_jpeg(mode=RGB|GRAY) converts from on every device


def resolve_decoder(name: str, device: Any, decodes: bool = True) -> str:
    """"cpu" (the PIL path) or "nvjpeg" for option `name` on `device`; `decodes`: whether the
    source decodes files at all (an in-memory source has nothing to decode: always "cpu")."""
    from enspipe.config import OptionError

    if name not in DECODERS:
        raise OptionError("decoder", f"must be one of {', '.join(DECODERS)}, not {name!r}")
    cuda = getattr(device, "type", str(device).partition(":")[0]) == "cuda"
    if name == "nvjpeg" and not cuda:
        raise OptionError("decoder", f"nvjpeg decodes on a CUDA device and the device is {device}; "
                                     "use auto or cpu")
    if name == "cpu" or not decodes:
        return "cpu"
    return "nvjpeg" if cuda else "cpu"


def decoder_params(decoder: str) -> dict[str, str]:
    """What a store's identity records of its decoder: nothing for the PIL path (every store made
    before decoders existed was made by it, and keeps its key), else the decoder's name."""
    return {} if decoder == "cpu" else {"decoder": decoder}


def store_decoder(attack_params: dict[str, Any]) -> str:
    """The decoder that made a store, from its identity's attack params (`decoder_params`' inverse)."""
    return str(attack_params.get("decoder", "cpu"))


def other_decoder_line(stage: str, stores: Sequence[dict[str, Any]], decoder: str) -> str | None:
    """The one line a stage (train, evaluate) says when some of its `stores` ({"path", "decoder"})
    were computed on pixels of another decoder than its own (nvJPEG's and PIL's differ by ~0.15 grey
    levels on average, a few at most): their directions are those of slightly different images,
    which is tolerated, so it is said, not refused. None when every store matches."""
    other = [s for s in stores if s["decoder"] != decoder]
    if not other:
        return None
    which = ", ".join(f"{s['path']} ({s['decoder']})" for s in other)
    return (f"{stage}: this run decodes its images with {decoder}; {len(other)} of {len(stores)} stores were "
            f"computed on another decoder's pixels ({which}), which differ by a fraction of a grey level on "
            "average: their directions apply to nearly, not exactly, these images (not an error)")


class UndecodableJPEG(DataError):
    """A JPEG whose header read well but whose data does not decode, known by its sample index
    only: `decode_batch` raises it (a batch may travel without its source: the trainer's step),
    and whoever holds the source names the file (`named`)."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"cannot decode the JPEG of sample {index}: {reason}")
        self.index, self.reason = index, reason


def named(dataset: Any, e: UndecodableJPEG) -> DataError:
    """The one line of a JPEG the device could not decode, wherever it was (precompute's and evaluate's
    batches, the trainer's step): the source names its file (imagefolder: the path; wds: the sample's
    key and shard), as on the PIL path, followed by the sample index."""
    describe = getattr(dataset, "decode_error", None)
    if describe is None:  # a source without file names: its index is all there is
        return DataError(str(e))
    return DataError(f"{describe(e.index, e.reason)} (sample {e.index})")


@dataclass(frozen=True)
class DeviceTransform:
    """A source's pixel pipeline, on tensors: decode to `mode`, then either the shorter side to
    `resize` and a centred `crop` (imagefolder), or exactly `size` (wds with an image size), or
    nothing (wds without: the header check made every image the first one's size)."""

    mode: str                          # "RGB" | "L"
    resize: int | None = None          # shorter side (with crop)
    crop: int | None = None
    size: tuple[int, int] | None = None  # (h, w): resized to exactly this

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        # antialias=True: what PIL's bilinear resize does when it shrinks (its filter widens with
        # the scale), which is the path this one stands in for.
        if self.size is not None:
            return TF.resize(img, list(self.size), interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.resize is not None:
            img = TF.resize(img, self.resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.crop is not None:
            img = TF.center_crop(img, [self.crop, self.crop])
        return img


@dataclass
class EncodedChunk:
    """One span's samples as a loader worker hands them over: per sample the JPEG's bytes, or the
    uint8 [C, H, W] pixels the PIL path made of a file the device path does not take.

    Pickled (a DataLoader worker handing it to the process that drives the device), its JPEGs, its
    pixels and its files that are not JPEG items travel as one shared-memory uint8 tensor, not as
    bytes through the worker's pipe: a batch of 256 ImageNet JPEGs is ~25 MB, which the receiving
    process read and copied (bench_device_step.py measures it). Unpickled, each JPEG item is a 1-D
    uint8 tensor and each item of pixels a uint8 numpy array, views of that one tensor."""

    items: list[bytes | np.ndarray | torch.Tensor]
    indices: list[int] | None = None  # the samples', for naming one that fails to decode
    # What to make of them, where the batch travels without its source (the trainer's batches):
    transform: DeviceTransform | None = None
    shape: tuple[int, int, int] | None = None
    # Each sample's file as read, (extension, bytes): what a wds store keeps beside its directions,
    # so precompute's sink reads no file again (for a JPEG the bytes are the item itself: one copy).
    files: list[tuple[str, bytes]] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self, *_: Any) -> EncodedChunk:
        return self  # bytes go to decode_jpeg from pageable memory (it copies them itself)

    def __reduce__(self) -> tuple[Any, tuple]:
        import torch

        # Every JPEG, every uint8 pixel item and every file that is not a JPEG item goes in one tensor.
        shared = [k for k, it in enumerate(self.items) if _encoded(it) or it.dtype == np.uint8]
        own = [] if self.files is None else [k for k in range(len(self.items)) if not _encoded(self.items[k])]
        parts = [self.items[k] for k in shared] + [self.files[k][1] for k in own]
        if not parts:
            return EncodedChunk, (self.items, self.indices, self.transform, self.shape, self.files)
        sizes = [it.nbytes if isinstance(it, np.ndarray) else len(it) for it in parts]
        # In shared memory from the start: a tensor pickled for a worker queue is moved there
        # otherwise, which would copy it once more.
        data = torch.empty(sum(sizes), dtype=torch.uint8).share_memory_()
        flat, at, spans = data.numpy(), 0, []
        for it, n in zip(parts, sizes):
            if isinstance(it, np.ndarray):
                flat[at:at + n].reshape(it.shape)[...] = it
            else:
                flat[at:at + n] = it.numpy() if isinstance(it, torch.Tensor) else np.frombuffer(it, np.uint8)
            spans.append((at, n))
            at += n
        # k -> (offset, size, the pixels' shape; None for a JPEG)
        at_items = {k: (*span, None if _encoded(self.items[k]) else self.items[k].shape)
                    for k, span in zip(shared, spans)}
        rest = [None if k in at_items else it for k, it in enumerate(self.items)]
        # A JPEG's file is its item (`encoded_chunk`): only its extension travels beside it.
        at_files = dict(zip(own, spans[len(shared):]))
        files = None if self.files is None else [(ext, at_files.get(k)) for k, (ext, _) in enumerate(self.files)]
        return _unpacked, (data, at_items, rest, self.indices, self.transform, self.shape, files)


def _encoded(item: Any) -> bool:
    """Whether a chunk's item is a file's bytes (bytes, or a 1-D uint8 tensor of them), not pixels."""
    return not isinstance(item, np.ndarray)


def _unpacked(data: torch.Tensor, at_items: dict[int, tuple[int, int, tuple | None]], rest: list,
              indices: list[int] | None, transform: DeviceTransform | None, shape: tuple[int, int, int] | None,
              files: list[tuple[str, tuple[int, int] | None]] | None) -> EncodedChunk:
    """An `EncodedChunk` from its pickled form: each JPEG a view of the one shared tensor, each item
    of pixels a numpy view of it (and, where the chunk carries its files, each file as bytes again,
    as the store writer takes them: a JPEG's from its item, another's from its own place)."""
    items = list(rest)
    for k, (at, n, pixels) in at_items.items():
        items[k] = data[at:at + n] if pixels is None else data[at:at + n].numpy().reshape(pixels)
    if files is not None:
        files = [(ext, (items[k] if span is None else data[span[0]:span[0] + span[1]]).numpy().tobytes())
                 for k, (ext, span) in enumerate(files)]
    return EncodedChunk(items, indices, transform, shape, files)


def check_jpeg(data: bytes, what: str, limits) -> tuple[int, int] | None:
    """(w, h) of `data` when it is a JPEG the device path decodes (RGB or grayscale), read from its
    header alone; None for anything else (the PIL path decodes it, and says what is wrong with it).
    A JPEG above the pixel cap is refused undecoded, as the PIL path refuses it (DataError naming `what`)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt, mode, (w, h) = im.format, im.mode, im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if fmt != "JPEG" or mode not in JPEG_MODES:
        return None
    if (above := limits.above("max_image_pixels", w * h, " pixels")) is not None:
        raise DataError(f"{what} is {w}x{h} = {above}; refused undecoded")
    return w, h


def encoded_chunk(dataset, indices: Iterable[int], *, files: bool = False) -> EncodedChunk:
    """The `EncodedChunk` of these samples of `dataset` (an imagefolder or wds source), each file
    read once: its JPEG bytes (header checked, nothing decoded), or the PIL path's pixels of a file
    the device path does not take. What a loader worker does on the device path. With `files` the
    chunk carries each file too (`EncodedChunk.files`, for a wds store that keeps them); only then,
    since the process that drives the device rebuilds each one from the shared tensor when unpickling."""
    indices = [int(i) for i in indices]
    items, kept = [], []
    for i in indices:
        ext, data = dataset.encoded_image(i)
        jpeg = dataset.jpeg_of(i, data)
        items.append(jpeg if jpeg is not None else dataset.pixels_of(i, data))
        kept.append((ext, data))
    return EncodedChunk(items, indices, files=kept if files else None)


def device_decoder(name: str, device: Any, dataset) -> str:
    """`resolve_decoder` for `dataset`: sources that read files and can hand over JPEG bytes decode
    on the device; sources held as pixels have nothing to decode."""
    from .base import LazySource

    return resolve_decoder(name, device, isinstance(dataset, LazySource) and hasattr(dataset, "jpeg_of"))


def _decode_jpegs(data: Sequence[bytes | torch.Tensor], mode: str, device: torch.device) -> list[torch.Tensor]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # The files' bytes as tensors without a copy (a batch of ImageNet JPEGs is ~25 MB, which
        # bytearray() copied in the process that drives the device): decode_jpeg only reads them,
        # so the read-only buffer torch warns about is never written.
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        tensors = [b if isinstance(b, torch.Tensor) else torch.frombuffer(b, dtype=torch.uint8) for b in data]
        # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they are
        # what this torchvision has (and the only batched nvJPEG entry point it documents).
        warnings.simplefilter("ignore", DeprecationWarning)
        # A list: one batched nvJPEG call on CUDA (the documented fast path); a loop on the CPU.
        return decode_jpeg(tensors, mode=ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB,
                           device=device)


def _undecodable(items: list, jpeg: list[int], indices: list, mode: str, device: torch.device) -> Exception:
    """The batch failed to decode: decode its JPEGs one by one to name the first bad one."""
    for j in jpeg:
        try:
            _decode_jpegs([items[j]], mode, device)
        except RuntimeError as e:
            reason = str(e).rsplit(", ", 1)[-1].strip()  # "decode_jpeg, FILE.cpp:171, Image is ... truncated"
            if indices[j] is None:
                return DataError(f"cannot decode a JPEG of this batch: {reason}")
            return UndecodableJPEG(indices[j], reason)
    return DataError("cannot decode this batch's JPEGs together, though each decodes alone")


def decode_batch(chunks: Sequence[EncodedChunk], transform: DeviceTransform, shape: tuple[int, int, int],
                 device: torch.device) -> torch.Tensor:
    """uint8 [N, *shape] on `device`: the chunks' JPEGs decoded there in one batch and transformed
    there, the pixels the workers already made copied in at their places. A JPEG whose header read
    well but whose data does not decode raises `UndecodableJPEG` (its sample index): whoever holds
    the source names its file (`named`)."""
    import torch

    items = [it for c in chunks for it in c.items]
    indices = [i for c in chunks for i in (c.indices or [None] * len(c.items))]
    # The batch's rows in the order they are made (the JPEGs by size group, then the workers' pixels)
    # and the row each goes to: put in place by one index_copy_ at the end. The only host -> device
    # copies are `_to_device`'s (pinned, non-blocking on CUDA): an index built from a Python list
    # on the device (torch.tensor(..., device=cuda)) is a pageable copy, which waits for all the
    # GPU work queued before it (the previous step's backward), once per size group.
    parts: list[torch.Tensor] = []
    places: list[int] = []
    jpeg = [j for j, it in enumerate(items) if _encoded(it)]
    if jpeg:
        try:
            decoded = _decode_jpegs([items[j] for j in jpeg], transform.mode, device)
        except RuntimeError:
            raise _undecodable(items, jpeg, indices, transform.mode, device) from None
        # Images of one size are resized and cropped together: a few device ops per size instead of
        # per image (a wds of one image size is one group; ImageNet's sizes repeat often). Batched and
        # one by one the resize gives the same bytes (tests/data/test_device_decode.py).
        sizes: dict[tuple[int, ...], list[int]] = {}
        for k, img in enumerate(decoded):
            sizes.setdefault(tuple(img.shape), []).append(k)
        for ks in sizes.values():
            imgs = transform.apply(decoded[ks[0]][None] if len(ks) == 1 else torch.stack([decoded[k] for k in ks]))
            if tuple(imgs.shape[1:]) != tuple(shape):  # a bug here, not the user's: say what came out
                raise RuntimeError(f"device decode made {tuple(imgs.shape[1:])}, the source's geometry is {shape}")
            parts.append(imgs)
            places.extend(jpeg[k] for k in ks)
    pixels = [j for j, it in enumerate(items) if not _encoded(it)]
    if pixels:
        # The pixels the workers made (the PIL path's files: PNGs, CMYK, or every file where a wds
        # store keeps the source files and decoder is cpu) go over in one copy, not one per sample.
        parts.append(_to_device(torch.from_numpy(np.stack([items[j] for j in pixels])), device))
        places.extend(pixels)
    if not parts:
        return torch.empty((0, *shape), dtype=torch.uint8, device=device)
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    if places == list(range(len(items))):  # already in the batch's order (one size, or only pixels)
        # Contiguous: a crop's view, or the PIL path's pixels stacked from channels-last arrays (which
        # keep their strides), made whole as a copy into a new batch made them; a convolution over
        # another layout gives other bits (a 2-worker store would differ from the serial one).
        return rows.contiguous()
    out = torch.empty((len(items), *shape), dtype=torch.uint8, device=device)
    return out.index_copy_(0, _to_device(torch.tensor(places, dtype=torch.long), device), rows)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: pinned and non-blocking on CUDA
    (a pageable copy is cudaMemcpyAsync + a synchronize). decode_batch's only host -> device copy
    (tests/data/test_device_decode_copies.py counts what goes through it)."""
    import torch

    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def augment_on_device(x: torch.Tensor, aug: torch.Tensor | None, pad: int) -> torch.Tensor:
    """`enspipe.stream.apply_augment` on a device tensor [n, C, H, W]: per sample (dy, dx, flip), a
    crop at (dy, dx) of the image zero-padded by `pad`, then a horizontal flip where flip is set.

    Two gathers for the whole batch (the rows each sample keeps, then its columns, reversed where it
    flips), not a crop and a copy per sample: on a GPU each op is a kernel launch from the process
    that trains, and a per-sample loop made ~2 per sample (benchmarks/bench_device_step.py counts them)."""
    import torch
    import torch.nn.functional as F

    if aug is None:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx, flip = aug.to(x.device, torch.long, non_blocking=True).unbind(1)
    rows = dy[:, None] + torch.arange(h, device=x.device)                      # [n, h]
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None] != 0, w - 1 - cols, cols) + dx[:, None]    # [n, w]
    kept = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded.shape[3]))
    return kept.gather(3, cols[:, None, None, :].expand(n, c, h, w))
