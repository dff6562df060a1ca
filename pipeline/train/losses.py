"""Adversarial training losses: how a batch's clean and adversarial examples are weighted.

Both forms are Kurakin et al.'s (2017b) weighted loss over the clean examples C and the
adversarial examples A of a step, with lambda = `adv_weight`:

    loss = (sum_{i in C} L(x_i, y_i) + lambda * sum_{i in A} L(x_adv_i, y_i)) / (|C| + lambda |A|)

and differ in which clean examples C are:

  replace  k = adv_fraction * m of the m samples are replaced by their adversarial versions:
           |A| = k, |C| = m - k. The paper's ImageNet setup (§4.2: "half of the examples in a
           minibatch are replaced", as Kurakin et al., who use lambda = 0.3). With lambda = 1
           it is the plain mean over the batch: enspipe's default.
  paired   the clean batch is kept whole and the k adversarial examples come in addition:
           |C| = m, |A| = k. With adv_fraction = 1 and lambda = 1 this is the reference code's
           MNIST loss (tf_utils.tf_train): 0.5 * mean CE(clean) + 0.5 * mean CE(adversarial),
           64 + 64 examples per step.

The trainer's batch holds the adversarial examples first (rows [0, k), as `adversarial_inputs`
builds it) and the clean rest after; `paired` adds one forward pass of the clean originals of
rows [0, k), as a separate batch, as the reference code runs its clean and adversarial
batches through the model separately (BatchNorm sees each batch's own statistics).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enspipe.config import OptionError

__all__ = ["ADV_LOSSES", "adversarial_loss", "check_adv_loss", "training_loss"]

from enspipe.configs.train import ADV_LOSSES  # noqa: E402 -- the vocabulary is the config's (torch-free)


def check_adv_loss(adv_loss: object, adv_weight: object) -> None:
    """Raise OptionError for an unknown form or a weight that is not a positive number."""
    if adv_loss not in ADV_LOSSES:
        raise OptionError("adv_loss", f"must be one of {', '.join(ADV_LOSSES)}, not {adv_loss!r}")
    ok = isinstance(adv_weight, (int, float)) and not isinstance(adv_weight, bool)
    if not ok or not math.isfinite(adv_weight) or adv_weight <= 0:  # type: ignore[arg-type]
        raise OptionError("adv_weight", f"must be a positive number, not {adv_weight!r}")


def adversarial_loss(adv_logits: Tensor, adv_y: Tensor, clean_logits: Tensor, clean_y: Tensor,
                     weight: float = 1.0) -> Tensor:
    """(sum CE(clean) + weight * sum CE(adv)) / (n_clean + weight * n_adv): Kurakin et al.'s loss."""
    adv = F.cross_entropy(adv_logits, adv_y, reduction="sum")
    clean = F.cross_entropy(clean_logits, clean_y, reduction="sum")
    return (clean + weight * adv) / (len(clean_y) + weight * len(adv_y))


def training_loss(model: nn.Module, logits: Tensor, y: Tensor, batch: dict[str, Any], cfg: Any) -> Tensor:
    """The loss of one training step on `logits` = model(x) for the trainer's batch.

    `cfg` has `adv_loss` and `adv_weight`; `batch["n_adv"]` is k, the number of leading rows
    of x that are adversarial. `model` is the bare module (not its DDP wrapper): `paired`'s
    extra forward pass must not register a second DDP forward before the one backward.
    """
    k = int(batch.get("n_adv") or 0)
    if k == 0 or (cfg.adv_loss == "replace" and cfg.adv_weight == 1.0):
        # No adversarial rows, or lambda = 1: the plain batch mean, bit for bit as before.
        return F.cross_entropy(logits, y)
    if cfg.adv_loss == "replace":
        return adversarial_loss(logits[:k], y[:k], logits[k:], y[k:], cfg.adv_weight)
    # paired: the clean originals of the k adversarial rows, as adversarial_inputs decodes them.
    x_clean = batch["x"][:k].to(logits.device, non_blocking=True).float().div_(255.0)
    clean_logits = torch.cat([model(x_clean).float(), logits[k:]])
    return adversarial_loss(logits[:k], y[:k], clean_logits, y, cfg.adv_weight)
