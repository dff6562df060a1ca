"""Promise 3, hostile and malformed input: a bad invocation of any command exits non-zero
(2 for usage errors, else 1) with one clear line on stderr, no traceback, nothing on stdout,
nothing half-written, and no pickle is ever executed."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from enspipe.stores.manifest import read_manifest

from .forge import Scene
from .processes import REPO, error_line, run_many
from .reference import train_args
from .sweep import FULL, TALLY


@dataclass(frozen=True)
class Bad:
    """A bad invocation: argv (built from the scene), words the error line must contain."""

    id: str
    argv: Callable[[Scene], list]
    words: tuple[str, ...]
    usage: bool = False          # a usage error: exit 2 (else 1); a value outside its field's declared
                                 # choices or range is one (config.DeclaredError), as click's own checks
    uid: int | None = None       # run as this user (root reads chmod-000 files)
    out: bool = False            # the command was asked to write s.out(): it must stay unwritten
    marks: tuple = ()


NOBODY = 65534


def _train(s: Scene, *extra, limit=64, out=None) -> list:
    return ["train", "--model", "D", "--dataset", "digits", "--limit", limit, "--epochs", 1, "--device", "cpu",
            *extra, "--out", out or s.out()]


def _evaluate(s: Scene, *extra, model=None, out=None) -> list:
    return ["evaluate", "--model", model or s.static, "--dataset", "digits", "--limit", 32, "--device", "cpu",
            *extra, "--out", out or s.out()]


def _pre(s: Scene, *extra, model=None, limit=64, out=None) -> list:
    return ["precompute", "--model", model or s.static, "--dataset", "digits", "--limit", limit, "--shard-size", 64,
            "--device", "cpu", *extra, "--out", out or s.out()]


BAD = [
    # train
    Bad("train: eps as 1/0", lambda s: _train(s, "--eps", "1/0"), ("--eps",), usage=True, out=True),
    Bad("train: eps nan", lambda s: _train(s, "--eps", "nan"), ("--eps", "nan"), usage=True, out=True),
    Bad("train: eps negative", lambda s: _train(s, "--eps", "-0.1"), ("--eps",), usage=True, out=True),
    Bad("train: epochs not a number", lambda s: _train(s, "--epochs", "many"), ("--epochs",), usage=True, out=True),
    Bad("train: negative batch size", lambda s: _train(s, "--batch-size", "-5"), ("--batch-size",), usage=True, out=True),
    Bad("train: lr nan", lambda s: _train(s, "--lr", "nan"), ("--lr",), usage=True, out=True),
    Bad("train: adv-fraction nan", lambda s: _train(s, "--mode", "adv", "--adv-fraction", "nan"),
        ("--adv-fraction",), usage=True, out=True),
    Bad("train: limit 0", lambda s: _train(s, limit=0), ("--limit",), usage=True, out=True),
    Bad("train: --out is a file", lambda s: _train(s, out=s.afile), ("afile.txt", "is a file"), usage=True),
    Bad("train: weights that are a pickle (.pt)", lambda s: _train(s, "--weights", s.evil_pt), ("evil.pt",), out=True),
    Bad("train: a pickle named .safetensors", lambda s: _train(s, "--weights", s.evil_st),
        ("evil.safetensors", "safetensors"), out=True),
    Bad("train: dataset path is a file", lambda s: _train(s, "--dataset", f"imagefolder:{s.afile}"),
        ("not a directory",), out=True),
    Bad("train: empty dataset (no images)", lambda s: _train(s, "--dataset", f"imagefolder:{s.noimages}"),
        ("no images",), out=True),
    Bad("train: empty dataset (wds tar without samples)", lambda s: _train(s, "--dataset", f"wds:{s.wds_empty}"),
        ("no samples",), out=True),
    Bad("train: images of the wrong geometry (wds)", lambda s: _train(s, "--dataset", f"wds:{s.wds_mixed}", limit=70),
        ("s0066", "20x20"), out=True),
    Bad("train: --shards is a file", lambda s: _train(s, "--mode", "ens-adv", "--shards", s.afile),
        ("not an enspipe store",), out=True),
    Bad("train: --device cuda without a GPU", lambda s: _train(s, "--device", "cuda"), ("CUDA",), out=True),
    Bad("train: --resume from a checkpoint that is a pickle",
        lambda s: train_args(s.ref, s.resume_pickle, "--resume"), ("checkpoint",)),
    Bad("train: --resume from a truncated checkpoint",
        lambda s: train_args(s.ref, s.resume_truncated, "--resume"), ("checkpoint",)),
    Bad("train: --resume with an unreadable config.json",
        lambda s: _train(s, "--resume", out=s.unreadable_run), ("Permission denied", "config.json"), uid=NOBODY),
    # evaluate
    Bad("evaluate: unknown attack", lambda s: _evaluate(s, "--attacks", "fgsm,bogus"), ("bogus",), usage=True, out=True),
    Bad("evaluate: eps 0", lambda s: _evaluate(s, "--eps", "0"), ("--eps",), usage=True, out=True),
    Bad("evaluate: batch size 0", lambda s: _evaluate(s, "--batch-size", "0"), ("--batch-size",), usage=True,
        out=True),
    Bad("evaluate: a model that does not exist", lambda s: _evaluate(s, "--model", s.base / "nope"), ("nope",),
        out=True),
    Bad("evaluate: a run whose weights are a pickle", lambda s: _evaluate(s, model=s.evil_run),
        ("model.safetensors",), out=True),
    Bad("evaluate: --out is a file", lambda s: _evaluate(s, out=s.afile), ("afile.txt",)),
    Bad("evaluate: images of the wrong geometry",
        lambda s: _evaluate(s, "--dataset", f"imagefolder:{s.rgb}", "--split", "train"),  # a flat folder: no test split
        ("1x28x28", "3x224x224"), out=True),
    # precompute
    Bad("precompute: negative shard size", lambda s: _pre(s, "--shard-size", "-1"), ("--shard-size",), usage=True,
        out=True),
    Bad("precompute: batch size 0", lambda s: _pre(s, "--batch-size", "0"), ("--batch-size",), usage=True,
        out=True),
    Bad("precompute: --out is a file", lambda s: _pre(s, out=s.afile), ("afile.txt",), usage=True),
    Bad("precompute: --data-root is a file", lambda s: _pre(s, "--data-root", s.afile), ("afile.txt",), usage=True,
        out=True),
    Bad("precompute: empty --attacks", lambda s: _pre(s, "--attacks", ""), ("--attacks",), out=True),
    Bad("precompute: unknown format", lambda s: _pre(s, "--format", "hdf5"), ("--format",), usage=True,
        out=True),
    Bad("precompute: --dask-workers not a number", lambda s: _pre(s, "--dask-workers", "two"), ("--dask-workers",), usage=True,
        out=True),
    Bad("precompute: unknown split", lambda s: _pre(s, "--split", "bogus"), ("bogus",), out=True),
    Bad("precompute: images of the wrong geometry", lambda s: _pre(s, "--dataset", f"imagefolder:{s.rgb}"),
        ("1x28x28", "3x"), out=True),
    Bad("precompute: weights that are a pickle", lambda s: _pre(s, "--weights", s.evil_pt, model="D"), ("evil.pt",),
        out=True),
    Bad("precompute: a run whose weights are a pickle", lambda s: _pre(s, model=str(s.evil_run)),
        ("model.safetensors",), out=True),
    Bad("precompute: a bare name without weights", lambda s: _pre(s, model="D"), ("--weights",), out=True),
    Bad("precompute: images of the wrong size mid-run (wds)",
        lambda s: _pre(s, "--dataset", f"wds:{s.wds_mixed}", limit=70), ("s0066", "20x20"), out=True),
    # verify
    Bad("verify: a store that does not exist", lambda s: ["verify", s.base / "nope.zarr"], ("does not exist",)),
    Bad("verify: a file", lambda s: ["verify", s.afile], ("not an enspipe store",)),
    Bad("verify: a garbage manifest", lambda s: ["verify", s.garbage_store], ("cannot be read",)),
    Bad("verify: an unreadable manifest", lambda s: ["verify", s.unreadable_store], ("Permission denied",), uid=NOBODY),
    Bad("verify: negative --recompute", lambda s: ["verify", s.ref.paths[".zarr"], "--recompute", "-1"],
        ("--recompute",), usage=True),
    # ls
    Bad("ls: a ROOT that does not exist", lambda s: ["ls", s.base / "nope"], ("does not exist",), usage=True),
    Bad("ls: a ROOT that is a file", lambda s: ["ls", s.afile], ("is a file",), usage=True),
    # run
    Bad("run: a spec that does not exist", lambda s: ["run", s.jobs / "nope.toml", "--dry-run"], ("does not exist",)),
    Bad("run: an include loop", lambda s: ["run", s.jobs / "loop_a.toml", "--dry-run"], ("include loop",)),
    Bad("run: an unknown key", lambda s: ["run", s.jobs / "unknown_key.toml", "--dry-run"], ("unknown key 'warmup'",)),
    Bad("run: invalid TOML", lambda s: ["run", s.jobs / "bad_syntax.toml", "--dry-run"], ("bad_syntax.toml",)),
    Bad("run: eps 1/0 in a spec", lambda s: ["run", s.jobs / "bad_eps.toml", "--dry-run"], ("eps",)),
    Bad("run: an include that is a directory", lambda s: ["run", s.jobs / "include_dir.toml", "--dry-run"],
        ("include_dir.toml",)),
    Bad("run: a dependency cycle", lambda s: ["run", s.jobs / "cycle.toml", "--dry-run"], ("cycle",)),
    Bad("run: an unreadable spec", lambda s: ["run", s.unreadable_spec, "--dry-run"], ("is not readable",),
        usage=True, uid=NOBODY),
    # diagnose
    Bad("diagnose: limit 0", lambda s: ["diagnose", "--model", s.static, "--limit", "0", "--out", s.out()],
        ("--limit",), usage=True, out=True),
    Bad("diagnose: eps nan", lambda s: ["diagnose", "--model", s.static, "--eps", "nan", "--out", s.out()],
        ("--eps",), usage=True, out=True),
    Bad("diagnose: a model that does not exist",
        lambda s: ["diagnose", "--model", s.base / "nope", "--device", "cpu", "--out", s.out()], ("nope",),
        out=True),
    # report
    Bad("report: a directory that does not exist", lambda s: ["report", s.base / "nope"], ("does not exist",),
        usage=True),
    Bad("report: a file", lambda s: ["report", s.afile], ("is a file",), usage=True),
]


def _half_written(path: Path) -> list[str]:
    """Artefacts a failed command must not leave: complete stores, models, checkpoints, results."""
    if not path.exists():
        return []
    bad = []
    for p in path.rglob("*"):
        if p.name in ("model.safetensors", "model.json", "results.json", "diagnostics.json", "report.md",
                      "job.json") or p.suffix in (".pt", ".png"):
            bad.append(str(p))
    for store in list(path.glob("**/*.zarr")) + list(path.glob("**/*.wds")):
        if (store / "manifest.json").is_file() and read_manifest(store)["complete"]:
            bad.append(f"complete store {store}")
    return bad


@pytest.fixture(scope="module")
def scene(digits_static, ref, ref_run, tmp_path_factory):
    """The files the bad invocations point at; the ones the uid=nobody cases read lie in a
    world-readable temp dir (pytest's own is private)."""
    public = Path(tempfile.mkdtemp(prefix="enspipe-rel-public-"))
    public.chmod(0o755)  # the uid=nobody cases must reach their (unreadable) files
    try:
        yield Scene(tmp_path_factory.mktemp("scene"), public, digits_static, ref, ref_run)
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.fixture(scope="module")
def bad_results(scene, tmp_path_factory) -> dict[str, list[dict]]:
    """Every bad invocation, run once: forked from one pre-imported interpreter (fast), and in
    the full sweep also as genuine `python -m enspipe` processes."""
    work = tmp_path_factory.mktemp("bad")
    cases = []
    for b in BAD:
        scene.current = b.id
        cases.append({"argv": [str(a) for a in b.argv(scene)], "cwd": str(scene.public if b.uid else scene.base),
                      "uid": b.uid})
    results = {b.id: [r] for b, r in zip(BAD, run_many(cases, work, fresh=False))}
    if FULL:
        real = [(b, c) for b, c in zip(BAD, cases) if b.uid is None]
        for (b, _), r in zip(real, run_many([c for _, c in real], work, fresh=True)):
            results[b.id].append(r)
    return results


@pytest.mark.parametrize("bad", [pytest.param(b, marks=b.marks, id=b.id) for b in BAD])
def test_bad_invocation_is_one_line_and_writes_nothing(bad, scene, bad_results):
    """Promise 3: a bad invocation exits non-zero (2 for usage errors, else 1) with one clear
    line on stderr naming the problem, no traceback, no output on stdout, nothing half-written,
    and never executes a pickle."""
    for res in bad_results[bad.id]:
        TALLY["bad inputs tried"] += 1
        assert res["rc"] == (2 if bad.usage else 1), (res["rc"], res["stderr"])
        if bad.id.startswith("verify:") and not bad.usage:  # verify reports: `STORE: problem`, BAD on stdout
            assert res["stdout"].startswith("BAD ") and "Traceback" not in res["stderr"], res
            (line,) = res["stderr"].strip().splitlines()
        else:
            line = error_line(res["stderr"])
            assert res["stdout"] == "", res["stdout"]
        for word in bad.words:
            assert word in line, (word, line)
        assert not scene.marker.exists(), "a pickle was executed"
        if bad.out:
            scene.current = bad.id
            assert not _half_written(scene.out()), _half_written(scene.out())
        TALLY["bad inputs rejected cleanly"] += 1


def test_the_package_never_loads_code_from_files():
    """Promise 3: every torch.load in the package passes weights_only=True; nothing calls
    pickle.load(s)/np.load(allow_pickle=True)/eval/exec on data, except the CIFAR unpickler
    whose find_class allows only numpy's array rebuilders (tested in test_data.py)."""
    import ast

    problems = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}"
            if name.endswith("torch.load") and kw.get("weights_only") != "True":
                problems.append(where)
            if name in ("pickle.load", "pickle.loads", "eval", "exec", "marshal.loads", "yaml.load"):
                problems.append(where)
            if name.endswith("np.load") and kw.get("allow_pickle", "False") != "False":
                problems.append(where)
    assert not problems, problems
