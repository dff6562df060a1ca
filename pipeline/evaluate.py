"""Evaluation: clean, white-box and black-box (transfer) error of trained models (§4.1).

For every batch of the test set:
  - each target model's clean prediction;
  - white-box: each attack crafted on the target itself;
  - black-box: each attack crafted on each source (holdout) model, and optionally on the
    ensemble of all sources (average logits), then transferred to every target.
Random attacks get a generator seeded by (seed, batch), so every target sees the same
x_adv from a source. Errors come with 95% Wilson intervals; top-5 is added when K > 10.
Each attack runs with its defaults (see `enspipe.attacks`) unless `attack_options` sets a
parameter ("rand_fgsm.alpha=0.05"); results.json records every parameter of every attack.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from enspipe import attacks
from enspipe.config import OptionError, option
from enspipe.data import create_dataset
from enspipe.errors import AttackError, ConfigError
from enspipe.models import BINARIZED_MASKED_PREFIX, BINARIZED_PREFIX, load_model_for
from enspipe.paths import check_output
from enspipe.runtime import log_line, progress, resolve_device, versions, write_json
from enspipe.stats import wilson_interval

__all__ = ["EvalConfig", "evaluate", "model_label", "wilson_interval"]


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; saved beside the results."""

    models: tuple[str, ...]
    dataset: str = "digits"
    split: str = "test"
    data_root: str | None = None
    limit: int | None = None
    image_size: int | None = None
    attacks: tuple[str, ...] = ("fgsm",)
    eps: float = 0.3
    sources: tuple[str, ...] = ()
    ensemble_source: bool = False
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    names: dict[str, str] = field(default_factory=dict)  # model spec -> name shown in tables
    attack_options: tuple[str, ...] = option(
        (), flag="--attack-option", metavar="ATTACK.KEY=VALUE",
        help="Set one parameter of one attack, e.g. rand_fgsm.alpha=0.05, pgd_cw.kappa=50, "
             "pgd.steps=100 (repeatable; defaults: the paper's, else the reference code's).")

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("evaluate needs at least one --model")
        for a in self.attacks:
            if a not in attacks.ATTACKS:
                raise ConfigError(f"unknown attack {a!r}: use one of {', '.join(attacks.ATTACKS)}")
        if not (0 < self.eps <= 1) or math.isnan(self.eps):
            raise ConfigError(f"--eps must be in (0, 1], not {self.eps}")
        if self.ensemble_source and len(self.sources) < 2:
            raise ConfigError("--ensemble-source needs at least two --sources")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, not {self.batch_size}")
        object.__setattr__(self, "attack_options", tuple(self.attack_options))
        self.options()  # checked now: a bad option fails before any model is loaded

    def options(self) -> dict[str, dict[str, Any]]:
        """{attack: {parameter: value}} from `attack_options`, each checked by its attack."""
        try:
            return attacks.parse_attack_options(self.attack_options, eps=self.eps, attacks=self.attacks)
        except AttackError as e:
            raise OptionError("attack_options", str(e)) from None

    def attack_params(self) -> dict[str, dict[str, Any]]:
        """Every parameter each attack runs with (its defaults resolved), as results.json records."""
        opts = self.options()
        return {a: attacks.attack_params(a, eps=self.eps, **opts.get(a, {})) for a in self.attacks}


def model_label(spec: str) -> str:
    """A short name for a model given as a run dir or checkpoint path."""
    p = Path(spec)
    return p.name if p.is_dir() else (p.parent.name if p.suffix in (".json", ".safetensors") else spec)


class _Counter:
    def __init__(self, topk: bool):
        self.n = 0
        self.top1 = 0
        self.top5 = 0 if topk else None

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.n += len(y)
        self.top1 += int((logits.argmax(1) != y).sum())
        if self.top5 is not None:
            top5 = logits.topk(5, dim=1).indices
            self.top5 += int((top5 != y[:, None]).all(1).sum())

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"errors": self.top1, "n": self.n, "error": self.top1 / max(self.n, 1),
                               "ci95": wilson_interval(self.top1, self.n)}
        if self.top5 is not None:
            out["top5_error"] = self.top5 / max(self.n, 1)
            out["top5_ci95"] = wilson_interval(self.top5, self.n)
        return out


def evaluate(cfg: EvalConfig, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the evaluation; write `results.json` into `out` (a directory or a .json path)."""
    if out is not None:
        check_output(out)  # never inside a store
    device = resolve_device(cfg.device)
    data = create_dataset(cfg.dataset, split=cfg.split, limit=cfg.limit, data_root=cfg.data_root,
                          image_size=cfg.image_size)

    def label(spec: str) -> str:
        if spec in cfg.names:
            return cfg.names[spec]
        # Appendix C.1's input-binarization baseline: attacked through it (BPDA), or masked.
        for prefix, tag in ((BINARIZED_PREFIX, "+binarized"), (BINARIZED_MASKED_PREFIX, "+binarized-masked")):
            if spec.startswith(prefix):
                return model_label(spec.removeprefix(prefix)) + tag
        return model_label(spec)

    targets = {label(s): load_model_for(s, data, device) for s in cfg.models}
    sources = {label(s): load_model_for(s, data, device) for s in cfg.sources}
    if cfg.ensemble_source:
        sources["ensemble(" + "+".join(sources) + ")"] = attacks.Ensemble(list(sources.values())).eval()
    topk = data.num_classes > 10
    clean = {t: _Counter(topk) for t in targets}
    white = {t: {a: _Counter(topk) for a in cfg.attacks} for t in targets}
    black = {t: {s: {a: _Counter(topk) for a in cfg.attacks} for s in sources} for t in targets}

    params = cfg.attack_params()
    nb = math.ceil(len(data) / cfg.batch_size)
    # Progress: a bar naming the attack on a terminal; in a log, a line every 30 s and one per attack.
    spent = dict.fromkeys(cfg.attacks, 0.0)
    bar = progress(range(nb), desc="evaluate", unit="batch", min_interval=30)
    for b in bar:
        sl = slice(b * cfg.batch_size, min(len(data), (b + 1) * cfg.batch_size))
        x = data.images(sl).to(device)
        y = torch.as_tensor(data.labels[sl], device=device)
        with torch.no_grad():
            for t, m in targets.items():
                clean[t].add(m(x), y)
        for a in cfg.attacks:
            bar.set_postfix(attack=a)
            started = time.perf_counter()
            # Seeded per batch, fresh on every call: every target and source draws the same noise.
            attack = attacks.create_attack(a, seed=cfg.seed * 1_000_003 + b, **params[a])
            for t, m in targets.items():
                x_adv = attack(m, x, y)
                with torch.no_grad():
                    white[t][a].add(m(x_adv), y)
            for s, src in sources.items():
                x_adv = attack(src, x, y)
                with torch.no_grad():
                    for t, m in targets.items():
                        black[t][s][a].add(m(x_adv), y)
            spent[a] += time.perf_counter() - started
    for a in cfg.attacks:
        errors = ", ".join(f"{t} {100 * white[t][a].result()['error']:.1f}%" for t in targets)
        log_line(f"evaluate {a}: {len(data)} samples in {spent[a]:.1f} s; white-box error {errors}"
                 + (f"; transferred from {len(sources)} source(s)" if sources else ""))

    results: dict[str, Any] = {"config": {**asdict(cfg), "models": list(cfg.models), "sources": list(cfg.sources),
                                          "attacks": list(cfg.attacks), "attack_options": list(cfg.attack_options)},
                               "attack_params": params,
                               "dataset": data.identity(), "versions": versions(), "models": {}}
    for t in targets:
        bb = {s: {a: black[t][s][a].result() for a in cfg.attacks} for s in sources}
        # A source that is the target itself is a white-box attack (the transfer matrix's
        # diagonal), not a black-box one.
        flat = [r["error"] for s, per in bb.items() if s != t for r in per.values()]
        results["models"][t] = {
            "spec": cfg.models[list(targets).index(t)],
            "clean": clean[t].result(),
            "whitebox": {a: white[t][a].result() for a in cfg.attacks},
            "blackbox": bb,
            "blackbox_max": max(flat) if flat else None,
            "blackbox_avg": sum(flat) / len(flat) if flat else None,
        }
    if out is not None:
        path = Path(out)
        path = path if path.suffix == ".json" else path / "results.json"
        write_json(path, results)
        results["path"] = str(path)
    return results
