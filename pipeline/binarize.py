"""Input binarization (Appendix C.1): a model whose input gradient is zero almost everywhere.

A gradient-masking baseline: `evaluate` and `diagnose` load it from the spec prefix
`binarized:` (see `enspipe.models.load_model_for`) to contrast white-box and transferred
errors.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from enspipe.errors import ConfigError

__all__ = ["Binarized"]


class _ZeroGradStep(torch.autograd.Function):
    """The step function 1[x > t] with its true derivative: 0 (almost everywhere)."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: float) -> Tensor:  # type: ignore[override]
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Zeros rather than "no gradient": attacks call autograd.grad(loss, x) and need x to
        # be in the graph; they then see sign(0) = 0 and do not move.
        return torch.zeros_like(grad), None


class Binarized(nn.Module):
    """`model` behind input binarization x -> 1[x > threshold] (Appendix C.1).

    On MNIST, binarizing the input of a standard CNN already gives l-inf robustness close
    to Madry et al.'s model (at most 11.4% error under white-box I-FGSM at eps = 0.3): few
    pixels sit near the threshold. Its input gradient is zero almost everywhere, so a
    white-box gradient attack (FGSM, I-FGSM, PGD without a random start) does not move at
    all; this is gradient masking, not robustness in itself. Use it as an `evaluate`
    target to contrast white-box and transferred (black-box) errors.
    """

    def __init__(self, model: nn.Module, threshold: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"binarization threshold must be in [0, 1], not {threshold}")
        self.model = model
        self.threshold = float(threshold)

    @property
    def config(self) -> Any:
        """The wrapped EnsModel's config (input geometry, classes), for callers that check it."""
        return self.model.config

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_ZeroGradStep.apply(x, self.threshold))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"
