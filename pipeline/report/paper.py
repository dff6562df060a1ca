"""The paper's own numbers (Tramèr et al., ICLR 2018), as the report prints them beside ours.

`PAPER` maps a table key ("mnist", "imagenet"; "imagenet_table1" / "_table2" / "_table4" for
one ImageNet table each) to model -> metric -> value in %, read from Tables 1, 2, 4, 6, 7 and 8
and §4; `paper_value` looks one up with loose model names.
Data only: no torch, no numpy.
"""
from __future__ import annotations

import re
from typing import Mapping

from enspipe.util.errors import ConfigError

__all__ = ["PAPER", "Paper", "paper_value", "resolve_paper"]

Paper = Mapping[str, Mapping[str, float]]

# Metric keys: "clean", "whitebox:<attack>", "blackbox_max", "blackbox_avg" (top-1; a
# "_top5" suffix for top-5), "transfer:<attack>:<source>" (a transfer-matrix cell) and
# "approximation_ratio" (Table 6 / §4). Model names are matched loosely (case, "_", "-"
# and spaces ignored), so "A_adv-ens3", "Aadv-ens3" and "aadv_ens3" are the same model.

_T7_COLS = ("whitebox:fgsm", "whitebox:rand_fgsm", "transfer:fgsm:A", "transfer:fgsm:B",
            "transfer:fgsm:B*", "transfer:fgsm:C", "transfer:fgsm:D")
_TABLE7 = {  # Table 7 (MNIST, eps = 0.3); None where the source is the model itself
    "A": (64.7, 69.7, None, 61.5, 53.2, 46.8, 41.5),
    "Aadv": (2.2, 14.8, 6.6, 10.7, 8.8, 6.5, 8.3),
    "B": (85.0, 86.0, 45.7, None, 69.9, 59.9, 85.9),
    "Badv": (11.6, 11.1, 6.4, 8.9, 8.5, 4.9, 6.1),
    "B*": (75.7, 74.1, 44.3, 72.8, None, 46.0, 62.6),
    "B*adv": (4.3, 40.6, 16.1, 14.7, 15.0, 17.9, 9.1),
    "C": (81.8, 81.8, 40.2, 55.8, 49.5, None, 59.4),
    "Cadv": (3.7, 17.1, 9.8, 29.3, 21.5, 11.9, 21.9),
    "D": (92.4, 95.4, 61.3, 74.1, 68.9, 65.1, None),
    "Dadv": (25.5, 47.5, 32.1, 30.5, 29.3, 28.2, 21.8),
}
_TABLE8 = {  # Table 8 (MNIST, eps = 0.3): clean, white-box FGSM, max / avg black-box
    "Aadv": (0.8, 2.2, 10.8, 7.7), "Aadv-ens": (0.8, 7.0, 6.6, 5.2), "Aadv-ens3": (0.7, 5.4, 6.5, 4.3),
    "Badv": (0.8, 11.6, 8.9, 5.5), "Badv-ens": (0.7, 10.5, 6.8, 5.3), "Badv-ens3": (0.8, 14.0, 8.8, 5.1),
    "Cadv": (1.0, 3.7, 29.3, 18.7), "Cadv-ens": (1.3, 1.9, 17.2, 10.7), "Cadv-ens3": (1.4, 3.6, 14.5, 8.4),
    "Dadv": (2.6, 25.5, 32.5, 23.5), "Dadv-ens": (2.6, 21.5, 38.6, 28.0), "Dadv-ens3": (2.6, 29.4, 29.8, 15.6),
}
_TABLE6 = {"A": 17, "Aadv": 0, "B": 25, "Badv": 8, "B*": 23, "B*adv": 1, "C": 25, "Cadv": 0, "D": 49, "Dadv": 16}
_TABLE4 = {  # Table 4 (ImageNet, eps = 16/256): top-1 clean, Step-LL, max BB; top-5 the same
    "v3": (22.0, 69.6, 51.2, 6.1, 42.7, 24.5), "v3adv": (22.0, 26.6, 40.8, 6.1, 9.0, 17.4),
    "v3adv-ens3": (23.6, 30.0, 34.0, 7.6, 10.1, 11.2), "v3adv-ens4": (24.2, 43.3, 33.4, 7.8, 19.4, 10.7),
    "IRv2": (19.6, 50.7, 44.4, 4.8, 24.0, 17.8), "IRv2adv": (19.8, 21.4, 34.5, 4.9, 5.8, 11.7),
    "IRv2adv-ens": (20.2, 26.0, 27.0, 5.1, 7.6, 7.9),
}
_IMAGENET_MODELS = ("v4", "v3", "v3adv", "IRv2", "IRv2adv")
_TABLE1 = {  # Table 1 (Step-LL transfer, eps = 16/256), rows targets, columns _IMAGENET_MODELS
    "top1": {"v4": (60.2, 39.2, 31.1, 36.6, 30.9), "v3": (43.8, 69.6, 36.4, 42.1, 35.1),
             "v3adv": (36.3, 35.6, 26.6, 35.2, 35.9), "IRv2": (38.0, 38.0, 30.8, 50.7, 31.9),
             "IRv2adv": (31.0, 30.3, 25.7, 30.6, 21.4)},
    "top5": {"v4": (31.0, 14.9, 10.2, 13.6, 9.9), "v3": (18.7, 42.7, 13.0, 17.8, 12.8),
             "v3adv": (13.6, 13.5, 9.0, 13.0, 14.5), "IRv2": (14.1, 14.8, 9.9, 24.0, 10.6),
             "IRv2adv": (10.3, 10.5, 7.7, 10.4, 5.8)},
}
_TABLE2_RSTEPLL = {"v4": (70.5, 42.8), "v3": (80.0, 57.1), "v3adv": (64.8, 37.1),  # (top-1, top-5)
                   "IRv2": (56.3, 29.3), "IRv2adv": (37.5, 15.0)}
# Table 2's two-step Iter-LL (two steps of eps/2). v3adv's cells are left out: the paper's
# text (/work/shared/paper) renders them illegibly ("585", "29"), and no number is guessed.
_TABLE2_ITERLL2 = {"v4": (78.5, 56.2), "v3": (86.3, 70.2), "IRv2": (69.9, 45.4), "IRv2adv": (41.6, 16.5)}
_IMAGENET_RATIO = {"v3": 19, "v3adv": 7, "IRv2": 17, "IRv2adv": 8, "v3adv-ens3": 13, "v3adv-ens4": 18,
                   "IRv2adv-ens": 14}  # §4 and §4.2 (approximation ratio of Step-LL)


def _imagenet_tables() -> dict[str, dict[str, dict[str, float]]]:
    """One paper table per ImageNet table, so a job's report compares each cell with the table
    that measured the same thing (Table 4's max black-box is over its holdouts, not over
    Table 1's sources): "imagenet_table1", "imagenet_table2", "imagenet_table4"."""
    t1: dict[str, dict[str, float]] = {}
    for top, suffix in (("top1", ""), ("top5", "_top5")):
        for target, row in _TABLE1[top].items():
            for source, v in zip(_IMAGENET_MODELS, row):
                key = "whitebox:step_ll" if source == target else f"transfer:step_ll:{source}"
                t1.setdefault(target, {})[key + suffix] = v
    t2: dict[str, dict[str, float]] = {m: {k: v for k, v in cells.items() if k.startswith("whitebox:")}
                                       for m, cells in t1.items()}
    for m, (r1, r5) in _TABLE2_RSTEPLL.items():
        t2[m].update({"whitebox:rand_step_ll": r1, "whitebox:rand_step_ll_top5": r5})
    for m, (i1, i5) in _TABLE2_ITERLL2.items():
        t2[m].update({"whitebox:iter_ll": i1, "whitebox:iter_ll_top5": i5})
    t4 = {m: {"clean": c1, "whitebox:step_ll": s1, "blackbox_max": b1, "clean_top5": c5,
              "whitebox:step_ll_top5": s5, "blackbox_max_top5": b5}
          for m, (c1, s1, b1, c5, s5, b5) in _TABLE4.items()}
    return {"imagenet_table1": t1, "imagenet_table2": t2, "imagenet_table4": t4}


def _build_paper() -> dict[str, dict[str, dict[str, float]]]:
    mnist: dict[str, dict[str, float]] = {}
    for m, vals in _TABLE7.items():
        mnist.setdefault(m, {}).update({k: v for k, v in zip(_T7_COLS, vals) if v is not None})
    for m, (clean, fgsm, bmax, bavg) in _TABLE8.items():
        mnist.setdefault(m, {}).update({"clean": clean, "whitebox:fgsm": fgsm, "blackbox_max": bmax,
                                        "blackbox_avg": bavg})
    for m, r in _TABLE6.items():
        mnist.setdefault(m, {})["approximation_ratio"] = float(r)
    imagenet: dict[str, dict[str, float]] = {}
    for m, (c1, s1, b1, c5, s5, b5) in _TABLE4.items():
        imagenet[m] = {"clean": c1, "whitebox:step_ll": s1, "blackbox_max": b1,
                       "clean_top5": c5, "whitebox:step_ll_top5": s5, "blackbox_max_top5": b5}
    for top, suffix in (("top1", ""), ("top5", "_top5")):
        for target, row in _TABLE1[top].items():
            cells = imagenet.setdefault(target, {})
            for source, v in zip(_IMAGENET_MODELS, row):
                key = "whitebox:step_ll" if source == target else f"transfer:step_ll:{source}"
                cells[key + suffix] = v
    for m, (t1, t5) in _TABLE2_RSTEPLL.items():
        imagenet[m].update({"whitebox:rand_step_ll": t1, "whitebox:rand_step_ll_top5": t5})
    for m, r in _IMAGENET_RATIO.items():
        imagenet.setdefault(m, {})["approximation_ratio"] = float(r)
    return {"mnist": mnist, "imagenet": imagenet, **_imagenet_tables()}


PAPER: dict[str, dict[str, dict[str, float]]] = _build_paper()


def _key(name: str) -> str:
    # "Bstar" is how job specs spell B* (TOML keys cannot hold "*").
    return re.sub(r"[\s_\-]+", "", name).lower().replace("bstar", "b*")


def paper_value(paper: Paper | None, model: str, metric: str) -> float | None:
    """The paper's value of `metric` for `model` (names matched loosely), or None."""
    if not paper:
        return None
    for name, metrics in paper.items():
        if _key(name) == _key(model):
            v = metrics.get(metric)
            return None if v is None else float(v)
    return None


def resolve_paper(paper: str | Paper | None) -> Paper | None:
    """A paper table by key ("mnist", "imagenet") or a dict model -> metric -> value in %."""
    if paper is None or not isinstance(paper, str):
        return paper
    if paper not in PAPER:
        raise ConfigError(f"unknown paper table {paper!r}; use one of {', '.join(PAPER)}")
    return PAPER[paper]
