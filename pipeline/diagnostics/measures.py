"""Gradient-masking measurements (§4 of the paper, Table 6, Figures 1, 4, 5).

A model that has learned to mask its gradient (the "degenerate minimum" of §3.3) looks
robust to single-step attacks while remaining vulnerable to iterative and transferred
ones. The measurements here show it:

- `approximation_ratio`   how much of the (iteratively lower-bounded) optimal loss of the
                          inner maximisation of eq. 1 a single-step attack reaches (§4,
                          Appendix C.2, Table 6).
- `perturbation_cosine`   cosine of the single- and multi-step perturbations (§4).
- `input_gradient_norm`   mean l1 / l2 norm of grad_x L: masking is not a flat loss (§4).
- `loss_surface`          the loss on x + e1*sign(g) + e2*g_perp (Figures 1, 4, 5), drawn
                          by `enspipe.report.plots.plot_loss_surface`.

Losses are the cross-entropy with the true label, the loss of the inner maximisation of
eq. 1, whichever attack produced the point (a Step-LL point is scored on y_true too).
Models are used in whatever train/eval mode the caller left them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enspipe import attacks
from enspipe.attacks import ITERATIVE, SINGLE_STEP
from enspipe.util.errors import ConfigError

__all__ = ["approximation_ratio", "input_gradient_norm", "loss_surface", "perturbation_cosine"]


# ----------------------------------------------------------------------------------------
# small shared helpers (also used by `hadamard.count_adversarial_directions`)

def _labels(y: Tensor | Sequence[int] | int, x: Tensor) -> Tensor:
    y = torch.as_tensor(y, device=x.device).long()
    return y.reshape(1) if y.dim() == 0 else y


def _as_batch(x: Tensor) -> Tensor:
    """A single image [C, H, W] becomes a batch of one; a batch stays as it is."""
    return x.unsqueeze(0) if x.dim() == 3 else x


def _losses(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> Tensor:
    """Per-example cross-entropy with the true label, float32 on the CPU."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size]).float()
            out.append(F.cross_entropy(logits, y[i:i + batch_size], reduction="none").cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """grad_x of the summed per-example CE: row i is example i's own input gradient
    (examples do not interact in eval mode), so no batch-size scaling creeps in."""
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    return grad



def _check_attacks(single: str, iterative: str) -> None:
    if single not in SINGLE_STEP:
        raise ConfigError(f"single-step attack must be one of {', '.join(SINGLE_STEP)}, not {single!r}")
    if iterative not in ITERATIVE:
        raise ConfigError(f"iterative attack must be one of {', '.join(ITERATIVE)}, not {iterative!r}")



def _attack_pair(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, single: str, iterative: str,
                 steps: int, seed: int, batch_size: int) -> dict[str, Tensor]:
    """Per example: clean, single-step and iterative CE losses, and the cosine of the two
    perturbations. One pass serves both `approximation_ratio` and `perturbation_cosine`."""
    _check_attacks(single, iterative)
    x, y = _as_batch(x), _labels(y, x)
    # One generator for both attacks and every batch, in that order: random starts (PGD,
    # R+FGSM) are reproducible.
    gen = torch.Generator().manual_seed(seed)
    attack_single = attacks.create_attack(single, eps=eps, seed=gen)
    attack_iterative = attacks.create_attack(iterative, eps=eps, steps=steps, seed=gen)
    out: dict[str, list[Tensor]] = {"clean": [], "single": [], "iterative": [], "cosine": []}
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        x_s = attack_single(model, xb, yb)
        x_i = attack_iterative(model, xb, yb)
        out["clean"].append(_losses(model, xb, yb))
        out["single"].append(_losses(model, x_s, yb))
        out["iterative"].append(_losses(model, x_i, yb))
        d_s, d_i = (x_s - xb).flatten(1).double(), (x_i - xb).flatten(1).double()
        # A perturbation that clipping reduced to zero has no direction: count it as cos 0.
        cos = (d_s * d_i).sum(1) / (d_s.norm(dim=1) * d_i.norm(dim=1)).clamp_min(1e-30)
        out["cosine"].append(cos.float().cpu())
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}



# ----------------------------------------------------------------------------------------
# §4 / Table 6: approximation ratio, cosine similarity, gradient norm


def _ratio_from(losses: Mapping[str, Tensor]) -> dict[str, float]:
    single, iterative = losses["single"].double(), losses["iterative"].double()
    # The iterative attack only lower-bounds the true maximum (§4: "we lower-bound it using
    # an iterative attack"); where the single step happens to do better, it is the better
    # lower bound, so the ratio is never above 1 and the gap never negative.
    opt = torch.maximum(single, iterative)
    ratio = float(single.mean() / opt.mean()) if float(opt.mean()) > 0 else 1.0
    per_point = torch.where(opt > 0, single / opt.clamp_min(1e-300), torch.ones_like(opt))
    return {
        "ratio": ratio,
        "gap": 1.0 - ratio,
        "ratio_per_point": float(per_point.mean()) if len(opt) else float("nan"),
        "loss_clean": float(losses["clean"].double().mean()),
        "loss_single": float(single.mean()),
        "loss_iterative": float(iterative.mean()),
        "loss_opt": float(opt.mean()),
        "iterative_below_single": float((iterative < single).double().mean()) if len(opt) else 0.0,
        "n": int(len(opt)),
    }


def approximation_ratio(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, single: str = "fgsm",
                        iterative: str = "pgd", steps: int = 40, seed: int = 0,
                        batch_size: int = 256) -> dict[str, Any]:
    """The approximation ratio of Table 6: the single-step attack's loss over the optimum.

    Exactly: with L_s(x) the CE loss (true label) at the single-step point, L_it(x) at the
    iterative one and L_opt = max(L_s, L_it) (the best known lower bound on the inner max),

        ratio = mean_x L_s(x) / mean_x L_opt(x),        gap = 1 - ratio.

    Direction: the paper's percentages are `ratio`, not `gap`. It says Step-LL "gets within
    19% of the optimum loss" on the standard v3 and that "for the v3adv model, the
    approximation ratio drops to 7%, confirming that the learned model is less amenable to
    linearization"; ensemble training makes it "improve from 8% (IRv2adv) to 14%"; and in
    Table 6 the nearly-linear D has the highest value (49%) and A_adv, which masks its
    gradient, 0%. A higher ratio is a better linear approximation, so 17% for A means the
    single step reaches 17% of the optimal loss (gap 83%), and 0% for A_adv that it reaches
    none of it. For a linear model ratio = 1, gap = 0.

    Also returned: `ratio_per_point` (the mean of per-example ratios, noisier where the
    optimum is tiny), the mean losses, and the share of points where the iterative attack
    did worse than the single step (a hint that it needs more steps).
    """
    losses = _attack_pair(model, x, y, eps=eps, single=single, iterative=iterative, steps=steps,
                          seed=seed, batch_size=batch_size)
    return {**_ratio_from(losses), "single": single, "iterative": iterative, "steps": steps, "eps": eps}


def perturbation_cosine(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 40,
                        single: str = "fgsm", iterative: str = "pgd", seed: int = 0,
                        batch_size: int = 256) -> dict[str, Any]:
    """Mean cosine similarity of (x_single - x) and (x_iterative - x) over the batch (§4:
    0.13 for Inception v3, 0.02 for v3adv: "the more linear the model, the more similar")."""
    losses = _attack_pair(model, x, y, eps=eps, single=single, iterative=iterative, steps=steps,
                          seed=seed, batch_size=batch_size)
    cos = losses["cosine"].double()
    return {"mean": float(cos.mean()), "std": float(cos.std()) if len(cos) > 1 else 0.0,
            "n": int(len(cos)), "single": single, "iterative": iterative, "steps": steps, "eps": eps}


def input_gradient_norm(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256) -> dict[str, float]:
    """Mean l1 and l2 norms of grad_x CE(h(x), y) per example (§4: a masked gradient is
    not a small one: 0.17 for v3adv against 0.10 for v3)."""
    x = _as_batch(x)
    y = _labels(y, x)
    l1, l2 = [], []
    for i in range(0, len(x), batch_size):
        g = _input_grad(model, x[i:i + batch_size], y[i:i + batch_size]).flatten(1).double()
        l1.append(g.abs().sum(1).cpu())
        l2.append(g.norm(dim=1).cpu())
    l1_t, l2_t = torch.cat(l1), torch.cat(l2)
    return {"l1": float(l1_t.mean()), "l2": float(l2_t.mean()), "n": int(len(l1_t))}


# ----------------------------------------------------------------------------------------
# Figures 1, 4, 5: the loss surface along the gradient and another model's direction


def _orthogonal_signed(g: Tensor, other: Tensor) -> Tensor:
    """A signed direction in {-1, 0, 1}^d orthogonal to the signed gradient g, per row.

    Starts from sign(other) and zeroes just enough coordinates where it agrees (or, if the
    dot product is negative, disagrees) with g to make the dot product exactly 0, picking
    those where |other| is smallest. Unlike Gram-Schmidt this keeps a signed l-inf
    direction (the paper's g_perp is "a signed vector orthogonal to g") and keeps most of
    the other model's adversarial signal.
    """
    g, other = g.flatten(1), other.flatten(1)
    o = other.sign()
    agree = g * o  # +1 agree, -1 disagree, 0 where either is 0
    excess = agree.sum(1)  # the dot product to cancel, an integer per row
    # Candidates: coordinates whose product has the excess's sign; cheapest first.
    cand = agree == excess.sign()[:, None]
    score = torch.where(cand, other.abs(), torch.full_like(other, float("inf")))
    order = score.argsort(dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    drop = rank < excess.abs()[:, None]
    return torch.where(drop, torch.zeros_like(o), o)


def loss_surface(model: nn.Module, x: Tensor, y: Tensor, *, eps: float,
                 other_direction: Tensor | nn.Module, grid: int = 21, clip: bool = True,
                 batch_size: int = 1024) -> dict[str, Any]:
    """Loss of `model` on x + e1 * g + e2 * g_perp for e1, e2 on a `grid` x `grid` grid in [0, eps].

    g = sign(grad_x L(model)) and g_perp is the adversarial direction of ANOTHER model
    (`other_direction`: a model, whose signed input gradient is taken, or a tensor shaped
    like x), made orthogonal to g by `_orthogonal_signed` (Figures 1, 4, 5 use the signed
    gradient of another Inception model / of model B). Points are clipped to [0, 1] unless
    `clip=False`. Returns numpy arrays `eps1` [G], `eps2` [G], `loss` [B, G, G] with
    loss[b, i, j] at (eps1[i], eps2[j]), and `loss_along_gradient` / `loss_along_other`
    (the two edges) for quick reading.
    """
    x = _as_batch(x)
    y = _labels(y, x)
    g = _input_grad(model, x, y).sign()
    if isinstance(other_direction, nn.Module):
        other = _input_grad(other_direction, x, y)
    else:
        other = torch.as_tensor(other_direction, device=x.device, dtype=x.dtype)
        other = _as_batch(other).expand_as(x)
    g_perp = _orthogonal_signed(g, other).view_as(x)
    steps = torch.linspace(0.0, float(eps), grid, dtype=torch.float64)
    e1, e2 = torch.meshgrid(steps, steps, indexing="ij")
    coef1 = e1.flatten().to(x.dtype).to(x.device)
    coef2 = e2.flatten().to(x.dtype).to(x.device)
    losses = torch.empty(len(x), grid * grid)
    per = max(1, batch_size // len(x))  # grid points per forward batch
    shape = (1, -1) + (1,) * (x.dim() - 1)
    for j in range(0, grid * grid, per):
        c1, c2 = coef1[j:j + per].view(shape), coef2[j:j + per].view(shape)
        pts = x[:, None] + c1 * g[:, None] + c2 * g_perp[:, None]  # [B, P, C, H, W]
        if clip:
            pts = pts.clamp(0.0, 1.0)
        n_pts = pts.shape[1]
        lb = _losses(model, pts.flatten(0, 1), y.repeat_interleave(n_pts), batch_size)
        losses[:, j:j + n_pts] = lb.view(len(x), n_pts)
    loss = losses.view(len(x), grid, grid).numpy()
    return {
        "eps1": steps.numpy(), "eps2": steps.numpy(), "loss": loss, "eps": float(eps), "clip": clip,
        "loss_along_gradient": loss[:, :, 0].mean(0), "loss_along_other": loss[:, 0, :].mean(0),
        "orthogonal": bool((g.flatten(1) * g_perp.flatten(1)).sum(1).eq(0).all()),
    }
