"""What every model enspipe hands out is: an `EnsModel` (images in [0, 1], normalized inside with its own
mean/std) built from a `ModelConfig`, and the error for weights whose classifier head does not fit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from enspipe.util.errors import ModelError
from enspipe.util.limits import Limits, current_limits


__all__ = ["CHECKPOINT_FORMAT", "IMAGENET_MEAN", "IMAGENET_STD", "EnsModel", "HeadMismatch", "ModelConfig"]

CHECKPOINT_FORMAT = "enspipe-model/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's graph (weights live in safetensors)."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W) the wrapper accepts
    mean: tuple[float, ...]
    std: tuple[float, ...]
    family: str  # "mnist" | "torchvision" | "timm"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        try:
            return cls(
                name=str(d["name"]),
                num_classes=int(d["num_classes"]),
                input_size=tuple(int(v) for v in d["input_size"]),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                family=str(d["family"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ModelError(f"model config is malformed ({e!r})") from None

    def problem(self, limits: Limits | None = None) -> str | None:
        """Why this config (read from a file) must not be built, or None: every number
        against its cap (`enspipe.util.limits`), before anything is allocated for it."""
        lim = limits or current_limits()
        if len(self.input_size) != 3:
            return f"input_size must be [C, H, W], not {list(self.input_size)}"
        c, h, w = self.input_size
        checks = [("num_classes", self.num_classes, "max_classes"), ("input channels", c, "max_input_channels"),
                  ("input height", h, "max_input_side"), ("input width", w, "max_input_side")]
        for what, value, cap in checks:
            if value < 1:
                return f"{what} must be at least 1, not {value}"
            if (above := lim.above(cap, value)) is not None:
                return f"{what} {above}"
        for what, values in (("mean", self.mean), ("std", self.std)):
            if not 1 <= len(values) <= lim.max_input_channels or not all(math.isfinite(v) for v in values):
                return f"{what} must be 1 to {lim.max_input_channels} finite numbers, not {list(values)[:8]}"
        if min(self.std) <= 0:
            return f"std must be positive, not {list(self.std)}"
        return None


class EnsModel(nn.Module):
    """A classifier on [0, 1] input: normalizes with its own mean/std, returns logits."""

    def __init__(self, net: nn.Module, config: ModelConfig, *, provenance: dict | None = None):
        super().__init__()
        self.net = net
        self.config = config
        self.provenance: dict[str, Any] = dict(provenance or {})
        c = config.input_size[0]
        # Buffers (not parameters) so they travel with .to(device) and the checkpoint.
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1))
        # A 1-channel dataset fed to a 3-channel backbone is repeated across channels.
        self._expand = len(config.mean) if len(config.mean) != c else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._expand:
            x = x.expand(-1, self._expand, -1, -1)
        out = self.net((x - self.mean) / self.std)
        # torchvision's Inception returns a namedtuple in train mode when aux logits are on.
        return out.logits if hasattr(out, "logits") else out


# --- The paper's MNIST architectures (Table 5 and the authors' Keras code) -----------------


class HeadMismatch(ModelError):
    """Weights that fit the architecture except its classifier head (another number of classes).
    A stage that cannot take a fresh head (precompute, evaluate) says what to do instead."""

    def __init__(self, message: str, *, weights: str, model_classes: int, file_classes: int):
        super().__init__(message)
        self.weights, self.model_classes, self.file_classes = weights, model_classes, file_classes
