"""PNG figures shared by `diagnose` (which draws them beside its JSON) and `report` (which
redraws missing ones from that JSON): loss surfaces (Figures 1, 4, 5), adversarial
subspaces (Figure 2) and the transfer matrix (Table 1 as a heatmap).

Every function takes plain data (numpy arrays or the same lists read back from JSON), so
no torch is imported here. Figures are drawn on matplotlib's Agg canvas without touching
pyplot's global state, and written atomically: never a half-written PNG.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from enspipe.util.fileio import atomic_target

__all__ = ["new_figure", "plot_loss_surface", "plot_subspace", "plot_transfer_heatmap", "save_png"]


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without touching pyplot's global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write the PNG atomically: never a half-written figure."""
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def plot_loss_surface(surface: Mapping[str, Any], path: str | os.PathLike, *, points: int = 3,
                      log: bool = False, title: str | None = None) -> Path:
    """A PNG of 3D loss surfaces (one panel per point, at most `points`), as Figures 1/4/5.
    `log=True` plots log10(loss), as Figure 5 does for A_adv. Accepts the dict of
    `diagnostics.loss_surface` or the same data read back from JSON (lists)."""
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3d projection)

    e1, e2 = np.asarray(surface["eps1"], float), np.asarray(surface["eps2"], float)
    loss = np.asarray(surface["loss"], float)
    loss = loss[None] if loss.ndim == 2 else loss
    n = max(1, min(points, len(loss)))
    fig = new_figure(4.2 * n, 4.0)
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
    return save_png(fig, path)


def _eps_label(e: float) -> str:
    """16/256 reads better than 0.0625 for the ImageNet budgets."""
    n = e * 256
    return f"ε={round(n)}/256" if abs(n - round(n)) < 1e-6 and n <= 32 else f"ε={e:g}"


def plot_subspace(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Figure 2 as a PNG: share of points with at least k orthogonal adversarial directions
    against k, one line per eps. `results` is one `count_adversarial_directions` result or a
    mapping model name -> result (one panel per model, as Figure 2's v3 / v3adv / ens3)."""
    panels = {"": results} if "curves" in results else dict(results)
    fig = new_figure(4.2 * max(1, len(panels)), 3.6)
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
    return save_png(fig, path)


def plot_transfer_heatmap(rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float | None]],
                          path: str | os.PathLike, *, title: str = "") -> Path:
    """A PNG heatmap of a transfer matrix (rows targets, columns sources, error rates in
    [0, 1] or None), shown in %; a cell whose source is its target (white-box) outlined."""
    from matplotlib.patches import Rectangle

    grid = np.array([[np.nan if v is None else 100 * v for v in r] for r in values], dtype=float).reshape(
        len(rows), len(cols))
    fig = new_figure(1.2 + 0.9 * max(1, len(cols)), 1.0 + 0.6 * max(1, len(rows)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    for i, t in enumerate(rows):
        for j, s in enumerate(cols):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] > 60 else "black")
            if s == t:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_png(fig, path)
