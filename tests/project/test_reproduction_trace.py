"""Issue 24: every measured number in REPRODUCTION.md traces to a committed raw results file.

A section that reports results carries `<!-- results: DIR -->` (DIR in the repository, holding
what `benchmarks/reproduce_mnist.py run --out` writes). For each such section the test
recomputes, from DIR's JSON with its own few lines (not the script that wrote the tables):
every cell of Tables 6, 7 and 8 (ours and the paper's), each claim's verdict and evidence, the
attack settings and the run line; then every other decimal or percentage in the section must
be a setting of the jobs / budget that made them (prose quotes no measured number). Outside
such sections no table may hold a percentage. A planted change of one number fails it.
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "REPRODUCTION.md"
MARK = re.compile(r"<!-- results: (\S+) -->")
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?%?")
ARCHS = ("A", "B", "Bstar", "C", "D")


def _sections(text: str) -> list[tuple[str, str]]:
    parts = re.split(r"(?m)^## ", text)
    return [(p.split("\n", 1)[0], p) for p in parts[1:]]


def _subsections(section: str) -> dict[str, str]:
    parts = re.split(r"(?m)^### ", section)
    return {p.split("\n", 1)[0]: p for p in parts[1:]}


def _table(block: str) -> list[list[str]]:
    rows = [line for line in block.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]  # after header and rule


def _paper(model: str, metric: str) -> float | None:
    from enspipe.report.paper import PAPER, paper_value

    name = model.replace("Bstar", "B*").replace("_adv_ens", "adv-ens").replace("_adv", "adv")
    return paper_value(PAPER["mnist"], name, metric)


def _p(model: str, metric: str) -> str:
    v = _paper(model, metric)
    return "-" if v is None else f"{v:g}" + ("‡" if model.startswith("C") else "")


def _pct(e: dict | None) -> str:
    return "-" if e is None else f"{100 * e['error']:.1f}"


def _ci(e: dict) -> str:
    return f"{100 * e['error']:.1f} [{100 * e['ci95'][0]:.1f}, {100 * e['ci95'][1]:.1f}]"


def _expected_rows(raw: dict) -> dict[str, dict[str, list[str]]]:
    """{table: {model: cells}} computed from the raw files."""
    t6, t7, t8 = raw["table6"], raw["table7"], raw["table8"]
    out: dict[str, dict[str, list[str]]] = {"6": {}, "7": {}, "8": {}}
    for name, m in t6["models"].items():
        out["6"][name] = [name, f"{100 * m['approximation_ratio']['ratio']:.0f}", _p(name, "approximation_ratio")]
    for name, m in t7["models"].items():
        wb, bb = m["whitebox"], m["blackbox"]
        cells = [name, _pct(m["clean"]), f"{_pct(wb.get('fgsm'))} ({_p(name, 'whitebox:fgsm')})",
                 f"{_pct(wb.get('rand_fgsm'))} ({_p(name, 'whitebox:rand_fgsm')})", _pct(wb.get("iter_fgsm"))]
        for s in ARCHS:
            key = f"transfer:fgsm:{s.replace('Bstar', 'B*')}"
            cells.append(f"{_pct(bb.get(s, {}).get('fgsm'))}{'†' if s == name else ''} ({_p(name, key)})")
        out["7"][name] = cells
    for name, m in t8["models"].items():
        # Max black-box: the strongest of the transferred attacks (every holdout x attack).
        entries = [e for per in m["blackbox"].values() for e in per.values()]
        strongest = max(entries, key=lambda e: e["error"])
        avg = sum(e["error"] for e in entries) / len(entries)
        paper = " / ".join(_p(name, k) for k in ("clean", "whitebox:fgsm", "blackbox_max", "blackbox_avg"))
        out["8"][name] = [name, _ci(m["clean"]), _ci(m["whitebox"]["fgsm"]), _ci(strongest), f"{100 * avg:.1f}", paper]
    return out


def _allowed() -> set[str]:
    """What prose in a results section may quote: the settings of the budget and the jobs that
    made the results, and the 95 of "95% intervals". Measured numbers belong in the checked
    tables and claims (a value matched by membership alone would trace nearly anything)."""
    values: list[float] = [95.0]

    def walk(o):
        if isinstance(o, bool):
            return
        if isinstance(o, (int, float)):
            values.append(float(o))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for spec in [REPO / "benchmarks" / "budget_cpu60k.toml", *sorted((REPO / "jobs").glob("mnist_*.toml"))]:
        walk(tomllib.loads(spec.read_text()))
    return {f"{v:g}" for v in values} | {str(v) for v in values}


def problems(text: str, repo: Path = REPO) -> list[str]:
    """What in `text` (REPRODUCTION.md) does not trace to its raw files; [] when all does."""
    found: list[str] = []
    sections = _sections(text)
    marked = [(title, body, MARK.search(body)) for title, body in sections]
    if not any(m for _, _, m in marked):
        found.append("no section names its raw results (<!-- results: DIR -->)")
    for title, body, mark in marked:
        if not mark:
            for line in body.splitlines():
                if line.startswith("|") and len(re.findall(r"\d\.\d+(?:%| \(| \[)", line)) >= 2:
                    found.append(f"{title}: a results table outside a results section: {line[:80]}")
            continue
        raw_dir = repo / mark.group(1)
        if not raw_dir.is_dir():
            found.append(f"{title}: {mark.group(1)} does not exist")
            continue
        raw = {p.stem: json.loads(p.read_text()) for p in raw_dir.glob("*.json")}
        subs = _subsections(body)
        checked: set[str] = set()
        expected = _expected_rows(raw)
        for key, rows in expected.items():
            heading = next((h for h in subs if h.startswith(f"Table {key}:")), None)
            if heading is None:
                found.append(f"{title}: no Table {key}")
                continue
            got = {r[0]: r for r in _table(subs[heading])}
            if set(got) != set(rows):
                found.append(f"{title}: Table {key} has rows {sorted(got)}, the raw file {sorted(rows)}")
            for model, cells in rows.items():
                if model in got and got[model] != cells:
                    bad = [f"{a!r} (raw: {b!r})" for a, b in zip(got[model], cells) if a != b]
                    found.append(f"{title}: Table {key}, {model}: {', '.join(bad)}")
            checked.add(heading)
        claims = {c["claim"]: c for c in raw["claims"]}
        lines = re.findall(r"(?ms)^- \((\w)\) .*?Test: (.*?)\. The same test", subs.get("Claims", ""))
        if sorted(k for k, _ in lines) != sorted(claims):
            found.append(f"{title}: claims {sorted(k for k, _ in lines)}, the raw file {sorted(claims)}")
        for k, test in lines:
            c = claims.get(k)
            verdict = {True: "**reproduced**", False: "**not reproduced**", None: "**not tested**"}[c["verdict"]] if c else ""
            if c and test != f"{c['test']}: {verdict} ({c['evidence']})":
                found.append(f"{title}: claim ({k}) differs from claims.json")
        checked.add("Claims")
        params = {**raw["table7"]["attack_params"], **raw["table8"]["attack_params"]}
        for line in subs.get("Attack settings (every parameter, from results.json)", "").splitlines()[1:]:
            if m := re.match(r"- `(\w+)`: (.*)", line):
                want = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                                 for k, v in params.get(m.group(1), {}).items())
                if m.group(2) != want:
                    found.append(f"{title}: attack settings of {m.group(1)}: {m.group(2)!r}, raw {want!r}")
        checked.add("Attack settings (every parameter, from results.json)")
        steps = raw["steps"]
        run = subs.get("Run", "")
        want_run = (f"{steps['workers']} workers, {steps['wall_s']:.0f} s wall, {sum(steps['steps_s'].values()):.0f} s "
                    f"of step time in {len(steps['steps_s'])} steps")
        if want_run not in run:
            found.append(f"{title}: the run line does not say {want_run!r}")
        checked |= {"Run", "Departures from the paper and the reference code"}  # settings text, no results
        allowed = _allowed()
        rest = body.split("\n### ", 1)[0] + "".join(f"\n### {h}" + s[len(h):] for h, s in subs.items()
                                                      if h not in checked)
        for token in NUMBER.findall(rest):
            plain = token.rstrip("%").replace(",", "")
            if ("." in plain or token.endswith("%")) and plain not in allowed:
                found.append(f"{title}: {token} in prose is no setting of the run: a measured number "
                             "belongs in a table or claim checked against the raw files")
    return found


def test_every_number_traces_to_a_raw_file():
    assert problems(DOC.read_text()) == []


@pytest.mark.parametrize("old,new", [
    ("| A | 1.7 | 94.2 (64.7) |", "| A | 1.7 | 94.3 (64.7) |"),          # one of ours in Table 7
    ("| A_adv | 2 | 0 |", "| A_adv | 2 | 1 |"),                            # the paper's, Table 6
    ("| C_adv | 2.3 | 21.4 (3.7‡) |", "| C_adv | 2.3 | 21.4 (3.7) |"),      # a C cell unmarked
    ("61.1 [58.0, 64.1]", "61.1 [58.0, 64.2]"),                            # an interval, Table 8
    ("Dadv: R+FGSM 61.8 [58.7, 64.8]%", "Dadv: R+FGSM 61.9 [58.7, 64.8]%"),  # a claim's evidence
    ("A_adv's white-box FGSM cell", "A_adv's white-box FGSM cell (9.6%)"),  # a number quoted in prose
    ("457 s wall", "450 s wall"),                                          # the run line
])
def test_a_planted_change_is_caught(old, new):
    text = DOC.read_text()
    assert old in text, old
    assert problems(text.replace(old, new, 1)), (old, new)


def test_an_untraced_results_table_is_caught():
    text = DOC.read_text().replace("## History (numbers removed)\n",
                                   "## History (numbers removed)\n\n| A_adv white-box FGSM; R+FGSM | 3.9% (2.2) | 14.8% (14.8) |\n", 1)
    assert any("outside a results section" in p for p in problems(text))


def test_the_section_is_what_the_script_prints_from_the_raw_files():
    """REPRODUCTION.md says its tables and claims are `reproduce_mnist.py tables RAW RAW`'s output."""
    import subprocess
    import sys

    for title, body in _sections(DOC.read_text()):
        mark = MARK.search(body)
        if not mark:
            continue
        raw = str(REPO / mark.group(1))
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reproduce_mnist.py"), "tables", raw, raw],
                             capture_output=True, text=True, timeout=600, check=True).stdout
        printed = [ln for ln in out.splitlines() if ln.startswith(("|", "- (", "‡"))]
        here = [ln for ln in body.split("### Attack settings", 1)[0].splitlines() if ln.startswith(("|", "- (", "‡"))]
        assert printed == here, title
