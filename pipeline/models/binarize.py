"""Input binarization (Appendix C.1): a standard model behind x -> 1[x > threshold].

`evaluate` and `diagnose` load it from a spec prefix (see `enspipe.models.load_model_for`):

    binarized:SPEC         gradient="bpda": white-box attacks go through the binarization with
                           a straight-through gradient (BPDA, Athalye et al. 2018). This is how
                           Appendix C.1 attacks it ("for a white-box I-FGSM attack, we get at
                           most 11.4% error"), and the evaluation default.
    binarized-masked:SPEC  gradient="zero": the step function's true derivative, 0 almost
                           everywhere. A gradient attack then never moves (its "white-box"
                           error is the clean error): the gradient-masking reading, kept as an
                           explicit diagnostic beside the BPDA one.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from enspipe.util.errors import ConfigError

__all__ = ["GRADIENTS", "Binarized"]

GRADIENTS = ("zero", "bpda")


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


class _StraightThroughStep(torch.autograd.Function):
    """The step function 1[x > t] with the identity as its backward (BPDA's straight-through
    estimator): the attacker differentiates the model as if the binarization were not there,
    which is the natural approximation of a function that equals x on the binary pixels
    that make up most of an MNIST image."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: float) -> Tensor:  # type: ignore[override]
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


_STEPS = {"zero": _ZeroGradStep, "bpda": _StraightThroughStep}


class Binarized(nn.Module):
    """`model` behind input binarization x -> 1[x > threshold] (Appendix C.1).

    On MNIST, binarizing the input of a standard CNN already gives l-inf robustness close
    to Madry et al.'s model (at most 11.4% error under white-box I-FGSM at eps = 0.3): few
    pixels sit near the threshold. The forward pass is the same for both `gradient`s:
      "zero"  the true derivative (the default of this class: the model as it is). Gradient
              attacks (FGSM, I-FGSM, PGD without a random start) do not move at all: gradient
              masking, not robustness in itself.
      "bpda"  a straight-through gradient, so white-box attacks reach through the
              binarization as Appendix C.1's do.
    """

    def __init__(self, model: nn.Module, threshold: float = 0.5,
                 gradient: Literal["zero", "bpda"] = "zero") -> None:
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"binarization threshold must be in [0, 1], not {threshold}")
        if gradient not in _STEPS:
            raise ConfigError(f"binarization gradient must be one of {', '.join(GRADIENTS)}, not {gradient!r}")
        self.model = model
        self.threshold = float(threshold)
        self.gradient = gradient

    @property
    def config(self) -> Any:
        """The wrapped EnsModel's config (input geometry, classes), for callers that check it."""
        return self.model.config

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_STEPS[self.gradient].apply(x, self.threshold))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, gradient={self.gradient}"
