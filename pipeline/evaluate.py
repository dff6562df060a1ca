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
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from enspipe import attacks
from enspipe._callable import callable_stage
from enspipe.attacks import parse_eps
from enspipe.config import OptionError, check, check_fraction, config_to_dict, normalize, option
from enspipe.data import create_dataset
from enspipe.errors import AttackError
from enspipe.models import BINARIZED_MASKED_PREFIX, BINARIZED_PREFIX, check_weights, load_model_for
from enspipe.naming import model_label, unique_labels
from enspipe.paths import check_output
from enspipe.runtime import _progress_mode, log_line, progress, resolve_device, versions, write_json
from enspipe.stats import wilson_interval

__all__ = ["EvalConfig", "evaluate", "model_label", "unique_labels", "wilson_interval"]


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and where the results go; saved beside the results.

    Each field is a flag of `enspipe evaluate` and (where a job can set it) a key of a job
    spec's `[evaluate.NAME]` table, with the default and help declared here once."""

    models: tuple[str, ...] = option(flag="--model", metavar="MODEL", job=False,
                                     help="A target: a run dir or checkpoint, or an architecture with --weights / "
                                     "--pretrained (repeat for several targets).")
    dataset: str = option("digits", job=False, help="digits, mnist, cifar10, imagefolder:PATH or wds:PATTERN.")
    split: str = option("test", job=False, help="The dataset split to evaluate on.")
    data_root: str | None = option(None, path="dir", job=False,
                                   help="Where datasets live (else $ENSPIPE_DATA, else ~/.cache/enspipe/data).")
    limit: int | None = option(None, minimum=1, help="Use only the first N samples of the canonical order.")
    image_size: int | None = option(None, minimum=8, job=False,
                                    help="Resize (imagefolder: resize + center-crop) images to this square size.")
    attacks: tuple[str, ...] = option(("fgsm",), sep=",", metavar="ATTACKS",
                                      help="Comma list (or repeat) of " + ", ".join(attacks.ATTACKS) + ".")
    eps: float = option(0.3, parse=parse_eps, metavar="EPS", help="l-inf budget: 0.3 or 16/256.")
    sources: tuple[str, ...] = option((), metavar="MODEL", help="Holdout model(s) whose attacks transfer to the "
                                      "targets (black-box).")
    ensemble_source: bool = option(False, help="Also attack with the ensemble of all --sources.")
    batch_size: int = option(256, minimum=1, help="Samples per batch.")
    seed: int = option(0, help="Seed of the random attacks' noise.")
    device: str = option("auto", job=False, help="auto, cpu or cuda[:N].")
    names: dict[str, str] = option(default_factory=dict, cli=False, job=False,
                                   help="model spec -> name shown in tables")
    weights: str | None = option(None, path="existing", job=False,
                                 help="Weights of the one model given as a bare architecture name.")
    pretrained: bool = option(False, job=False, help="Hub weights for every model given as a bare architecture "
                              "name (offline: from the hub cache).")
    binarized: tuple[str, ...] = option((), metavar="MODEL", help="Also evaluate this model behind input "
                                        "binarization (Appendix C.1's gradient-masking baseline; repeat).")
    out: str | None = option(None, path="any", job=False, help="Directory (or .json path) for results.json.")
    binarized_masked: tuple[str, ...] = option((), metavar="MODEL", help="Also evaluate this model behind input "
                                               "binarization with its true zero gradient (the masking diagnostic; repeat).")
    attack_options: tuple[str, ...] = option(
        (), flag="--attack-option", metavar="ATTACK.KEY=VALUE",
        help="Set one parameter of one attack, e.g. rand_fgsm.alpha=0.05, pgd_cw.kappa=50, "
             "pgd.steps=100 (repeatable; defaults: the paper's, else the reference code's).")

    def __post_init__(self) -> None:
        normalize(self, paths=("out", "weights", "data_root"), path_lists=("models", "sources", "binarized", "binarized_masked"))
        check(bool(self.models or self.binarized or self.binarized_masked), "models", "needs at least one target")
        for a in self.attacks:
            check(a in attacks.ATTACKS, "attacks", f"names an unknown attack {a!r}: use one of "
                  f"{', '.join(attacks.ATTACKS)}")
        check_fraction(self.eps, "eps")
        check(not self.ensemble_source or len(self.sources) >= 2, "ensemble_source", "needs at least two `sources`")
        check(self.batch_size >= 1, "batch_size", f"must be at least 1, not {self.batch_size}")
        check(self.weights is None or not self.pretrained, "weights",
              "and `pretrained` exclude each other: pass one source of weights")
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


def _unwrapped(spec: str) -> str:
    """The model spec behind a binarization prefix."""
    return spec.removeprefix(BINARIZED_MASKED_PREFIX).removeprefix(BINARIZED_PREFIX)


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
    """Run the evaluation; return the results and, when `cfg.out` is set, write them to
    `results.json` there (a directory, or a .json path) and add its "path".
    `evaluate(cfg, out)` is the deprecated form of `evaluate(replace(cfg, out=out))`."""
    if out is not None:
        warnings.warn("evaluate(cfg, out) is deprecated: put it in the config, evaluate(EvalConfig(..., out=out))",
                      DeprecationWarning, stacklevel=2)
        cfg = replace(cfg, out=os.fspath(out))
    if cfg.out is not None:
        check_output(cfg.out)  # never inside a store
    target_specs = [*cfg.models, *(BINARIZED_PREFIX + s for s in cfg.binarized),
                    *(BINARIZED_MASKED_PREFIX + s for s in cfg.binarized_masked)]
    bare = check_weights({"models": cfg.models, "binarized": cfg.binarized, "binarized_masked": cfg.binarized_masked,
                          "sources": cfg.sources}, weights=cfg.weights, pretrained=cfg.pretrained)
    device = resolve_device(cfg.device)
    data = create_dataset(cfg.dataset, split=cfg.split, limit=cfg.limit, data_root=cfg.data_root,
                          image_size=cfg.image_size)
    # Two runs in folders of the same name (seed0/C, seed1/C) get the path suffix that tells them apart.
    labels = unique_labels(_unwrapped(s) for s in [*target_specs, *cfg.sources])

    def label(spec: str) -> str:
        if spec in cfg.names:
            return cfg.names[spec]
        # Appendix C.1's input-binarization baseline: attacked through it (BPDA), or masked.
        for prefix, tag in ((BINARIZED_MASKED_PREFIX, "+binarized-masked"), (BINARIZED_PREFIX, "+binarized")):
            if spec.startswith(prefix):
                return labels[spec.removeprefix(prefix)] + tag
        return labels[spec]

    def load(spec: str) -> torch.nn.Module:
        named = _unwrapped(spec) in bare
        return load_model_for(spec, data, device, weights=cfg.weights if named else None,
                              pretrained=cfg.pretrained and named)

    targets = {label(s): load(s) for s in target_specs}
    specs = dict(zip(targets, target_specs))
    sources = {label(s): load(s) for s in cfg.sources}
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
    # In a log, a line when the work starts and one after the first batch (its rate and ETA), so a
    # redirected evaluate says at once what it does and how long it will take.
    log_line(f"evaluate: {len(data)} samples in {nb} batch(es) of {cfg.batch_size}; {len(targets)} model(s), "
             f"{len(sources)} source(s), attacks {', '.join(cfg.attacks)}")
    for b in bar:
        if b == 1 and _progress_mode() == "lines":
            log_line(bar.line())
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

    results: dict[str, Any] = {"config": config_to_dict(cfg), "attack_params": params, "dataset": data.identity(),
                               "versions": versions(), "models": {}}
    for t in targets:
        bb = {s: {a: black[t][s][a].result() for a in cfg.attacks} for s in sources}
        # A source that is the target itself is a white-box attack (the transfer matrix's
        # diagonal), not a black-box one.
        flat = [r["error"] for s, per in bb.items() if s != t for r in per.values()]
        results["models"][t] = {
            "spec": specs[t],
            "clean": clean[t].result(),
            "whitebox": {a: white[t][a].result() for a in cfg.attacks},
            "blackbox": bb,
            "blackbox_max": max(flat) if flat else None,
            "blackbox_avg": sum(flat) / len(flat) if flat else None,
        }
    if cfg.out is not None:
        path = Path(cfg.out)
        path = path if path.suffix == ".json" else path / "results.json"
        write_json(path, results)
        results["path"] = str(path)
    return results


callable_stage(__name__)  # `enspipe.evaluate(cfg)` is evaluate(cfg)
