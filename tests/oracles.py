"""Oracles the tests compute themselves, with plain torch: never a product function as its
own reference (`attacks.fgsm`, `apply_direction`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fgsm_here(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None,
              eps: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip(x + eps * sign(grad_x CE(h(x), y)), 0, 1), the labels used); y None: argmax h(x).
    eps is a number or one per example."""
    xg = x.detach().clone().requires_grad_(True)
    logits = model(xg)
    labels = logits.detach().argmax(1) if y is None else y
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), xg)
    eps = torch.as_tensor(eps, dtype=x.dtype)
    eps = eps.view(-1, *[1] * (x.dim() - 1)) if eps.dim() else eps
    return torch.clamp(x + eps * torch.sign(grad), 0.0, 1.0), labels


def clean_and_fgsm_errors(model, x: torch.Tensor, y: torch.Tensor, eps: float, batch: int) -> tuple[int, int]:
    """(clean errors, white-box FGSM errors with the true labels) of `model` over (x, y) in batches of
    `batch`, as evaluate and the trainer's validation count them, written out with plain autograd."""
    clean = fgsm = 0
    for s in range(0, len(x), batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        with torch.no_grad():
            clean += int((model(xb).argmax(1) != yb).sum())
        xg = xb.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg), yb), xg)
        with torch.no_grad():
            fgsm += int((model((xb + eps * g.sign()).clamp(0, 1)).argmax(1) != yb).sum())
    return clean, fgsm

