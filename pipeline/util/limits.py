"""Caps on the numbers enspipe reads from files, checked before it allocates for them.

A number in a file decides how much memory enspipe asks for: a model's classes and input
size (model.json), a tensor's shape (a safetensors header), a tar member's size, an image's
width and height, a label. A hostile or broken file could ask for terabytes, so each such
number is checked against a cap first, and a file beyond a cap is refused with one line that
names the file, the number and the cap -- before anything is read or built from it.

The defaults are generous for real data (ImageNet-21k has 21,841 classes; the largest timm
models have about 2e9 parameters; ImageNet's largest JPEGs are a few MiB) and small enough
that a file can never take a process far past its baseline memory. Each cap is a field of
`Limits`; the environment variable ENSPIPE_MAX_<FIELD> (for example
`ENSPIPE_MAX_IMAGE_BYTES=268435456`) raises or lowers it for one run, in every command and in
every worker process, without a flag on each command.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields

from enspipe.config import option
from enspipe.util.errors import ConfigError

__all__ = ["Limits", "current_limits", "env_name"]

# enspipe checks an image's pixels against `max_image_pixels` itself, right after PIL reads
# the header; PIL's own DecompressionBombWarning (two lines on stderr, at 89M pixels) would
# only precede that one-line refusal. PIL's hard error (at twice its limit) still applies.
warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")


@dataclass(frozen=True)
class Limits:
    """Caps on numbers read from files (RELIABILITY.md, hostile input)."""

    max_classes: int = option(1_000_000, help="Classes a model (model.json) or a dataset's labels may have.")
    max_input_side: int = option(8192, help="Height or width of a model's input (model.json), in pixels.")
    max_input_channels: int = option(64, help="Channels of a model's input (model.json).")
    max_parameters: int = option(2**31, help="Parameters of a model built from a model.json.")
    max_image_bytes: int = option(64 << 20, help="Bytes of one image file or image tar member.")
    max_image_pixels: int = option(1 << 26, help="Pixels (width x height) of one image, checked before decoding.")
    max_label_bytes: int = option(32, help="Bytes of a label (.cls) or index tar member.")
    max_shards: int = option(1 << 20, help="Shards a store's manifest may claim (checked before any per-shard loop).")
    max_metadata_bytes: int = option(16 << 20, help="Bytes of a model.json, a safetensors header, a store "
                                     "key member or a tar's own metadata (a pax header, a long name).")

    @classmethod
    def from_env(cls, environ: os._Environ | dict | None = None) -> Limits:
        """The defaults, with every ENSPIPE_MAX_<FIELD> set in the environment applied."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(env_name(f.name))
            if raw is None or not raw.strip():
                continue
            try:
                value = int(raw.strip().replace("_", ""))
            except ValueError:
                value = 0
            if value < 1:
                raise ConfigError(f"{env_name(f.name)} must be a positive integer, not {raw!r}")
            values[f.name] = value
        return cls(**values)

    def above(self, field: str, value: int, unit: str = "") -> str | None:
        """'VALUE UNIT, above the limit of CAP (raise it with ENSPIPE_MAX_FIELD)' when `value`
        exceeds the cap of `field`, else None."""
        cap = getattr(self, field)
        if value <= cap:
            return None
        return f"{value}{unit}, above the limit of {cap} (raise it with {env_name(field)})"


def env_name(field: str) -> str:
    """The environment variable of a `Limits` field: max_image_bytes -> ENSPIPE_MAX_IMAGE_BYTES."""
    return f"ENSPIPE_{field.upper()}"


def current_limits() -> Limits:
    """The caps of this process (defaults + environment), read afresh: cheap, and a test or a
    user that changes the environment between two calls gets what it set."""
    return Limits.from_env()
