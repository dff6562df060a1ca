"""Appendix E: l-inf gradient-aligned adversarial subspaces (Lemma 7, Figure 2).

- `regular_hadamard`      regular Hadamard matrices of orders 4, 36, 100 and their
                          Kronecker products (with `_williamson_search`, the search that
                          found the order-100 Williamson sequences).
- `aligned_subspace`      Lemma 7: k orthogonal {-1, 0, 1} directions aligned with a gradient.
- `count_adversarial_directions`   Figure 2: how many of them are adversarial per point,
                          drawn by `enspipe.report.plots.plot_subspace`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from enspipe.diagnostics.measures import _as_batch, _input_grad, _labels
from enspipe.util.errors import ConfigError

__all__ = ["SUBSPACE_KS", "aligned_subspace", "count_adversarial_directions", "regular_hadamard"]

SUBSPACE_KS = (4, 16, 36, 64, 100)  # the orders of Appendix E ("k <= 100 directions")


# The order-4 regular Hadamard matrix of the brief: rows orthogonal, every row sums to 2.
_H4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.int64)

# Order 100: four symmetric circulant +-1 matrices A, B, C, D of order 25 with
# AA^T + BB^T + CC^T + DD^T = 100 I (Williamson matrices) and row sums 5, 5, 5, -5.
# Found by an exhaustive meet-in-the-middle search over symmetric sequences (792 per row
# sum; pairs matched on their summed periodic autocorrelations), the same search that
# `_williamson_search` runs; `tests/diagnostics/test_diagnostics.py` re-checks the matrix they give.
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
