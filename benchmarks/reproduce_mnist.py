"""Assemble REPRODUCTION.md's tables and claim checks from the MNIST jobs' outputs.

    ENSPIPE_DATA=/path/with/MNIST/raw enspipe run jobs/mnist_table7.toml --out runs/mnist_table7
    ENSPIPE_DATA=/path/with/MNIST/raw enspipe run jobs/mnist_table8.toml --out runs/mnist_table8
    python benchmarks/reproduce_mnist.py runs/mnist_table7 runs/mnist_table8 > reproduction-tables.md

Reads `evaluate/*/results.json` and `diagnose/*/diagnostics.json` under the two job
folders and prints Tables 6, 7 and 8 beside the paper's numbers, then checks the paper's
MNIST claims (a)-(e) on what was measured. Nothing here is hard-coded but the paper's
published numbers (enspipe.report.PAPER).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path



def _load(folder: Path, kind: str, name: str) -> dict:
    paths = sorted(folder.glob(f"{kind}/*/{name}"))
    if not paths:
        sys.exit(f"no {kind}/*/{name} under {folder}: run the job first")
    return json.loads(paths[0].read_text())


def pct(r: dict | float | None) -> str:
    if r is None:
        return "-"
    return f"{100 * (r['error'] if isinstance(r, dict) else r):.1f}"


def ci(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['error']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def paper_name(name: str) -> str:
    """Our job names -> the paper's: Bstar_adv -> B*adv, A_adv_ens3 -> Aadv-ens3."""
    return name.replace("Bstar", "B*").replace("_adv_ens", "adv-ens").replace("_adv", "adv")


def table6(diag: dict, paper: dict) -> list[str]:
    out = ["| model | ours: FGSM loss / PGD loss (%) | paper (%) |", "|---|---|---|"]
    for name, m in diag["models"].items():
        ratio = m["approximation_ratio"]["ratio"]
        theirs = paper.get(paper_name(name), {}).get("approximation_ratio", "-")
        out.append(f"| {name} | {100 * ratio:.0f} | {theirs} |")
    return out


def table7(res: dict, paper: dict) -> list[str]:
    sources = ["A", "B", "Bstar", "C", "D"]
    head = "| model | FGSM | R+FGSM | I-FGSM | " + " | ".join(f"FGSM from {s}" for s in sources) + " |"
    out = [head, "|" + "---|" * (4 + len(sources))]
    for name, m in res["models"].items():
        p = paper.get(paper_name(name), {}) if "+binarized" not in name else {}
        wb = m["whitebox"]
        cells = [f"{pct(wb.get('fgsm'))} ({p.get('whitebox:fgsm', '-')})",
                 f"{pct(wb.get('rand_fgsm'))} ({p.get('whitebox:rand_fgsm', '-')})",
                 pct(wb.get("iter_fgsm"))]
        for s in sources:
            r = m["blackbox"].get(s, {}).get("fgsm")
            mark = "†" if s == name else ""
            cells.append(f"{pct(r)}{mark} ({p.get('transfer:fgsm:' + paper_name(s), '-')})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def table8(res: dict, paper: dict) -> list[str]:
    out = ["| model | clean | white-box FGSM | max black-box | avg black-box | paper: clean / FGSM / max / avg |",
           "|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        p = paper.get(paper_name(name), {})
        pp = " / ".join(str(p.get(k, "-")) for k in ("clean", "whitebox:fgsm", "blackbox_max", "blackbox_avg"))
        out.append(f"| {name} | {ci(m['clean'])} | {ci(m['whitebox']['fgsm'])} | {pct(m['blackbox_max'])} | "
                   f"{pct(m['blackbox_avg'])} | {pp} |")
    return out


def claims(t7: dict, diag: dict, t8: dict) -> list[str]:
    out = []
    m7, m8, d = t7["models"], t8["models"], diag["models"]

    def verdict(ok: bool) -> str:
        return "**reproduced**" if ok else "**not reproduced**"

    pairs = [(a, f"{a}_adv") for a in ("A", "B", "Bstar", "C", "D") if a in d and f"{a}_adv" in d]
    lower = [(a, d[a]["approximation_ratio"]["ratio"], d[b]["approximation_ratio"]["ratio"]) for a, b in pairs]
    ok = all(adv < std for _, std, adv in lower)
    out.append(f"(a) Single-step adversarial training lowers the FGSM approximation ratio: {verdict(ok)} "
               f"({sum(adv < std for _, std, adv in lower)} of {len(lower)} architectures: "
               + ", ".join(f"{a} {100 * s:.0f}% -> {100 * v:.0f}%" for a, s, v in lower) + ").")

    a = m7["A_adv"]["whitebox"]
    ok = a["rand_fgsm"]["error"] > a["fgsm"]["error"]
    out.append(f"(b) For A_adv, white-box R+FGSM error exceeds white-box FGSM error: {verdict(ok)} "
               f"(R+FGSM {ci(a['rand_fgsm'])}% vs FGSM {ci(a['fgsm'])}%).")

    bb = {s: r["fgsm"] for s, r in m7["A_adv"]["blackbox"].items() if s != "A"}
    best = max(bb, key=lambda s: bb[s]["error"])
    ok = bb[best]["error"] > a["fgsm"]["error"]
    out.append(f"(c) For A_adv, black-box FGSM from an undefended model exceeds white-box FGSM: {verdict(ok)} "
               f"(strongest transfer from {best}: {ci(bb[best])}% vs white-box {ci(a['fgsm'])}%; "
               f"{sum(r['error'] > a['fgsm']['error'] for r in bb.values())} of {len(bb)} sources exceed it).")

    rows = []
    for arch in ("A", "C"):
        base = m8[f"{arch}_adv"]["blackbox_max"]
        for v in ("ens", "ens3"):
            rows.append((f"{arch}_adv_{v}", m8[f"{arch}_adv_{v}"]["blackbox_max"], f"{arch}_adv", base))
    ok = all(x < b for _, x, _, b in rows)
    out.append(f"(d) Ensemble adversarial training lowers the max black-box error relative to A_adv / C_adv: "
               f"{verdict(ok)} (" + "; ".join(f"{n} {100 * x:.1f}% vs {bn} {100 * b:.1f}%" for n, x, bn, b in rows)
               + ").")

    binar = m7.get("A+binarized", {}).get("whitebox", {}).get("iter_fgsm")
    adv = m7["A_adv"]["whitebox"].get("iter_fgsm")
    if binar and adv:
        lo1, hi1 = binar["ci95"]
        lo2, hi2 = adv["ci95"]
        similar = not (hi1 < lo2 or hi2 < lo1) or abs(binar["error"] - adv["error"]) < 0.05
        out.append(f"(e) Binarized inputs give robustness similar to adversarial training against white-box "
                   f"I-FGSM: {verdict(similar)} (A+binarized {ci(binar)}% vs A_adv {ci(adv)}%; similar = the 95% "
                   f"intervals overlap or the errors are within 5 points).")
    return out


def main(argv: list[str]) -> None:
    from enspipe.report import PAPER

    t7_dir, t8_dir = Path(argv[0]), Path(argv[1])
    t7 = _load(t7_dir, "evaluate", "results.json")
    diag = _load(t7_dir, "diagnose", "diagnostics.json")
    t8 = _load(t8_dir, "evaluate", "results.json")
    paper = PAPER["mnist"]
    lines = ["### Table 6: approximation ratio", "", *table6(diag, paper), "",
             "### Table 7: white-box and black-box FGSM (eps 0.3), error % (paper in parentheses; † = white-box)",
             "", *table7(t7, paper), "",
             "### Table 8: ensemble adversarial training, error % [95% CI]", "",
             *table8(t8, paper), "", "### Claims", "", *[f"- {c}" for c in claims(t7, diag, t8)]]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
