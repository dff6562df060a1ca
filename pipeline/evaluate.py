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
The batches come from `enspipe.data.loader.batches`: decoded ahead by `loader_workers` processes
(or on the device, where `decoder` resolves to nvjpeg; results.json records which), never here
image by image; the counts do not depend on the worker count.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from enspipe import attacks
from enspipe.util._callable import callable_stage
from enspipe.config import OptionError, config_to_dict
from enspipe.configs.evaluate import EvalConfig
from enspipe.data import create_dataset
from enspipe.data.decode import device_decoder, other_decoder_line, store_decoder
from enspipe.data.loader import batches, default_workers
from enspipe.models import BINARIZED_MASKED_PREFIX, BINARIZED_PREFIX, check_weights, load_model_for
from enspipe.util.naming import model_label, unique_labels
from enspipe.paths import check_output
from enspipe.util.runtime import _progress_mode, log_line, progress, resolve_device, versions, write_json
from enspipe.report.stats import wilson_interval

__all__ = ["EvalConfig", "eval_workers", "evaluate", "model_label", "unique_labels", "wilson_interval"]

_log = logging.getLogger(__name__)


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
    # Resolved once (nvjpeg without CUDA: one line, before any model is loaded): the batches are
    # decoded with it and results.json records it.
    decoder = device_decoder(cfg.decoder, device, data)
    workers = cfg.loader_workers if cfg.loader_workers is not None else eval_workers(device, data)
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
    stored = _stored_sources(cfg, data)  # {source name: (reader, attack, record)}
    own = _stored_sources(cfg, data, whitebox=True)
    for s, (_, a, _) in own.items():
        if s not in targets:
            raise OptionError("whitebox_stores", f"holds the directions of {s}, which is no target")
        if a in cfg.attacks:  # one counter would sum the stored and the online attack
            raise OptionError("whitebox_stores", f"holds {a} directions of {s}, which attacks also runs on it "
                                                 f"online: keep one of the two")
    for s, (_, a, _) in stored.items():
        if s in sources and a in cfg.attacks:
            raise OptionError("source_stores", f"holds {a} directions of {s}, which attacks also runs from the "
                                               f"source {s} online: keep one of the two")
    # A store of other pixels than these (another decoder's) is said in one line, as train says it.
    recs = {rec["path"]: rec for _, _, rec in [*own.values(), *stored.values()]}  # a store named twice: once
    if (line := other_decoder_line("evaluate", list(recs.values()), decoder)) is not None:
        _log.warning(line)
    for s, (_, a, _) in stored.items():
        for t in targets:
            black[t].setdefault(s, {})[a] = _Counter(topk)
    for s, (_, a, _) in [*stored.items(), *own.items()]:
        if s in targets:  # the target's own directions: its white-box attack (Table 1's diagonal)
            white[s].setdefault(a, _Counter(topk))

    params = cfg.attack_params()
    # Each attack built (its parameters parsed and checked) once; per batch only its seed changes.
    built = {a: attacks.create_attack(a, **params[a]) for a in cfg.attacks}
    nb = math.ceil(len(data) / cfg.batch_size)
    # Progress: a bar naming the attack on a terminal; in a log, a line every 30 s and one per attack.
    spent = dict.fromkeys(cfg.attacks, 0.0)
    bar = progress(range(nb), desc="evaluate", unit="batch", min_interval=30)
    # In a log, a line when the work starts and one after the first batch (its rate and ETA), so a
    # redirected evaluate says at once what it does and how long it will take.
    log_line(f"evaluate: {len(data)} samples in {nb} batch(es) of {cfg.batch_size}; {len(targets)} model(s), "
             f"{len(sources)} source(s), attacks {', '.join(cfg.attacks)}")
    # The pixels are decoded ahead by loader processes (nvJPEG on the device where `decoder` says so), never
    # one image at a time here: ImageNet's 50k JPEGs would keep the device waiting many times over.
    with contextlib.closing(batches(data, cfg.batch_size, device, workers=workers, decoder=decoder)) as stream:
        for b, (sl, x, y) in zip(bar, stream):
            if b == 1 and _progress_mode() == "lines":
                log_line(bar.line())
            with torch.no_grad():
                for t, m in targets.items():
                    clean[t].add(m(x), y)
                for s, (reader, a, _) in stored.items():
                    d = torch.from_numpy(reader.read_directions(sl.start, sl.stop)).to(device=device, dtype=x.dtype)
                    x_adv = attacks.apply_direction(x, d, cfg.eps)
                    for t, m in targets.items():
                        logits = m(x_adv)
                        black[t][s][a].add(logits, y)
                        if s == t:
                            white[t][a].add(logits, y)
                for s, (reader, a, _) in own.items():
                    if stored.get(s, (None, None))[1] != a:  # else counted above, as the source's diagonal
                        d = torch.from_numpy(reader.read_directions(sl.start, sl.stop)).to(device=device, dtype=x.dtype)
                        white[s][a].add(targets[s](attacks.apply_direction(x, d, cfg.eps)), y)
            for a in cfg.attacks:
                bar.set_postfix(attack=a)
                started = time.perf_counter()
                # Seeded per batch, fresh on every call: every target and source draws the same noise.
                attack = built[a].with_seed(cfg.seed * 1_000_003 + b)
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

    for s, (_, a, _) in [*stored.items(), *own.items()]:
        params.setdefault(a, attacks.attack_params(a, eps=cfg.eps))
    results: dict[str, Any] = {"config": config_to_dict(cfg), "attack_params": params, "dataset": data.identity(),
                               "decoder": decoder,  # what `auto` was
                               "versions": versions(), "models": {},
                               "stores": {s: rec for s, (_, _, rec) in [*own.items(), *stored.items()]}}
    for t in targets:
        bb = {s: {a: c.result() for a, c in per.items()} for s, per in black[t].items()}
        # A source that is the target itself is a white-box attack (the transfer matrix's
        # diagonal), not a black-box one.
        flat = [r["error"] for s, per in bb.items() if s != t for r in per.values()]
        results["models"][t] = {
            "spec": specs[t],
            "clean": clean[t].result(),
            "whitebox": {a: c.result() for a, c in white[t].items()},
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


def eval_workers(device: torch.device, data: Any) -> int:
    """Evaluate's loader workers where `loader_workers` names none. Beside a CUDA device, cores - 1
    (`default_workers`): the model costs the host CPU nearly nothing, decode is the whole of it, and
    one core drives the device. On a CPU device none: the model's torch threads use every core, so
    decoders there would take their cores from it (a thread of an intra-op team that loses its core
    holds up the whole team) and add the pixels' hand-over on top, to win at most decode's share of
    the run (BENCHMARKS.md, "evaluate: decode in the evaluating process vs loader workers": 11% for
    clean + FGSM of a small network): the pixels are decoded here between batches."""
    return default_workers(data, spare=1) if device.type == "cuda" else 0


def _stored_sources(cfg: EvalConfig, data: Any, *,
                    whitebox: bool = False) -> dict[str, tuple[Any, str, dict[str, Any]]]:
    """The `source_stores` (`whitebox_stores`), each checked against the evaluation data before any work (the
    same checks as training's: checksums, identity, and the keys that bind each sample),
    named by `names` (a job: the store's model step) or else by the store's model."""
    from enspipe.stores import check_against, open_store
    from enspipe.stores.remote import is_url, local_path

    out: dict[str, tuple[Any, str, dict[str, Any]]] = {}
    field_name = "whitebox_stores" if whitebox else "source_stores"
    for p in getattr(cfg, field_name):
        if not is_url(p) and not Path(local_path(p)).exists():
            raise OptionError(field_name, f"names {p}, which does not exist")
        reader = open_store(p)  # opened once: verified, checked against the data and read through one handle
        check_against(reader, data)
        ident = reader.identity
        name = cfg.names.get(p) or ident.model_name
        if name in out:  # one name, one store: a second would silently replace the first's counts
            raise OptionError(field_name, f"names two stores of {name} ({out[name][2]['path']} and {p}); "
                                          "evaluate takes one per model")
        out[name] = (reader, ident.attack, {"path": str(p), "model": ident.model_name, "attack": ident.attack,
                                            "weights_sha256": ident.weights_sha256,
                                            "decoder": store_decoder(ident.attack_params)})
    return out


callable_stage(__name__)  # `enspipe.evaluate(cfg)` is evaluate(cfg)
