"""enspipe.report on hand-made results with known counts: intervals, bold marks, the
transfer matrix's diagonal, and a whole report written from files."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from enspipe.util.errors import ConfigError
from enspipe.report.stats import wilson_interval
from enspipe.report import (
    PAPER,
    markdown_tables,
    plot_transfer_heatmap,
    resolve_paper,
    summary_table,
    tied_best,
    transfer_matrix,
    write_report,
)

N = 1000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def entry(errors: int, top5: int | None = None, ci: bool = True) -> dict:
    e = {"errors": errors, "n": N, "error": errors / N}
    if ci:
        e["ci95"] = list(wilson_interval(errors, N))  # as evaluate writes it (a list in JSON)
    if top5 is not None:
        e["top5_error"] = top5 / N
        e["top5_ci95"] = list(wilson_interval(top5, N))
    return e


def model(clean: int, white: dict[str, int], black: dict[str, dict[str, int]]) -> dict:
    bb = {s: {a: entry(c) for a, c in per.items()} for s, per in black.items()}
    flat = [e["error"] for per in bb.values() for e in per.values()]
    return {"clean": entry(clean), "whitebox": {a: entry(c) for a, c in white.items()}, "blackbox": bb,
            "blackbox_max": max(flat) if flat else None, "blackbox_avg": sum(flat) / len(flat) if flat else None}


@pytest.fixture
def results() -> dict:
    # Clean: A 1.0% and B 1.2% overlap (tied), C 6.0% does not.
    # FGSM white-box: C 2.0% is best; B 2.5% overlaps it; A 30% does not.
    # Max black-box: A 10% (from B, fgsm), B 9% (from A, iter_fgsm), C 30% (from A, fgsm).
    return {
        "config": {"attacks": ["fgsm", "iter_fgsm"], "eps": 0.3, "sources": ["A", "B"]},
        "dataset": {"source": "digits"},
        "models": {
            "A": model(10, {"fgsm": 300, "iter_fgsm": 900},
                       {"A": {"fgsm": 300, "iter_fgsm": 900}, "B": {"fgsm": 100, "iter_fgsm": 40}}),
            "B": model(12, {"fgsm": 25, "iter_fgsm": 800},
                       {"A": {"fgsm": 80, "iter_fgsm": 90}, "B": {"fgsm": 25, "iter_fgsm": 800}}),
            "C": model(60, {"fgsm": 20, "iter_fgsm": 700},
                       {"A": {"fgsm": 300, "iter_fgsm": 50}, "B": {"fgsm": 200, "iter_fgsm": 60}}),
        },
    }


def pct_ci(errors: int) -> str:
    lo, hi = wilson_interval(errors, N)
    return f"{100 * errors / N:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def cells(table: str, row: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_transfer_matrix_puts_whitebox_on_the_diagonal(results):
    # Make the diagonal's black-box copy differ, to see which one is used.
    results["models"]["A"]["blackbox"]["A"]["fgsm"] = entry(999)
    rows, cols, values = transfer_matrix(results)
    assert rows == ["A", "B", "C"] and cols == ["A", "B"]
    assert values[0][0] == 0.300  # A's white-box FGSM, not the 99.9% of the black-box copy
    assert values[1][1] == 0.025  # B's white-box FGSM
    assert values[0][1] == 0.100 and values[2][0] == 0.300 and values[2][1] == 0.200
    _, _, iter_values = transfer_matrix(results, attack="iter_fgsm")
    assert iter_values[0][0] == 0.900 and iter_values[1][0] == 0.090


def test_summary_intervals_and_bold_marks(results):
    table = summary_table(results)
    header = cells(table, "Model")
    assert header == ["Model", "Clean", "FGSM", "Max. black-box", "Avg. black-box"]
    a, b, c = cells(table, "A"), cells(table, "B"), cells(table, "C")
    # clean: A best, B tied (intervals overlap), C apart
    assert a[1] == f"**{pct_ci(10)}**" and b[1] == f"**{pct_ci(12)}**" and c[1] == pct_ci(60)
    # white-box FGSM: C best, B tied, A apart
    assert c[2] == f"**{pct_ci(20)}**" and b[2] == f"**{pct_ci(25)}**" and a[2] == pct_ci(300)
    # max black-box: the max entry's own interval; B (9%) best, A (10%) tied, C (30%) apart
    assert b[3] == f"**{pct_ci(90)}**" and a[3] == f"**{pct_ci(100)}**" and c[3] == pct_ci(300)
    # (A's 30% and 90% "from A" are white-box: a source with the target's name is left out.)
    # avg black-box of A: mean of 10% and 4% from B, with the mean of the bounds as interval
    errs = [100, 40]
    lo = sum(wilson_interval(e, N)[0] for e in errs) / 2
    hi = sum(wilson_interval(e, N)[1] for e in errs) / 2
    assert a[4].strip("*") == f"{100 * sum(errs) / 2 / N:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def test_missing_intervals_are_recomputed_from_counts(results):
    results["models"]["C"]["clean"] = entry(60, ci=False)
    assert cells(summary_table(results), "C")[1] == pct_ci(60)


def test_groups_restrict_the_tied_for_best_comparison(results):
    table = summary_table(results, groups={"first": ["A"], "second": ["B", "C"]})
    assert cells(table, "A")[2].startswith("**")  # best of its own group, however bad
    assert cells(table, "C")[1] == pct_ci(60)  # B is better in C's group


def test_tied_best():
    assert tied_best({"a": (0.1, (0.08, 0.12)), "b": (0.13, (0.11, 0.15)), "c": (0.2, (0.18, 0.22)),
                      "d": None}) == {"a", "b"}
    assert tied_best({}) == set()


def test_top5_columns_and_paper_numbers(results):
    for name, m in results["models"].items():
        m["clean"] = entry(m["clean"]["errors"], top5=m["clean"]["errors"] // 2)
    paper = {"A_adv": {"clean": 0.8}, "B": {"whitebox:fgsm": 11.6}}
    results["models"]["Aadv"] = results["models"].pop("A")  # names match loosely: Aadv ~ A_adv
    md = markdown_tables(results, paper)
    summary = md.split("#### White-box")[0]
    header = cells(summary, "Model")
    assert "Clean top-5" in header and header.count("paper") == 2
    row = cells(summary, "Aadv")
    assert row[header.index("Clean") + 1] == "0.8"
    assert cells(summary, "B")[header.index("FGSM") + 1] == "11.6"
    assert "#### Transfer: FGSM (Table 1)" in md and "#### Transfer: I-FGSM (Table 1)" in md
    assert "(11.6)" in md.split("#### White-box error (Tables 2 / 7)")[1]  # beside ours in Table 2/7 form


def test_transfer_table_marks(results):
    md = markdown_tables(results)
    fgsm = md.split("#### Transfer: FGSM (Table 1)")[1].split("####")[0]
    row_a = cells(fgsm, "A")
    assert row_a[1] == "**30.0†**" and row_a[2] == "10.0"  # white-box dagger; strongest in bold
    assert cells(fgsm, "C")[1] == "**30.0**"


def test_paper_tables():
    mnist = PAPER["mnist"]
    assert mnist["Aadv"]["whitebox:fgsm"] == 2.2 and mnist["Dadv-ens3"]["blackbox_avg"] == 15.6
    assert mnist["A"]["approximation_ratio"] == 17 and mnist["B*"]["transfer:fgsm:A"] == 44.3
    assert "transfer:fgsm:A" not in mnist["A"]  # Table 7's "-": no transfer from itself
    imagenet = PAPER["imagenet"]
    assert imagenet["v3adv"]["whitebox:step_ll"] == 26.6 and imagenet["v3"]["transfer:step_ll:v4"] == 43.8
    assert imagenet["IRv2adv-ens"]["blackbox_max_top5"] == 7.9
    assert resolve_paper("mnist") is mnist
    with pytest.raises(ConfigError):
        resolve_paper("cifar")


def test_heatmap_png(results, tmp_path):
    path = plot_transfer_heatmap(results, tmp_path / "t.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def diagnostics_dict() -> dict:
    grid = [0.0, 0.15, 0.3]
    return {
        "format": "enspipe-diagnostics/1", "eps": 0.3, "n": 8, "single": "fgsm", "iterative": "pgd", "steps": 5,
        "models": {"Aadv": {
            "approximation_ratio": {"ratio": 0.05, "gap": 0.95},
            "cosine": {"mean": 0.02}, "gradient_norm": {"l1": 3.0, "l2": 0.5},
            "loss_surface": {"other": "B", "eps1": grid, "eps2": grid,
                             "loss": [[[0.1, 0.2, 0.3], [0.2, 0.3, 0.4], [0.3, 0.4, 0.9]]]},
            "subspace": {"ks": [4], "n_points": 8, "curves": [{"eps": 0.3, "share_at_least": [0.5, 0.25, 0.0, 0.0]}]},
            "figures": {"loss_surface": "missing.png"},
        }},
        "figures": {"subspace": "subspace.png"},
    }


def test_write_report(results, tmp_path):
    (tmp_path / "evaluate" / "t8").mkdir(parents=True)
    (tmp_path / "evaluate" / "t8" / "results.json").write_text(json.dumps(results))
    (tmp_path / "diagnose" / "d").mkdir(parents=True)
    (tmp_path / "diagnose" / "d" / "diagnostics.json").write_text(json.dumps(diagnostics_dict()))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    path = write_report(tmp_path, paper="mnist")
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert "## Evaluation: evaluate/t8" in text and "## Diagnostics: diagnose/d" in text
    assert "not a readable evaluate results file" in text  # a bad file is named, not fatal
    assert "| Aadv | 5.0 | 0 | 95.0 |" in text  # our ratio, the paper's Table 6 value, the gap
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 3  # transfer heatmap, subspace and loss surface (both redrawn from JSON)
    for link in links:
        assert (tmp_path / link).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ConfigError):
        write_report(tmp_path / "nowhere")


def test_report_never_imports_torch(results, tmp_path):
    """The report depends on result files, enspipe.report.stats and enspipe.report.plots only: importing
    it, and writing a report that redraws every figure, loads no torch."""
    subprocess.run([sys.executable, "-c", "import sys, enspipe.report; assert 'torch' not in sys.modules"],
                   check=True, env=os.environ)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.json").write_text(json.dumps(results))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "diagnostics.json").write_text(json.dumps(diagnostics_dict()))
    code = ("import sys, enspipe.report as r; r.write_report(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=os.environ)
    assert len(list(tmp_path.glob("report-*.png"))) == 3  # heatmap, subspace and loss surface redrawn
