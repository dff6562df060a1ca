"""Gradient-masking diagnostics: the evidence of §3.3 and §4 of the paper.

A model that has learned to mask its gradient (the "degenerate minimum" of §3.3) looks
robust to single-step attacks while remaining vulnerable to iterative and transferred
ones. The measurements here show it:

- `approximation_ratio`   how much of the (iteratively lower-bounded) optimal loss of the
                          inner maximisation of eq. 1 a single-step attack reaches (§4,
                          Appendix C.2, Table 6).
- `perturbation_cosine`   cosine of the single- and multi-step perturbations (§4).
- `input_gradient_norm`   mean l1 / l2 norm of grad_x L: masking is not a flat loss (§4).
- `loss_surface`          the loss on x + e1*sign(g) + e2*g_perp (Figures 1, 4, 5), with
                          `plot_loss_surface`.
- `regular_hadamard`, `aligned_subspace`, `count_adversarial_directions`, `plot_subspace`:
                          the l-inf gradient-aligned adversarial subspaces of Appendix E
                          (Lemma 7, Figure 2).
- `Binarized`             input binarization (Appendix C.1), a model whose gradient is zero
                          almost everywhere: a gradient-masking baseline for `evaluate`.
- `diagnose` / `run_diagnose`   all of the above for several models, written to
                          `diagnostics.json` + PNG figures.

Losses are the cross-entropy with the true label, the loss of the inner maximisation of
eq. 1, whichever attack produced the point (a Step-LL point is scored on y_true too).
Models are used in whatever train/eval mode the caller left them; the stage entry points
(`diagnose`, `run_diagnose`) put them in eval mode.
"""
from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enspipe import attacks
from enspipe.errors import ConfigError

DIAGNOSTICS_FORMAT = "enspipe-diagnostics/1"
SINGLE_STEP = ("fgsm", "step_ll", "rand_fgsm", "rand_step_ll")
ITERATIVE = ("iter_fgsm", "iter_ll", "pgd", "pgd_cw")
SUBSPACE_KS = (4, 16, 36, 64, 100)  # the orders of Appendix E ("k <= 100 directions")


# ----------------------------------------------------------------------------------------
# small shared helpers


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


def _run_attack(name: str, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int,
                generator: torch.Generator) -> Tensor:
    """Call attack `name` with only the parameters it takes (steps, generator)."""
    fn = attacks.ATTACKS[name]
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"eps": eps}
    if "steps" in params:
        kwargs["steps"] = steps
    if "generator" in params:
        kwargs["generator"] = generator
    return fn(model, x, y, **kwargs)


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
    gen = torch.Generator().manual_seed(seed)  # random starts (PGD, R+FGSM) are reproducible
    out: dict[str, list[Tensor]] = {"clean": [], "single": [], "iterative": [], "cosine": []}
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        x_s = _run_attack(single, model, xb, yb, eps=eps, steps=steps, generator=gen)
        x_i = _run_attack(iterative, model, xb, yb, eps=eps, steps=steps, generator=gen)
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


def _new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without touching pyplot's global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike) -> Path:
    """Write the PNG atomically: never a half-written figure."""
    from enspipe.fileio import atomic_target

    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def plot_loss_surface(surface: Mapping[str, Any], path: str | os.PathLike, *, points: int = 3,
                      log: bool = False, title: str | None = None) -> Path:
    """A PNG of 3D loss surfaces (one panel per point, at most `points`), as Figures 1/4/5.
    `log=True` plots log10(loss), as Figure 5 does for A_adv. Accepts the dict of
    `loss_surface` or the same data read back from JSON (lists)."""
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3d projection)

    e1, e2 = np.asarray(surface["eps1"], float), np.asarray(surface["eps2"], float)
    loss = np.asarray(surface["loss"], float)
    loss = loss[None] if loss.ndim == 2 else loss
    n = max(1, min(points, len(loss)))
    fig = _new_figure(4.2 * n, 4.0)
    E1, E2 = np.meshgrid(e1, e2, indexing="ij")
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1, projection="3d")
        z = np.log10(np.maximum(loss[i], 1e-12)) if log else loss[i]
        ax.plot_surface(E1, E2, z, cmap="viridis", linewidth=0, antialiased=True)
        ax.set_xlabel("ε1 (own gradient)")
        ax.set_ylabel("ε2 (other model)")
        ax.set_zlabel("log10 loss" if log else "loss")
        ax.set_title(f"point {i}")
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


# ----------------------------------------------------------------------------------------
# Appendix E: regular Hadamard matrices and gradient-aligned adversarial subspaces

# The order-4 regular Hadamard matrix of the brief: rows orthogonal, every row sums to 2.
_H4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.int64)

# Order 100: four symmetric circulant +-1 matrices A, B, C, D of order 25 with
# AA^T + BB^T + CC^T + DD^T = 100 I (Williamson matrices) and row sums 5, 5, 5, -5.
# Found by an exhaustive meet-in-the-middle search over symmetric sequences (792 per row
# sum; pairs matched on their summed periodic autocorrelations), the same search that
# `_williamson_search` runs; `tests/test_diagnostics.py` re-checks the matrix they give.
# (No abelian Menon difference set of order 100 exists (McFarland 1990), hence the array.)
_WILLIAMSON_25 = (
    "+++-+--+++--++--+++--+-++",
    "++-+--++-+-++++-+-++--+-+",
    "++++++---+-+--+-+---+++++",
    "-+---++-++------++-++---+",
)


def _circulant(row: Sequence[int]) -> np.ndarray:
    v = np.asarray(row, dtype=np.int64)
    return np.stack([np.roll(v, i) for i in range(len(v))])


def _williamson_regular(seqs: Sequence[str]) -> np.ndarray:
    """A regular Hadamard matrix of order 4n from Williamson matrices with row sums (a, a, a, -a).

    The Williamson array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]
    is Hadamard for symmetric circulants with sum A_i^2 = 4n I. With row sums a, b, c, d
    its block rows sum to a+b+c+d, a-b+c-d, a-b-c+d, a+b-c-d; for (b, c, d) = (a, a, -a)
    that is 2a, 2a, -2a, 2a, and negating the third block row (rows stay orthogonal)
    makes every row sum 2a = sqrt(4n) when a^2 = n.
    """
    A, B, C, D = (_circulant([1 if ch == "+" else -1 for ch in s]) for s in seqs)
    W = np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]])
    n = len(A)
    W[2 * n:3 * n] *= -1
    return W


def _latin_square_regular(n: int) -> np.ndarray:
    """A regular Hadamard matrix of order n^2 (n = 2u, u = 3 here: order 36).

    The Latin square graph L_3(n) of the cyclic Latin square L[r][c] = r + c mod n (cells
    adjacent when they share a row, a column or a symbol) is strongly regular with
    parameters (n^2, 3(n-1), n, 6). For n = 6 that is (36, 15, 6, 6): lambda = mu = 6, so
    A^2 = 9 I + 6 J, A is the incidence matrix of a symmetric (36, 15, 6) Menon design, and
    H = J - 2A has H H^T = 36 I and row sums 36 - 30 = 6 = sqrt(36).
    """
    r, c = np.divmod(np.arange(n * n), n)
    s = (r + c) % n
    adj = (r[:, None] == r) | (c[:, None] == c) | (s[:, None] == s)
    np.fill_diagonal(adj, False)
    return 1 - 2 * adj.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _base_hadamard(order: int) -> np.ndarray:
    if order == 4:
        return _H4
    if order == 36:
        return _latin_square_regular(6)
    if order == 100:
        return _williamson_regular(_WILLIAMSON_25)
    raise ValueError(order)  # pragma: no cover - guarded by regular_hadamard


@functools.lru_cache(maxsize=None)
def _regular_hadamard(k: int) -> np.ndarray:
    # Kronecker products of regular Hadamard matrices are regular Hadamard: (H1 x H2)
    # (H1 x H2)^T = k1 k2 I and row sums multiply (sqrt k1 * sqrt k2). So every product of
    # 4s, 36s and 100s is reachable: 4, 16, 36, 64, 100, 144, 256, 400, 576, ...
    for base in (100, 36, 4):
        if k == base:
            return _base_hadamard(base)
        if k % base == 0:
            try:
                rest = _regular_hadamard(k // base)
            except ValueError:
                continue
            return np.kron(_base_hadamard(base), rest)
    raise ValueError(k)


def regular_hadamard(k: int) -> np.ndarray:
    """A regular Hadamard matrix of order k (int64 +-1, H H^T = k I, every row sum sqrt(k)).

    Built orders: 4 (the matrix above), 36 (Latin square graph / (36,15,6) Menon design),
    100 (Williamson array) and their Kronecker products: 16, 64, 144, 256, 400, ...
    Any other k raises ConfigError (regular orders are 4u^2; not all are built here).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"Hadamard order must be a positive integer, not {k!r}")
    try:
        H = _regular_hadamard(int(k))
    except ValueError:
        raise ConfigError(
            f"no regular Hadamard matrix of order {k} is built here (orders are products of 4, 36 "
            "and 100: 4, 16, 36, 64, 100, 144, ...)") from None
    H = H.copy()
    H.setflags(write=False)
    return H


def _williamson_search(n: int, row_sum: int) -> tuple[str, str, str, str] | None:
    """Find symmetric circulant Williamson sequences of odd order n with row sums
    (s, s, s, -s): the search that produced `_WILLIAMSON_25` (about a second for n = 25).

    Symmetric sequences are fixed by their first (n+1)/2 entries; the four periodic
    autocorrelations must sum to 0 at every shift 1..(n-1)/2. Pairs (A, B) are hashed on
    their summed autocorrelations and matched against pairs (C, D).
    """
    import itertools

    h = (n - 1) // 2

    def sequences(total: int) -> np.ndarray:
        out = []
        for bits in itertools.product((1, -1), repeat=h):
            x0 = total - 2 * sum(bits)
            if x0 in (1, -1):
                out.append([x0, *bits, *bits[::-1]])
        return np.array(out, dtype=np.int64).reshape(-1, n)

    def paf(S: np.ndarray) -> np.ndarray:
        return np.stack([(S * np.roll(S, -s, axis=1)).sum(1) for s in range(1, h + 1)], 1)

    plus, minus = sequences(row_sum), sequences(-row_sum)
    if not len(plus) or not len(minus):
        return None
    pp, pm = paf(plus), paf(minus)
    seen: dict[bytes, int] = {}
    for i, row in enumerate((pp[:, None] + pp[None]).reshape(-1, h)):
        seen.setdefault(row.tobytes(), i)
    for j, row in enumerate((pp[:, None] + pm[None]).reshape(-1, h)):
        i = seen.get((-row).tobytes())
        if i is not None:
            a, b = divmod(i, len(plus))
            c, d = divmod(j, len(minus))
            seqs = (plus[a], plus[b], plus[c], minus[d])
            return tuple("".join("+" if v > 0 else "-" for v in s) for s in seqs)  # type: ignore[return-value]
    return None


def _aligned_batch(g: Tensor, k: int, generator: torch.Generator | None, permute: bool = True) -> Tensor:
    """Lemma 7 for a batch of flattened gradients g [B, d]: directions [B, k, d] in {-1, 0, 1}."""
    B, d = g.shape
    m = d // k
    if m == 0:
        raise ConfigError(f"{k} orthogonal directions need at least {k} input dimensions, not {d}")
    H = torch.tensor(regular_hadamard(k), dtype=g.dtype, device=g.device)  # a copy: the array is read-only
    # Row i of H_k repeated d/k times; the d mod k positions left over are zero (the proof's
    # padding), so every column of H appears exactly m times and the rows stay orthogonal.
    pattern = torch.zeros(k, d, dtype=g.dtype, device=g.device)
    pattern[:, :m * k] = H.repeat(1, m)
    if permute:
        # "we apply our construction to a random permutation of the signed gradient": the
        # pattern's position p lands on coordinate perm[p]. Drawn on the CPU (seeded).
        perm = torch.rand(B, d, generator=generator).argsort(dim=1).to(g.device)
        r = pattern[:, perm].permute(1, 0, 2)  # [B, k, d]: r[b, :, j] = pattern[:, perm[b, j]]
    else:
        r = pattern.expand(B, k, d)
    # sign(g) with sign(0) = +1: the lemma's vectors are in {-1, 1}^d, and a zero here would
    # break orthogonality (the columns of H would no longer appear equally often).
    s = torch.where(g >= 0, 1.0, -1.0).to(g.dtype)
    return r * s[:, None, :]


def aligned_subspace(g: Tensor, k: int, *, generator: torch.Generator | None = None,
                     permute: bool = True) -> Tensor:
    """Lemma 7: k mutually orthogonal directions r_1..r_k, shape [k, *g.shape], aligned with g.

    r_i is row i of the regular Hadamard matrix H_k repeated d/k times (the last d mod k
    coordinates zero), laid on a random permutation of the coordinates and multiplied by
    sign(g). With m = floor(d/k) and s = sign(g) (sign(0) taken as +1):
      - r_i in {-1, 0, 1}^d and r_i . r_j = m k [i == j]  (orthogonal),
      - s . r_i = m sqrt(k), i.e. d / sqrt(k) when k divides d (the lemma's
        sign(g)^T r_i = d k^{-1/2}, tight by Lemma 6),
      - E_perm[g . r_i] = (m k / d) ||g||_1 / sqrt(k), i.e. ||g||_1 / sqrt(k) when k | d;
        and, because H_k's columns also sum to sqrt(k), the mean over i of g . r_i equals
        ||g on the used coordinates||_1 / sqrt(k) for every permutation.
    Scale by eps for an l-inf perturbation of norm eps.
    """
    flat = g.detach().reshape(1, -1)
    return _aligned_batch(flat, k, generator, permute)[0].reshape(k, *g.shape)


def count_adversarial_directions(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | Sequence[float],
                                 ks: Sequence[int] = SUBSPACE_KS, only_correct: bool = True, seed: int = 0,
                                 batch_size: int = 512) -> dict[str, Any]:
    """Figure 2: how many orthogonal adversarial directions each point has.

    For each point (by default only the correctly classified ones, as in the paper) and
    each order k in `ks`, the k directions of `aligned_subspace` for g = grad_x L(h(x),
    y_true) are scaled by eps, added to x and clipped to [0, 1]; n_k(x) counts those that
    are misclassified. Each set is orthogonal, so N(x) = max_k n_k(x) orthogonal
    adversarial directions were found ("we limit our search to k <= 100"). Returned per
    eps: `share_at_least[j]` = share of points with N(x) >= j + 1 for j + 1 = 1..max(ks)
    (Figure 2's curve), N(x) per point, and per order k the mean share of its k directions
    that are adversarial. Orders above the input dimension are skipped (listed).
    """
    x = _as_batch(x)
    y = _labels(y, x)
    eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    d = x[0].numel()
    used = sorted({int(k) for k in ks if k <= d})
    skipped = sorted({int(k) for k in ks if k > d})
    for k in used:
        regular_hadamard(k)  # fail on an unbuilt order before any compute
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    keep = pred.eq(y) if only_correct else torch.ones_like(y, dtype=torch.bool)
    xs, ys = x[keep], y[keep]
    gen = torch.Generator().manual_seed(seed)
    kmax = max(used) if used else 0
    counts = {e: {k: torch.zeros(len(xs), dtype=torch.long) for k in used} for e in eps_list}
    per_chunk = max(1, batch_size // max(kmax, 1))  # points per chunk: one forward of <= batch_size
    for i in range(0, len(xs) if used else 0, per_chunk):
        xb, yb = xs[i:i + per_chunk], ys[i:i + per_chunk]
        g = _input_grad(model, xb, yb).flatten(1)
        for k in used:
            r = _aligned_batch(g, k, gen).view(len(xb), k, *xb.shape[1:])
            for e in eps_list:
                x_adv = (xb[:, None] + e * r).clamp(0.0, 1.0).flatten(0, 1)
                with torch.no_grad():
                    wrong = model(x_adv).argmax(1).ne(yb.repeat_interleave(k)).view(len(xb), k)
                counts[e][k][i:i + len(xb)] = wrong.sum(1).cpu()
    curves = []
    for e in eps_list:
        if used and len(xs):
            n_dirs = torch.stack([counts[e][k] for k in used]).amax(0)
            share = [float((n_dirs >= j).double().mean()) for j in range(1, kmax + 1)]
        else:
            n_dirs, share = torch.zeros(0, dtype=torch.long), [0.0] * kmax
        curves.append({
            "eps": e,
            "share_at_least": share,
            "directions": n_dirs.tolist(),
            "mean_adversarial_share": {str(k): float(counts[e][k].double().mean() / k) if len(xs) else 0.0
                                       for k in used},
        })
    return {"ks": used, "skipped_ks": skipped, "n_points": int(len(xs)), "n_total": int(len(x)),
            "only_correct": only_correct, "k": list(range(1, kmax + 1)), "curves": curves}


def _eps_label(e: float) -> str:
    """16/256 reads better than 0.0625 for the ImageNet budgets."""
    n = e * 256
    return f"ε={round(n)}/256" if abs(n - round(n)) < 1e-6 and n <= 32 else f"ε={e:g}"


def plot_subspace(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Figure 2 as a PNG: share of points with at least k orthogonal adversarial directions
    against k, one line per eps. `results` is one `count_adversarial_directions` result or a
    mapping model name -> result (one panel per model, as Figure 2's v3 / v3adv / ens3)."""
    panels = {"": results} if "curves" in results else dict(results)
    fig = _new_figure(4.2 * max(1, len(panels)), 3.6)
    for i, (name, res) in enumerate(panels.items()):
        ax = fig.add_subplot(1, max(1, len(panels)), i + 1)
        for curve in res["curves"]:
            ks = range(1, len(curve["share_at_least"]) + 1)
            ax.plot(list(ks), curve["share_at_least"], label=_eps_label(curve["eps"]))
        ax.set_xlabel("number of orthogonal adversarial directions k")
        ax.set_ylabel("share of points with ≥ k")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{name} (n={res.get('n_points', '?')})" if name else f"n={res.get('n_points', '?')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save_png(fig, path)


# ----------------------------------------------------------------------------------------
# Appendix C.1: input binarization, a gradient-masking baseline


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


# ----------------------------------------------------------------------------------------
# the stage: every measurement for several models, written to out_dir


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _round(a: Any, digits: int = 6) -> Any:
    """Lists of floats with `digits` significant digits: readable, small JSON."""
    arr = np.asarray(a, dtype=float)
    return [float(f"{v:.{digits}g}") for v in arr.ravel()] if arr.ndim == 1 else [_round(r, digits) for r in arr]


def diagnose(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, *, eps: float,
             other: nn.Module | None = None, out_dir: str | os.PathLike, other_name: str = "other",
             single: str = "fgsm", iterative: str = "pgd", steps: int = 40, grid: int = 21,
             surface_points: int = 3, ks: Sequence[int] = SUBSPACE_KS,
             subspace_eps: Sequence[float] | None = None, subspace_points: int | None = None,
             seed: int = 0, batch_size: int = 256, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run every diagnostic on the batch (x, y) for each model; write `diagnostics.json` and PNGs.

    Per model: approximation ratio and perturbation cosine (`single` vs `iterative`, one
    attack pass), input-gradient norms, the loss surface of the first `surface_points`
    points along the model's signed gradient and `other`'s (called `other_name`; when
    `other` is None, the next model of `models`; with a single model, a seeded random sign
    vector), and the adversarial subspace counts at `subspace_eps` (default
    eps * (4, 10, 16)/16, Figure 2's ratios) on the first `subspace_points` points (all by
    default). Models are put in eval mode. Returns the JSON content plus `path`.
    """
    from enspipe.runtime import versions, write_json

    _check_attacks(single, iterative)
    if not models:
        raise ConfigError("diagnose needs at least one model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = _as_batch(x)
    y = _labels(y, x)
    for m in [*models.values(), *([other] if other is not None else [])]:
        m.eval()
    sub_eps = list(subspace_eps) if subspace_eps is not None else [eps * 4 / 16, eps * 10 / 16, eps]
    xs_sub = x if subspace_points is None else x[:subspace_points]
    ys_sub = y if subspace_points is None else y[:subspace_points]
    xs_surf, ys_surf = x[:surface_points], y[:surface_points]
    names = list(models)

    report: dict[str, Any] = {
        "format": DIAGNOSTICS_FORMAT, "eps": float(eps), "n": int(len(x)), "single": single,
        "iterative": iterative, "steps": steps, "seed": seed, **dict(meta or {}),
        "versions": versions(), "models": {}, "figures": {},
    }
    subspaces: dict[str, Any] = {}
    for i, (name, model) in enumerate(models.items()):
        pair = _attack_pair(model, x, y, eps=eps, single=single, iterative=iterative, steps=steps,
                            seed=seed, batch_size=batch_size)
        cos = pair["cosine"].double()
        if other is not None:
            direction, source = other, other_name
        elif len(names) > 1:
            source = names[(i + 1) % len(names)]
            direction = models[source]
        else:
            gen = torch.Generator().manual_seed(seed)
            direction = torch.randn(xs_surf.shape, generator=gen).sign().to(x.device)
            source = "random sign"
        surface = loss_surface(model, xs_surf, ys_surf, eps=eps, other_direction=direction, grid=grid)
        fig_surface = f"loss_surface-{_slug(name)}.png"
        plot_loss_surface(surface, out / fig_surface, points=surface_points,
                          title=f"{name}: loss on x + ε1·sign(g) + ε2·g⊥ (g⊥ from {source})")
        # subspace_points=0 skips the subspace count (the costliest measurement: one
        # forward per direction, sum(ks) directions per point and eps).
        subspace = None
        if len(xs_sub):
            subspace = count_adversarial_directions(model, xs_sub, ys_sub, eps=sub_eps, ks=ks, seed=seed,
                                                    batch_size=max(batch_size, max(ks)))
            subspaces[name] = subspace
        report["models"][name] = {
            "approximation_ratio": {**_ratio_from(pair), "single": single, "iterative": iterative},
            "cosine": {"mean": float(cos.mean()), "std": float(cos.std()) if len(cos) > 1 else 0.0},
            "gradient_norm": input_gradient_norm(model, x, y, batch_size=batch_size),
            "loss_surface": {"other": source, "eps1": _round(surface["eps1"]),
                             "eps2": _round(surface["eps2"]), "loss": _round(surface["loss"]),
                             "orthogonal": surface["orthogonal"]},
            **({"subspace": subspace} if subspace is not None else {}),
            "figures": {"loss_surface": fig_surface},
        }
    if subspaces:
        plot_subspace(subspaces, out / "subspace.png")
        report["figures"]["subspace"] = "subspace.png"
    path = write_json(out / "diagnostics.json", report)
    return {**report, "path": str(path)}


def _load_for_diagnose(spec: str | nn.Module, data: Any, device: torch.device) -> nn.Module:
    """A model from a spec (run dir, checkpoint, registry name; "binarized:SPEC" wraps it)."""
    from enspipe.models import resolve_model

    if isinstance(spec, nn.Module):
        return spec.to(device).eval()
    if spec.startswith("binarized:"):
        return Binarized(_load_for_diagnose(spec[len("binarized:"):], data, device)).eval()
    model = resolve_model(spec, num_classes=data.num_classes, input_size=data.geometry.shape)
    if tuple(model.config.input_size) != tuple(data.geometry.shape):
        raise ConfigError(f"model {spec} takes {model.config.input_size} input but the data is {data.geometry.shape}")
    return model.to(device).eval()


def run_diagnose(models: Mapping[str, str | nn.Module], *, other: str | nn.Module | None = None,
                 dataset: str = "digits", data_root: str | None = None, limit: int | None = 500,
                 eps: float | str = 0.3, out_dir: str | os.PathLike, device: str = "auto",
                 split: str = "test", image_size: int | None = None, **options: Any) -> Path:
    """The CLI/job entry point: load the models and the first `limit` test samples, run
    `diagnose`, return the path of `diagnostics.json`. `options` go to `diagnose`."""
    from enspipe.data import create_dataset
    from enspipe.runtime import resolve_device

    eps = attacks.parse_eps(eps) if isinstance(eps, str) else float(eps)
    dev = resolve_device(device)
    data = create_dataset(dataset, split=split, limit=limit, data_root=data_root, image_size=image_size)
    loaded = {name: _load_for_diagnose(spec, data, dev) for name, spec in models.items()}
    other_model = _load_for_diagnose(other, data, dev) if other is not None else None
    x = data.images(slice(0, len(data))).to(dev)
    y = torch.as_tensor(data.labels, device=dev)
    meta = {"dataset": data.identity(),
            "model_specs": {n: s if isinstance(s, str) else type(s).__name__ for n, s in models.items()},
            "other_spec": other if isinstance(other, str) or other is None else type(other).__name__}
    other_name = (Path(other).name or other) if isinstance(other, str) else "other"
    res = diagnose(loaded, x, y, eps=eps, other=other_model, other_name=other_name, out_dir=out_dir, meta=meta,
                   **options)
    return Path(res["path"])
