"""Markdown tables and PNG figures from `evaluate`'s results and `diagnose`'s diagnostics.

(Over 400 lines on purpose: every table form of the paper and its figures read the same
result files through one set of cell, interval and ordering helpers.)

`write_report(run_dir)` finds every `results.json`, `diagnostics.json` and training run's
`metrics.jsonl` (per-epoch table, loss / accuracy / validation curves: `enspipe.report.curves`)
under run_dir and writes `report.md` beside PNG figures. The tables take the paper's forms:

- transfer matrix (Tables 1, 7, 9): rows targets, columns sources, one per attack; a
  target that is also a source (same name) gets its white-box error on the diagonal (†);
  the strongest attack on each target is in bold;
- white-box errors (Tables 2, 7): one row per model, one column per attack;
- summary (Tables 4, 8): clean, white-box single-step (FGSM and/or Step-LL), max and
  average black-box error, each with its 95% interval; the models tied for best (lowest
  error; tied = interval overlaps the best one's) in bold; top-5 columns when present;
- diagnostics (Table 6, §4, Figure 2): approximation ratio, cosine, gradient norm,
  adversarial-subspace shares, with the figures.

The paper's own numbers (`enspipe.report.paper.PAPER`, or a dict model -> metric -> value in %)
appear beside ours. A report depends on the result files only, read with json, and on
`enspipe.report.stats` and `enspipe.report.plots` (numpy, matplotlib): torch is not imported (a test
checks it), so a report is quick to write, offline.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from enspipe.report import curves, plots
from enspipe.attack_records import RECORDS, attack_names
from enspipe.util.errors import ConfigError
from enspipe.util.fileio import atomic_write
from enspipe.report.paper import PAPER, Paper, paper_value, resolve_paper
from enspipe.report.stats import wilson_interval

__all__ = ["ATTACK_NAMES", "PAPER", "diagnostics_markdown", "headline", "markdown_tables", "plot_transfer_heatmap",
           "resolve_paper", "summary_table", "tied_best", "transfer_matrix", "transfer_table",
           "whitebox_table", "write_report"]

CI = tuple[float, float]

# The summary's white-box columns: the deterministic single-step attacks (Table 8 shows FGSM,
# Table 4 Step-LL). Names and display names come from the attack records.
SINGLE_STEP_WHITEBOX = attack_names(kind="single-step", random=False)
ATTACK_NAMES = {r.name: r.display for r in RECORDS}

# --- reading the results -----------------------------------------------------------------

def _ci(entry: Mapping[str, Any], top5: bool = False) -> CI:
    """The entry's 95% interval; recomputed (Wilson) from its counts if it carries none."""
    ci = entry.get("top5_ci95" if top5 else "ci95")
    if ci is not None:
        return (float(ci[0]), float(ci[1]))
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
    if attack is None:
        attack = transfer_attack_default(results)
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


def _with_paper(text: str, value: float | None) -> str:
    return text if value is None else f"{text} ({value:.1f})"


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
        if any(paper_value(paper, t, metric) is not None for t in models):
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
                pv = paper_value(paper, t, c[0] + ("_top5" if c[2] else ""))
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
            text = _with_paper(_pct(v), paper_value(paper, t, f"whitebox:{a}" + ("_top5" if top5 else "")))
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
                               paper_value(paper, t, key + ("_top5" if top5 else "")))
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
    models = list(results.get("models", {}))
    if _attack_order(results, "whitebox"):
        for top5 in tops:
            tag = " (top-5)" if top5 else ""
            keys = [f"whitebox:{a}" + ("_top5" if top5 else "") for a in _attack_order(results, "whitebox")]
            parts.append(f"#### White-box error{tag} (Tables 2 / 7)\n\nStrongest attack per model in bold"
                         f"{_paper_note(paper, models, keys)}.\n\n" + whitebox_table(results, paper, top5))
    for attack in _attack_order(results, "blackbox"):
        for top5 in tops:
            tag = " (top-5)" if top5 else ""
            keys = [k + ("_top5" if top5 else "") for k in
                    (f"whitebox:{attack}", *(f"transfer:{attack}:{s}" for s in _sources(results)))]
            parts.append(f"#### Transfer: {ATTACK_NAMES.get(attack, attack)}{tag} (Table 1)\n\n"
                         "Rows are targets, columns sources; † white-box (the source is the target); "
                         f"strongest attack per target in bold{_paper_note(paper, models, keys)}.\n\n"
                         + transfer_table(results, attack, paper, top5))
    return "\n\n".join(parts) + "\n"


def _paper_note(paper: Paper | None, models: Sequence[str], keys: Sequence[str]) -> str:
    """"; the paper's value in parentheses" when the table shows at least one, else nothing: a
    caption promises no paper value it does not show."""
    shown = any(paper_value(paper, t, k) is not None for t in models for k in keys)
    return "; the paper's value in parentheses" if shown else ""


def headline(results: Mapping[str, Any], where: str) -> str:
    """The evaluation's headline, one row per model: clean error, the strongest white-box attack
    and its error, the worst transferred attack's error (%, the tables below have the intervals)."""
    rows = []
    for t, m in (results.get("models") or {}).items():
        white = {a: _value(e) for a, e in (m.get("whitebox") or {}).items()}
        white = {a: v for a, v in white.items() if v is not None}
        top = max(white, key=white.get) if white else None
        rows.append([t, _pct(_value(m.get("clean"))),
                     f"{_pct(white[top])} ({ATTACK_NAMES.get(top, top)})" if top else "–",
                     _pct(m.get("blackbox_max"))])
    if not rows:
        return ""
    return (f"Error rates in % ({where}): clean, under the strongest white-box attack, and under the worst "
            "transferred one.\n\n" + _table(["Model", "clean", "white-box (strongest)", "black-box (max)"], rows))


# --- figures --------------------------------------------------------------------------------

def plot_transfer_heatmap(results: Mapping[str, Any], path: str | os.PathLike, *, attack: str | None = None,
                          top5: bool = False) -> Path:
    """A PNG heatmap of the transfer matrix (error in %), white-box cells outlined."""
    used = attack or transfer_attack_default(results)
    title = f"{ATTACK_NAMES.get(used, used)} transfer error (%){' top-5' if top5 else ''}"
    return plots.plot_transfer_heatmap(*transfer_matrix(results, attack=attack, top5=top5), path, title=title)


def transfer_attack_default(results: Mapping[str, Any]) -> str | None:
    """The attack a transfer matrix shows by default: the first single-step one transferred
    (FGSM, Step-LL), else the first one."""
    attacks = _attack_order(results, "blackbox")
    return next((a for a in attacks if a in SINGLE_STEP_WHITEBOX), attacks[0] if attacks else None)


# --- diagnostics ------------------------------------------------------------------------------

def diagnostics_markdown(diag: Mapping[str, Any], paper: Paper | None = None) -> str:
    """Table 6 / §4 measurements and Figure 2 shares for one `diagnostics.json`."""
    models = diag.get("models", {})
    header = ["Model", f"Approx. ratio % ({diag.get('single', '?')} / {diag.get('iterative', '?')})", "Gap %",
              "Cosine", "‖∇x L‖₁", "‖∇x L‖₂"]
    has_paper = any(paper_value(paper, t, "approximation_ratio") is not None for t in models)
    if has_paper:
        header.insert(2, "paper")
    rows = []
    for t, m in models.items():
        ar, gn = m.get("approximation_ratio", {}), m.get("gradient_norm", {})
        row = [t, _pct(ar.get("ratio")), _pct(ar.get("gap")), f"{m.get('cosine', {}).get('mean', float('nan')):.3f}",
               f"{gn.get('l1', float('nan')):.4g}", f"{gn.get('l2', float('nan')):.4g}"]
        if has_paper:
            pv = paper_value(paper, t, "approximation_ratio")
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
    from enspipe.util.fileio import parse_json

    try:
        return parse_json(path.read_bytes(), path)
    except (OSError, ConfigError):  # a missing or unreadable result file is left out of the report
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
    runs = _find(run_dir, "metrics.jsonl")
    if not results_files and not diag_files and not runs:
        parts.append("No results.json, diagnostics.json or metrics.jsonl found under this directory.")
    # The report opens with its headline numbers; the details (training, tables, figures) follow.
    evaluations = [(path, res if isinstance(res := _read(path), dict) and isinstance(res.get("models"), dict) else None)
                   for path in results_files]  # each file read once: the headline and its section
    heads = [h for path, res in evaluations if res is not None and (h := headline(res, _where(path.parent, run_dir)))]
    if heads:
        parts.append("## Headline\n\n" + "\n\n".join(heads))
    for path in runs:  # training runs: per-epoch table and loss / accuracy / validation curves
        where = _where(path.parent, run_dir)
        parts.append(f"## Training: {where}")
        records = curves.read_metrics(path)
        if not records:
            parts.append(f"`{_rel(path, run_dir)}` holds no metrics records yet.")
            continue
        fig = curves.plot_training_curves(records, run_dir / f"report-{_slug(where)}-training.png", title=where)
        parts += [curves.training_markdown(records), f"![training curves]({_rel(fig, run_dir)})"]
    for path, res in evaluations:
        where = _where(path.parent, run_dir)
        parts.append(f"## Evaluation: {where}")
        if res is None:
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
        target = plots.plot_subspace(subspaces, run_dir / f"report-{slug}-subspace.png")
    if target is not None and target.exists():
        lines.append(f"![adversarial subspaces (Figure 2)]({_rel(target, run_dir)})")
    for t, m in diag["models"].items():
        name = (m.get("figures") or {}).get("loss_surface")
        target = diag_dir / name if name else None
        if (target is None or not target.exists()) and m.get("loss_surface", {}).get("loss"):
            target = plots.plot_loss_surface(m["loss_surface"], run_dir / f"report-{slug}-{_slug(t)}-loss.png")
        if target is not None and target.exists():
            lines.append(f"![loss surface of {t} (Figures 1, 4, 5)]({_rel(target, run_dir)})")
    return lines
