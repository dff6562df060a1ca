"""Markdown tables and PNG figures from `evaluate`'s results and `diagnose`'s diagnostics.

`write_report(run_dir)` finds every `results.json` and `diagnostics.json` under run_dir
and writes `report.md` beside PNG figures. The tables take the paper's forms:

- transfer matrix (Tables 1, 7, 9): rows targets, columns sources, one per attack; a
  target that is also a source (same name) gets its white-box error on the diagonal (†);
  the strongest attack on each target is in bold;
- white-box errors (Tables 2, 7): one row per model, one column per attack;
- summary (Tables 4, 8): clean, white-box single-step (FGSM and/or Step-LL), max and
  average black-box error, each with its 95% interval; the models tied for best (lowest
  error; tied = interval overlaps the best one's) in bold; top-5 columns when present;
- diagnostics (Table 6, §4, Figure 2): approximation ratio, cosine, gradient norm,
  adversarial-subspace shares, with the figures.

The paper's own numbers (`PAPER`, or a dict model -> metric -> value in %) appear beside
ours. Only json, numpy and matplotlib are used (torch is not imported), so a report is
quick to write, offline.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from enspipe.errors import ConfigError
from enspipe.fileio import atomic_target, atomic_write

Paper = Mapping[str, Mapping[str, float]]
CI = tuple[float, float]

SINGLE_STEP_WHITEBOX = ("fgsm", "step_ll")  # Table 8 shows FGSM, Table 4 Step-LL
ATTACK_NAMES = {
    "fgsm": "FGSM", "step_ll": "Step-LL", "rand_fgsm": "R+FGSM", "rand_step_ll": "R+Step-LL",
    "iter_fgsm": "I-FGSM", "iter_ll": "Iter-LL", "pgd": "PGD", "pgd_cw": "PGD (CW loss)",
}

# --- the paper's numbers (all in %) ------------------------------------------------------
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
_IMAGENET_RATIO = {"v3": 19, "v3adv": 7, "IRv2": 17, "IRv2adv": 8, "v3adv-ens3": 13, "v3adv-ens4": 18,
                   "IRv2adv-ens": 14}  # §4 and §4.2 (approximation ratio of Step-LL)


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
    return {"mnist": mnist, "imagenet": imagenet}


PAPER: dict[str, dict[str, dict[str, float]]] = _build_paper()


def _key(name: str) -> str:
    # "Bstar" is how job specs spell B* (TOML keys cannot hold "*").
    return re.sub(r"[\s_\-]+", "", name).lower().replace("bstar", "b*")


def _paper_value(paper: Paper | None, model: str, metric: str) -> float | None:
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


# --- reading the results -----------------------------------------------------------------

def _ci(entry: Mapping[str, Any], top5: bool = False) -> CI:
    """The entry's 95% interval; recomputed (Wilson) from its counts if it carries none."""
    ci = entry.get("top5_ci95" if top5 else "ci95")
    if ci is not None:
        return (float(ci[0]), float(ci[1]))
    from enspipe.evaluate import wilson_interval  # only for hand-written results without CIs

    errors = entry.get("top5_errors") if top5 else entry.get("errors")
    if errors is None:
        errors = round(float(entry["top5_error" if top5 else "error"]) * int(entry["n"]))
    return wilson_interval(int(errors), int(entry["n"]))


def _value(entry: Mapping[str, Any] | None, top5: bool = False) -> float | None:
    if not entry:
        return None
    v = entry.get("top5_error" if top5 else "error")
    return None if v is None else float(v)


def _has_top5(results: Mapping[str, Any]) -> bool:
    return any("top5_error" in (m.get("clean") or {}) for m in results.get("models", {}).values())


def _attack_order(results: Mapping[str, Any], where: str) -> list[str]:
    """Attacks in the config's order, then any others found under `where`."""
    found: list[str] = []
    for m in results.get("models", {}).values():
        if where == "whitebox":
            found += list((m.get("whitebox") or {}))
        else:
            for per_source in (m.get("blackbox") or {}).values():
                found += list(per_source)
    config = list((results.get("config") or {}).get("attacks") or [])
    return [a for a in config if a in found] + [a for a in dict.fromkeys(found) if a not in config]


def _sources(results: Mapping[str, Any]) -> list[str]:
    found = [s for m in results.get("models", {}).values() for s in (m.get("blackbox") or {})]
    return list(dict.fromkeys(found))


def transfer_matrix(results: Mapping[str, Any], *, attack: str | None = None,
                    top5: bool = False) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(rows = targets, cols = sources, values[row][col] = error rate in [0, 1] or None).

    A cell whose source has the target's name is the white-box error of `attack` (Table 1:
    "diagonal elements represent a white-box attack"). `attack` defaults to the first
    single-step attack transferred (FGSM, Step-LL), else the first one.
    """
    attacks = _attack_order(results, "blackbox")
    if attack is None:
        attack = next((a for a in attacks if a in SINGLE_STEP_WHITEBOX), attacks[0] if attacks else None)
    rows = list(results.get("models", {}))
    cols = _sources(results)
    values: list[list[float | None]] = []
    for t in rows:
        m = results["models"][t]
        row: list[float | None] = []
        for s in cols:
            entry = (m.get("whitebox") or {}).get(attack) if s == t else None
            if entry is None:
                entry = ((m.get("blackbox") or {}).get(s) or {}).get(attack)
            row.append(_value(entry, top5))
        values.append(row)
    return rows, cols, values


def _blackbox_entries(target: str, m: Mapping[str, Any], top5: bool) -> list[Mapping[str, Any]]:
    """Every transferred (source, attack) entry, except from a source with the target's own
    name: that one is a white-box attack (the transfer matrix's diagonal), not black-box.
    (evaluate's own `blackbox_max`/`blackbox_avg` include it; the tables here do not.)"""
    return [e for source, per_source in (m.get("blackbox") or {}).items() if source != target
            for e in per_source.values() if _value(e, top5) is not None]


def _max_entry(target: str, m: Mapping[str, Any], top5: bool) -> Mapping[str, Any] | None:
    """The black-box entry (source, attack) with the highest error: its CI is the max's."""
    entries = _blackbox_entries(target, m, top5)
    return max(entries, key=lambda e: _value(e, top5)) if entries else None  # type: ignore[arg-type,return-value]


def _avg_entry(target: str, m: Mapping[str, Any], top5: bool) -> tuple[float, CI] | None:
    """Mean black-box error, with the mean of the entries' interval bounds as its interval.

    The attacks are scored on the same samples, so their outcomes are correlated; averaging
    the bounds is exact when they are perfectly correlated and conservative (wider than a
    pooled interval) otherwise, which errs towards calling models tied rather than apart.
    """
    entries = _blackbox_entries(target, m, top5)
    if not entries:
        return None
    cis = [_ci(e, top5) for e in entries]
    mean = sum(_value(e, top5) for e in entries) / len(entries)  # type: ignore[misc]
    return mean, (sum(c[0] for c in cis) / len(cis), sum(c[1] for c in cis) / len(cis))


# --- markdown ------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "r") -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + [("---:" if align == "r" else ":---")] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _with_paper(text: str, paper_value: float | None) -> str:
    return text if paper_value is None else f"{text} ({paper_value:.1f})"


def _overlap(a: CI, b: CI) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def tied_best(cells: Mapping[str, tuple[float, CI] | None]) -> set[str]:
    """The names whose value is lowest or whose interval overlaps the lowest one's."""
    present = {k: v for k, v in cells.items() if v is not None}
    if not present:
        return set()
    best = min(present, key=lambda k: present[k][0])
    return {k for k, (_, ci) in present.items() if _overlap(ci, present[best][1])}


def _summary_columns(results: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(metric key, heading, top5) for the summary table."""
    wb = [a for a in SINGLE_STEP_WHITEBOX
          if any(a in (m.get("whitebox") or {}) for m in results.get("models", {}).values())]
    has_bb = any(_blackbox_entries(t, m, False) for t, m in results.get("models", {}).items())
    cols: list[tuple[str, str, bool]] = []
    for top5 in ([False, True] if _has_top5(results) else [False]):
        tag = " top-5" if top5 else ""
        cols.append(("clean", "Clean" + tag, top5))
        cols += [(f"whitebox:{a}", f"{ATTACK_NAMES[a]}{tag}", top5) for a in wb]
        if has_bb:
            cols += [("blackbox_max", "Max. black-box" + tag, top5), ("blackbox_avg", "Avg. black-box" + tag, top5)]
    return cols


def _summary_cell(target: str, m: Mapping[str, Any], metric: str, top5: bool) -> tuple[float, CI] | None:
    if metric == "blackbox_avg":
        return _avg_entry(target, m, top5)
    if metric == "clean":
        entry = m.get("clean")
    elif metric == "blackbox_max":
        entry = _max_entry(target, m, top5)
    else:
        entry = (m.get("whitebox") or {}).get(metric.split(":", 1)[1])
    v = _value(entry, top5)
    return None if v is None else (v, _ci(entry, top5))  # type: ignore[arg-type]


def summary_table(results: Mapping[str, Any], paper: Paper | None = None,
                  groups: Mapping[str, Sequence[str]] | None = None) -> str:
    """Tables 4/8: error [95% interval] in %, models tied for best in bold, per group.

    `groups` (name -> model names) restricts the "tied for best" comparison, as the paper
    marks the best "for each model architecture"; by default all models form one group.
    A column "paper" follows each metric the paper gives for any model.
    """
    models = results.get("models", {})
    cols = _summary_columns(results)
    cells = {t: {c: _summary_cell(t, models[t], c[0], c[2]) for c in cols} for t in models}
    bold: dict[tuple[str, tuple[str, str, bool]], bool] = {}
    for members in (groups or {"all": list(models)}).values():
        for c in cols:
            best = tied_best({t: cells[t][c] for t in members if t in cells})
            bold.update({(t, c): True for t in best})
    header, paper_cols = ["Model"], []
    for c in cols:
        header.append(c[1])
        metric = c[0] + ("_top5" if c[2] else "")
        if any(_paper_value(paper, t, metric) is not None for t in models):
            header.append("paper")
            paper_cols.append(c)
    rows = []
    for t in models:
        row = [t]
        for c in cols:
            cell = cells[t][c]
            text = "–" if cell is None else f"{_pct(cell[0])} [{_pct(cell[1][0])}, {_pct(cell[1][1])}]"
            row.append(f"**{text}**" if bold.get((t, c)) and cell is not None else text)
            if c in paper_cols:
                pv = _paper_value(paper, t, c[0] + ("_top5" if c[2] else ""))
                row.append("–" if pv is None else f"{pv:.1f}")
        rows.append(row)
    return _table(header, rows)


def whitebox_table(results: Mapping[str, Any], paper: Paper | None = None, top5: bool = False) -> str:
    """Tables 2/7 (white-box part): error in % per model and attack, strongest per model in
    bold; the paper's value in parentheses where it gives one."""
    attacks = _attack_order(results, "whitebox")
    rows = []
    for t, m in results.get("models", {}).items():
        vals = [_value((m.get("whitebox") or {}).get(a), top5) for a in attacks]
        top = max((v for v in vals if v is not None), default=None)
        row = [t]
        for a, v in zip(attacks, vals):
            text = _with_paper(_pct(v), _paper_value(paper, t, f"whitebox:{a}" + ("_top5" if top5 else "")))
            row.append(f"**{text}**" if v is not None and v == top else text)
        rows.append(row)
    return _table(["Model"] + [ATTACK_NAMES.get(a, a) for a in attacks], rows)


def transfer_table(results: Mapping[str, Any], attack: str, paper: Paper | None = None,
                   top5: bool = False) -> str:
    """Table 1 form: targets x sources, white-box († ) on the diagonal, row maximum in bold."""
    rows, cols, values = transfer_matrix(results, attack=attack, top5=top5)
    out = []
    for t, vals in zip(rows, values):
        top = max((v for v in vals if v is not None), default=None)
        row = [t]
        for s, v in zip(cols, vals):
            key = f"whitebox:{attack}" if s == t else f"transfer:{attack}:{s}"
            text = _with_paper(_pct(v) + ("†" if s == t and v is not None else ""),
                               _paper_value(paper, t, key + ("_top5" if top5 else "")))
            row.append(f"**{text}**" if v is not None and v == top else text)
        out.append(row)
    return _table(["Target \\ Source"] + cols, out)


def markdown_tables(results: Mapping[str, Any], paper: Paper | None = None, *,
                    groups: Mapping[str, Sequence[str]] | None = None) -> str:
    """Every table for one `results.json`: summary (Tables 4/8), white-box (Tables 2/7) and
    one transfer matrix per transferred attack (Table 1), top-5 versions when present.
    Numbers are error rates in %; the paper's (in parentheses or a "paper" column) beside."""
    cfg = results.get("config") or {}
    eps = cfg.get("eps")
    parts = []
    ds = (results.get("dataset") or {}).get("source")
    n = next((m["clean"].get("n") for m in results.get("models", {}).values() if m.get("clean")), None)
    facts = [f"dataset {ds}" if ds else None, f"eps = {eps:g}" if isinstance(eps, (int, float)) else None,
             f"n = {n}" if n else None]
    if any(facts):
        parts.append("*" + ", ".join(f for f in facts if f) + ".*")
    parts.append("#### Summary (Tables 4 / 8)\n\nError rates in % with 95% Wilson intervals; in bold the "
                 "models tied for best (lowest error; tied = interval overlaps the best one's). "
                 "Max./avg. black-box: over every other source and transferred attack (a source "
                 "with the target's name is white-box and left out; the average's interval is the "
                 "mean of the entries' bounds).\n\n" + summary_table(results, paper, groups))
    tops = [False, True] if _has_top5(results) else [False]
    if _attack_order(results, "whitebox"):
        for top5 in tops:
            tag = " (top-5)" if top5 else ""
            parts.append(f"#### White-box error{tag} (Tables 2 / 7)\n\nStrongest attack per model in bold; "
                         "the paper's value in parentheses.\n\n" + whitebox_table(results, paper, top5))
    for attack in _attack_order(results, "blackbox"):
        for top5 in tops:
            tag = " (top-5)" if top5 else ""
            parts.append(f"#### Transfer: {ATTACK_NAMES.get(attack, attack)}{tag} (Table 1)\n\n"
                         "Rows are targets, columns sources; † white-box (the source is the target); "
                         "strongest attack per target in bold; the paper's value in parentheses.\n\n"
                         + transfer_table(results, attack, paper, top5))
    return "\n\n".join(parts) + "\n"


# --- figures --------------------------------------------------------------------------------

def _new_figure(width: float, height: float):
    """A Figure on the Agg canvas, leaving pyplot's global backend alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path) -> Path:
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def plot_transfer_heatmap(results: Mapping[str, Any], path: str | os.PathLike, *, attack: str | None = None,
                          top5: bool = False) -> Path:
    """A PNG heatmap of the transfer matrix (error in %), white-box cells outlined."""
    import numpy as np
    from matplotlib.patches import Rectangle

    rows, cols, values = transfer_matrix(results, attack=attack, top5=top5)
    grid = np.array([[np.nan if v is None else 100 * v for v in r] for r in values], dtype=float).reshape(
        len(rows), len(cols))
    fig = _new_figure(1.2 + 0.9 * max(1, len(cols)), 1.0 + 0.6 * max(1, len(rows)))
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
    used = attack or transfer_attack_default(results)
    ax.set_title(f"{ATTACK_NAMES.get(used, used)} transfer error (%){' top-5' if top5 else ''}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save_png(fig, Path(path))


def transfer_attack_default(results: Mapping[str, Any]) -> str | None:
    attacks = _attack_order(results, "blackbox")
    return next((a for a in attacks if a in SINGLE_STEP_WHITEBOX), attacks[0] if attacks else None)


# --- diagnostics ------------------------------------------------------------------------------

def diagnostics_markdown(diag: Mapping[str, Any], paper: Paper | None = None) -> str:
    """Table 6 / §4 measurements and Figure 2 shares for one `diagnostics.json`."""
    models = diag.get("models", {})
    header = ["Model", f"Approx. ratio % ({diag.get('single', '?')} / {diag.get('iterative', '?')})", "Gap %",
              "Cosine", "‖∇x L‖₁", "‖∇x L‖₂"]
    has_paper = any(_paper_value(paper, t, "approximation_ratio") is not None for t in models)
    if has_paper:
        header.insert(2, "paper")
    rows = []
    for t, m in models.items():
        ar, gn = m.get("approximation_ratio", {}), m.get("gradient_norm", {})
        row = [t, _pct(ar.get("ratio")), _pct(ar.get("gap")), f"{m.get('cosine', {}).get('mean', float('nan')):.3f}",
               f"{gn.get('l1', float('nan')):.4g}", f"{gn.get('l2', float('nan')):.4g}"]
        if has_paper:
            pv = _paper_value(paper, t, "approximation_ratio")
            row.insert(2, "–" if pv is None else f"{pv:.0f}")
        rows.append(row)
    parts = [f"*eps = {diag.get('eps')}, n = {diag.get('n')}, iterative steps = {diag.get('steps')}.* "
             "Approximation ratio = mean single-step loss / mean optimal loss (optimum lower-bounded by the "
             "iterative attack), as the paper's Table 6 and §4 report it: higher means the single step is a "
             "better linearisation; the gap is 1 - ratio.", _table(header, rows)]
    sub_rows = []
    for t, m in models.items():
        sub = m.get("subspace") or {}
        for curve in sub.get("curves", []):
            share = curve.get("share_at_least", [])
            marks = [k for k in (1, 10, 50, 100) if k <= len(share)]
            sub_rows.append((t, curve["eps"], sub.get("n_points"), {k: share[k - 1] for k in marks}))
    if sub_rows:
        ks = sorted({k for r in sub_rows for k in r[3]})
        parts.append("Share of correctly classified points with at least k orthogonal adversarial directions "
                     "(Appendix E, Figure 2):\n\n" + _table(
                         ["Model", "eps", "points"] + [f"k ≥ {k}" for k in ks],
                         [[t, f"{e:.4g}", str(n), *(_pct(s.get(k)) for k in ks)] for t, e, n, s in sub_rows]))
    return "\n\n".join(parts) + "\n"


# --- the report ---------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def _find(run_dir: Path, name: str) -> list[Path]:
    """Every `name` under run_dir, not following symlinks (a job's models/ links into the cache)."""
    found = []
    for root, dirs, files in os.walk(run_dir, followlinks=False):
        dirs.sort()
        if name in files:
            found.append(Path(root) / name)
    return sorted(found)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _where(folder: Path, run_dir: Path) -> str:
    """A results folder's name in headings and figure names: relative, or the run's own name."""
    rel = _rel(folder, run_dir)
    return run_dir.resolve().name if rel == "." else rel


def write_report(run_dir: str | os.PathLike, *, paper: str | Paper | None = None,
                 title: str | None = None) -> Path:
    """Write `run_dir/report.md` from every results.json and diagnostics.json under run_dir.

    Figures: a transfer heatmap per results file (`report-<where>-transfer.png` beside the
    report); diagnostics figures written by `diagnose` are linked where they are, and drawn
    from the JSON beside the report when missing. `paper` is a key of `PAPER` ("mnist",
    "imagenet") or a dict model -> metric -> value in %.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"report directory {run_dir} does not exist")
    table = resolve_paper(paper)
    parts = [f"# {title or 'enspipe report'}: {run_dir.resolve().name}"]
    results_files, diag_files = _find(run_dir, "results.json"), _find(run_dir, "diagnostics.json")
    if not results_files and not diag_files:
        parts.append("No results.json or diagnostics.json found under this directory.")
    for path in results_files:
        where = _where(path.parent, run_dir)
        res = _read(path)
        parts.append(f"## Evaluation: {where}")
        if not isinstance(res, dict) or not isinstance(res.get("models"), dict):
            parts.append(f"`{_rel(path, run_dir)}` is not a readable evaluate results file; skipped.")
            continue
        parts.append(markdown_tables(res, table))
        if transfer_attack_default(res) is not None and _sources(res):
            fig = run_dir / f"report-{_slug(where)}-transfer.png"
            plot_transfer_heatmap(res, fig)
            parts.append(f"![transfer matrix]({_rel(fig, run_dir)})")
    for path in diag_files:
        where = _where(path.parent, run_dir)
        diag = _read(path)
        parts.append(f"## Diagnostics: {where}")
        if not isinstance(diag, dict) or not isinstance(diag.get("models"), dict):
            parts.append(f"`{_rel(path, run_dir)}` is not a readable diagnostics file; skipped.")
            continue
        parts.append(diagnostics_markdown(diag, table))
        parts += _diagnostic_figures(diag, path.parent, run_dir, _slug(where))
    return atomic_write(run_dir / "report.md", "\n\n".join(parts).rstrip() + "\n")


def _diagnostic_figures(diag: Mapping[str, Any], diag_dir: Path, run_dir: Path, slug: str) -> list[str]:
    """Markdown image links; a figure missing next to the JSON is redrawn beside the report."""
    lines = []
    sub = (diag.get("figures") or {}).get("subspace")
    target = diag_dir / sub if sub else None
    subspaces = {t: m["subspace"] for t, m in diag["models"].items() if m.get("subspace", {}).get("curves")}
    if (target is None or not target.exists()) and subspaces:
        from enspipe.diagnostics import plot_subspace

        target = plot_subspace(subspaces, run_dir / f"report-{slug}-subspace.png")
    if target is not None and target.exists():
        lines.append(f"![adversarial subspaces (Figure 2)]({_rel(target, run_dir)})")
    for t, m in diag["models"].items():
        name = (m.get("figures") or {}).get("loss_surface")
        target = diag_dir / name if name else None
        if (target is None or not target.exists()) and m.get("loss_surface", {}).get("loss"):
            from enspipe.diagnostics import plot_loss_surface

            target = plot_loss_surface(m["loss_surface"], run_dir / f"report-{slug}-{_slug(t)}-loss.png")
        if target is not None and target.exists():
            lines.append(f"![loss surface of {t} (Figures 1, 4, 5)]({_rel(target, run_dir)})")
    return lines
