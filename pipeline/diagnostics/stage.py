"""The `diagnose` stage: every gradient-masking measurement for several models, written
to `diagnostics.json` plus PNG figures (`enspipe.report.plots`).

`diagnose` works on models and tensors in memory; `run_diagnose(DiagnoseConfig)` is the stage
(`enspipe.diagnose`, the CLI and the job runner call it) that loads models from specs
(`enspipe.models.load_model_for`, so "binarized:SPEC" works too) and the first samples of
a dataset's test split. Both put the models in eval mode.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from enspipe.diagnostics.hadamard import SUBSPACE_KS, count_adversarial_directions
from enspipe.diagnostics.measures import (
    _as_batch,
    _attack_pair,
    _check_attacks,
    _labels,
    _ratio_from,
    input_gradient_norm,
    loss_surface,
)
from enspipe.config import OptionError, config_to_dict
from enspipe.configs.diagnose import DiagnoseConfig
from enspipe.util.errors import ConfigError
from enspipe.util.naming import unique_labels
from enspipe.report.plots import plot_loss_surface, plot_subspace

__all__ = ["DIAGNOSTICS_FORMAT", "DiagnoseConfig", "diagnose", "run_diagnose"]

DIAGNOSTICS_FORMAT = "enspipe-diagnostics/1"


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
    from enspipe.util.runtime import progress, versions, write_json

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
    # One bar step (a log line when stderr is a file) per measurement of each model.
    bar = progress(total=len(models) * (4 if len(xs_sub) else 3), desc="diagnose", unit="diagnostic")
    for i, (name, model) in enumerate(models.items()):
        bar.set_postfix(model=name, measure=f"{single}/{iterative} ratio and cosine")
        pair = _attack_pair(model, x, y, eps=eps, single=single, iterative=iterative, steps=steps,
                            seed=seed, batch_size=batch_size)
        bar.update(1)
        bar.set_postfix(measure="gradient norm")
        grad_norm = input_gradient_norm(model, x, y, batch_size=batch_size)
        bar.update(1)
        bar.set_postfix(measure="loss surface")
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
        bar.update(1)
        # subspace_points=0 skips the subspace count (the costliest measurement: one
        # forward per direction, sum(ks) directions per point and eps).
        subspace = None
        if len(xs_sub):
            bar.set_postfix(measure="adversarial subspace")
            subspace = count_adversarial_directions(model, xs_sub, ys_sub, eps=sub_eps, ks=ks, seed=seed,
                                                    batch_size=max(batch_size, max(ks)))
            subspaces[name] = subspace
            bar.update(1)
        report["models"][name] = {
            "approximation_ratio": {**_ratio_from(pair), "single": single, "iterative": iterative},
            "cosine": {"mean": float(cos.mean()), "std": float(cos.std()) if len(cos) > 1 else 0.0},
            "gradient_norm": grad_norm,
            "loss_surface": {"other": source, "eps1": _round(surface["eps1"]),
                             "eps2": _round(surface["eps2"]), "loss": _round(surface["loss"]),
                             "orthogonal": surface["orthogonal"]},
            **({"subspace": subspace} if subspace is not None else {}),
            "figures": {"loss_surface": fig_surface},
        }
    bar.close()
    if subspaces:
        plot_subspace(subspaces, out / "subspace.png")
        report["figures"]["subspace"] = "subspace.png"
    path = write_json(out / "diagnostics.json", report)
    return {**report, "path": str(path)}


_OLD_KEYWORDS = {"out_dir": "out"}  # run_diagnose's keyword -> DiagnoseConfig field


def run_diagnose(cfg: DiagnoseConfig | Mapping[str, str | nn.Module], **old: Any) -> Any:
    """The diagnose stage: load `cfg.models` (named by `enspipe.util.naming.unique_labels`) and the
    first `cfg.limit` samples of the split, run `diagnose`, write `diagnostics.json` and the
    figures into `cfg.out`; return the JSON content plus its "path".

    The deprecated form `run_diagnose({name: spec or module}, other=..., out_dir=..., **options)`
    still works for one release and returns the path of `diagnostics.json`."""
    if isinstance(cfg, DiagnoseConfig):
        if old:
            raise TypeError(f"run_diagnose(cfg) takes no keywords; got {', '.join(old)}")
        labels = {**unique_labels(cfg.models), **cfg.names}
        return _run(cfg, {labels[m]: m for m in cfg.models}, cfg.other)
    warnings.warn("run_diagnose(models, other=..., out_dir=..., ...) is deprecated: pass a DiagnoseConfig",
                  DeprecationWarning, stacklevel=2)
    named: Mapping[str, str | nn.Module] = cfg
    other = old.pop("other", None)
    fields_ = {_OLD_KEYWORDS.get(k, k): v for k, v in old.items()}
    config = DiagnoseConfig(models=tuple(s for s in named.values() if isinstance(s, str)) or ("module",),
                            other=other if isinstance(other, str) else None, **fields_)
    return Path(_run(config, named, other)["path"])


def _run(cfg: DiagnoseConfig, named: Mapping[str, str | nn.Module], other: str | nn.Module | None) -> dict[str, Any]:
    from enspipe.data import create_dataset
    from enspipe.data.loader import batches
    from enspipe.models import check_weights, load_model_for
    from enspipe.paths import check_output
    from enspipe.util.runtime import resolve_device

    if cfg.out is None:
        raise OptionError("out", "is required: the directory for diagnostics.json")
    check_output(cfg.out)  # never inside a store
    specs = {"models": tuple(s for s in named.values() if isinstance(s, str)),
             "other": (other,) if isinstance(other, str) else ()}
    bare = check_weights(specs, weights=cfg.weights, pretrained=cfg.pretrained)
    dev = resolve_device(cfg.device)
    data = create_dataset(cfg.dataset, split=cfg.split, limit=cfg.limit, data_root=cfg.data_root,
                          image_size=cfg.image_size)

    def load(spec: str | nn.Module) -> nn.Module:
        # A model passed in (not a spec) is used as it is, on the device, in eval mode.
        if isinstance(spec, nn.Module):
            return spec.to(dev).eval()
        named_arch = spec in bare
        return load_model_for(spec, data, dev, weights=cfg.weights if named_arch else None,
                              pretrained=cfg.pretrained and named_arch)

    loaded = {name: load(spec) for name, spec in named.items()}
    other_model = load(other) if other is not None else None
    # Decoded by loader processes, batch by batch, not image by image here (PIL: diagnose keeps its pixels).
    workers = cfg.loader_workers  # None: from the cores (data.loader.open_loader)
    x = torch.cat([xb for _, xb, _ in batches(data, cfg.batch_size, dev, workers=workers)])
    y = torch.as_tensor(data.labels, device=dev)
    meta = {"dataset": data.identity(),
            "model_specs": {n: s if isinstance(s, str) else type(s).__name__ for n, s in named.items()},
            "other_spec": other if isinstance(other, str) or other is None else type(other).__name__,
            "config": config_to_dict(cfg)}
    other_name = (cfg.names.get(other) or Path(other).name or other) if isinstance(other, str) else "other"
    return diagnose(loaded, x, y, eps=cfg.eps, other=other_model, other_name=other_name, out_dir=cfg.out,
                    meta=meta, single=cfg.single, iterative=cfg.iterative, steps=cfg.steps, grid=cfg.grid,
                    surface_points=cfg.surface_points, subspace_points=cfg.subspace_points, seed=cfg.seed,
                    batch_size=cfg.batch_size)
