"""JPEG decode on the device: batched nvJPEG (torchvision.io.decode_jpeg) with the resize / crop done there.

    loader worker: source.jpeg_bytes(i) -> the file's bytes (its header checked, nothing decoded)
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
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from enspipe.configs.fields import DECODERS  # declared once, with the option
from enspipe.util.errors import DataError

if TYPE_CHECKING:
    import torch

__all__ = ["DECODERS", "DeviceTransform", "EncodedChunk", "augment_on_device", "check_jpeg", "decode_batch",
           "decoder_params", "device_decoder", "encoded_chunk", "resolve_decoder"]

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
    uint8 [C, H, W] pixels the PIL path made of a file the device path does not take."""

    items: list[bytes | np.ndarray]
    indices: list[int] | None = None  # the samples', for naming one that fails to decode
    # What to make of them, where the batch travels without its source (the trainer's batches):
    transform: DeviceTransform | None = None
    shape: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self, *_: Any) -> EncodedChunk:
        return self  # bytes go to decode_jpeg from pageable memory (it copies them itself)


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


def encoded_chunk(dataset, indices: Iterable[int]) -> EncodedChunk:
    """The `EncodedChunk` of these samples of `dataset` (an imagefolder or wds source): each one's
    JPEG bytes (header checked, nothing decoded), or the PIL path's pixels of a file the device
    path does not take. What a loader worker does on the device path."""
    indices = [int(i) for i in indices]
    items = []
    for i in indices:
        data = dataset.jpeg_bytes(i)
        items.append(data if data is not None else dataset._load(i))
    return EncodedChunk(items, indices)


def device_decoder(name: str, device: Any, dataset) -> str:
    """`resolve_decoder` for `dataset`: sources that read files and can hand over JPEG bytes decode
    on the device; sources held as pixels have nothing to decode."""
    from .base import LazySource

    return resolve_decoder(name, device, isinstance(dataset, LazySource) and hasattr(dataset, "jpeg_bytes"))


def _decode_jpegs(data: Sequence[bytes], mode: str, device: torch.device) -> list[torch.Tensor]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they are
        # what this torchvision has (and the only batched nvJPEG entry point it documents).
        warnings.simplefilter("ignore", DeprecationWarning)
        # A list: one batched nvJPEG call on CUDA (the documented fast path); a loop on the CPU.
        return decode_jpeg(tensors, mode=ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB,
                           device=device)


def _undecodable(items: list, jpeg: list[int], indices: list, mode: str, device: torch.device,
                 error: Callable[[int, str], Exception] | None) -> Exception:
    """The batch failed to decode: decode its JPEGs one by one to name the first bad one."""
    for j in jpeg:
        try:
            _decode_jpegs([items[j]], mode, device)
        except RuntimeError as e:
            reason = str(e).rsplit(", ", 1)[-1].strip()  # "decode_jpeg, FILE.cpp:171, Image is ... truncated"
            if indices[j] is None:
                return DataError(f"cannot decode a JPEG of this batch: {reason}")
            return error(indices[j], reason) if error is not None else \
                DataError(f"cannot decode the JPEG of sample {indices[j]}: {reason}")
    return DataError("cannot decode this batch's JPEGs together, though each decodes alone")


def decode_batch(chunks: Sequence[EncodedChunk], transform: DeviceTransform, shape: tuple[int, int, int],
                 device: torch.device, error: Callable[[int, str], Exception] | None = None) -> torch.Tensor:
    """uint8 [N, *shape] on `device`: the chunks' JPEGs decoded there in one batch and transformed
    there, the pixels the workers already made copied in at their places. A JPEG whose header read
    well but whose data does not decode raises `error(sample index, reason)` (a DataError naming it,
    from the source), else a DataError."""
    import torch

    items = [it for c in chunks for it in c.items]
    indices = [i for c in chunks for i in (c.indices or [None] * len(c.items))]
    out = torch.empty((len(items), *shape), dtype=torch.uint8, device=device)
    jpeg = [j for j, it in enumerate(items) if isinstance(it, (bytes, bytearray))]
    if jpeg:
        try:
            decoded = _decode_jpegs([items[j] for j in jpeg], transform.mode, device)
        except RuntimeError:
            raise _undecodable(items, jpeg, indices, transform.mode, device, error) from None
        for j, img in zip(jpeg, decoded):
            img = transform.apply(img)
            if tuple(img.shape) != tuple(shape):  # a bug here, not the user's: say what came out
                raise RuntimeError(f"device decode made {tuple(img.shape)}, the source's geometry is {shape}")
            out[j] = img
    for j, it in enumerate(items):
        if not isinstance(it, (bytes, bytearray)):
            out[j].copy_(torch.from_numpy(np.ascontiguousarray(it)))
    return out


def augment_on_device(x: torch.Tensor, aug: torch.Tensor | None, pad: int) -> torch.Tensor:
    """`enspipe.stream.apply_augment` on a device tensor [n, C, H, W]: per sample (dy, dx, flip), a
    crop at (dy, dx) of the image zero-padded by `pad`, then a horizontal flip where flip is set."""
    import torch.nn.functional as F

    if aug is None:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    out = x.new_empty(x.shape)
    for i, (dy, dx, flip) in enumerate(aug.tolist()):
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(-1) if flip else crop
    return out
