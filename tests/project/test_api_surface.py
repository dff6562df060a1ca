"""One API shape: `stage(config) -> result` with the output inside the config, paths as str or
PathLike, stages on `import enspipe` (lazily); the old call forms warn. Evaluate and diagnose
refuse an architecture without weights, and tell apart runs in folders of one name."""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import enspipe
from cli_runner import run_cli



def test_import_enspipe_is_cheap_and_exposes_the_stages():
    code = ("import sys, enspipe\n"
            "assert 'torch' not in sys.modules, 'import enspipe imported torch'\n"
            "cfg = enspipe.PrecomputeConfig(model='m', out='o')\n"
            "assert 'torch' not in sys.modules\n"
            "print(sorted(n for n in enspipe.__all__ if not n.startswith('_')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("train", "precompute", "evaluate", "diagnose", "run_job", "TrainConfig", "PrecomputeConfig",
                 "EvalConfig", "DiagnoseConfig"):
        assert name in r.stdout and callable(getattr(enspipe, name)), name
    # The stage modules stay modules (attributes, submodule imports) and are callable as their stage.
    module = importlib.import_module("enspipe.train")
    assert enspipe.train is module and module.TrainConfig is enspipe.TrainConfig and callable(module)
    assert enspipe.diagnose is enspipe.diagnostics.run_diagnose


def test_every_stage_takes_one_config_with_paths(digits_static, tmp_path):
    """train -> precompute -> evaluate -> diagnose through `enspipe.<stage>(config)`, every
    path a pathlib.Path."""
    run = tmp_path / "runs" / "D"
    res = enspipe.train(enspipe.TrainConfig(model="D", limit=128, epochs=1, device="cpu", out=run))
    assert res.run_dir == run and (run / "model.safetensors").exists()
    saved = json.loads((run / "config.json").read_text())
    assert saved["run_dir"] == str(run) and saved["train"]["limit"] == 128
    (store,) = enspipe.precompute(enspipe.PrecomputeConfig(model=run, out=tmp_path / "stores", limit=128,
                                                           shard_size=64, device="cpu"))
    ens = enspipe.train(enspipe.TrainConfig(model="D", limit=128, epochs=1, mode="ens-adv", shards=(store,),
                                            device="cpu", out=tmp_path / "runs" / "ens"))
    results = enspipe.evaluate(enspipe.EvalConfig(models=(ens.run_dir,), sources=(run,), binarized=(ens.run_dir,),
                                                  limit=32, device="cpu", out=tmp_path / "results"))
    assert results["path"] == str(tmp_path / "results" / "results.json")
    assert set(results["models"]) == {"ens", "ens+binarized"} and "D" in results["models"]["ens"]["blackbox"]
    diag = enspipe.diagnose(enspipe.DiagnoseConfig(models=(ens.run_dir, run), limit=8, steps=2,
                                                   subspace_points=1, device="cpu", out=tmp_path / "diag"))
    assert Path(diag["path"]) == tmp_path / "diag" / "diagnostics.json"
    assert set(diag["models"]) == {"ens", "D"} and diag["config"]["steps"] == 2


def test_the_old_call_forms_still_work_and_warn(digits_static, tmp_path):
    from enspipe.diagnostics import run_diagnose
    from enspipe.evaluate import EvalConfig, evaluate
    from enspipe.train import TrainConfig, train

    with pytest.warns(DeprecationWarning, match="train"):
        res = train(TrainConfig(model="D", limit=64, epochs=1, device="cpu"), tmp_path / "r")
    assert (res.run_dir / "model.json").exists()
    with pytest.warns(DeprecationWarning, match="evaluate"):
        out = evaluate(EvalConfig(models=(str(digits_static),), limit=16, device="cpu"), tmp_path / "e")
    assert Path(out["path"]).exists()
    with pytest.warns(DeprecationWarning, match="DiagnoseConfig"):
        path = run_diagnose({"d": str(digits_static)}, out_dir=tmp_path / "d", limit=4, device="cpu", steps=2,
                            subspace_points=0)
    assert path == tmp_path / "d" / "diagnostics.json"
    with pytest.raises(enspipe.config.OptionError, match="out is required"):
        train(TrainConfig(model="D", limit=64, epochs=1, device="cpu"))


@pytest.mark.parametrize("argv", [
    ["evaluate", "--model", "D", "--dataset", "digits", "--limit", "8"],
    ["evaluate", "--model", "binarized:D", "--dataset", "digits", "--limit", "8"],
    ["diagnose", "--model", "D", "--dataset", "digits", "--limit", "8"],
])
def test_an_architecture_without_weights_is_refused(tmp_path, argv):
    r = run_cli(*argv, "--device", "cpu", "--out", tmp_path / "o")  # forked from the zygote
    assert r.returncode == 1
    assert r.stderr.strip() == ("enspipe: error: --model D is an architecture name, whose weights would be random: "
                                "pass --weights FILE or --pretrained, or name a run dir or checkpoint")
    assert not (tmp_path / "o").exists()


def test_an_architecture_with_weights_is_evaluated(digits_static, tmp_path):
    from enspipe.evaluate import EvalConfig, evaluate

    named = evaluate(EvalConfig(models=("D",), weights=str(digits_static), limit=64, device="cpu"))
    as_run = evaluate(EvalConfig(models=(str(digits_static),), limit=64, device="cpu"))
    assert named["models"]["D"]["clean"] == as_run["models"][digits_static.name]["clean"]
    with pytest.raises(enspipe.config.OptionError, match="weights gives the weights of the one model"):
        evaluate(EvalConfig(models=("D", "A"), weights=str(digits_static), limit=8, device="cpu"))


def test_runs_in_folders_of_one_name_get_distinct_names(digits_static, digits_static2, tmp_path):
    for seed, src in (("seed0", digits_static), ("seed1", digits_static2)):
        shutil.copytree(src, tmp_path / seed / "C")
    r = run_cli("evaluate", "--model", tmp_path / "seed0" / "C", "--model", tmp_path / "seed1" / "C", "--sources",
                tmp_path / "seed1" / "C", "--limit", "16", "--device", "cpu", "--out", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert set(res["models"]) == {"seed0/C", "seed1/C"}
    assert set(res["models"]["seed0/C"]["blackbox"]) == {"seed1/C"}
    # the same run is the same name as target and as source: the transfer matrix's diagonal
    assert res["models"]["seed1/C"]["blackbox_max"] is None

    from enspipe.util.naming import unique_labels

    for d in ("a", "b"):
        (tmp_path / d / "x" / "C").mkdir(parents=True)
    assert unique_labels([tmp_path / "a" / "x" / "C", tmp_path / "b" / "x" / "C", "D"]) == {
        str(tmp_path / "a" / "x" / "C"): "a/x/C", str(tmp_path / "b" / "x" / "C"): "b/x/C", "D": "D"}


def test_diagnose_tells_apart_runs_in_folders_of_one_name(digits_static, digits_static2, tmp_path):
    for seed, src in (("seed0", digits_static), ("seed1", digits_static2)):
        shutil.copytree(src, tmp_path / seed / "C")
    r = run_cli("diagnose", "--model", tmp_path / "seed0" / "C", "--model", tmp_path / "seed1" / "C", "--limit", "4",
                "--steps", "2", "--subspace-points", "0", "--device", "cpu", "--out", tmp_path / "diag")
    assert r.returncode == 0, r.stderr
    diag = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    assert set(diag["models"]) == {"seed0/C", "seed1/C"}
    assert diag["model_specs"] == {"seed0/C": str(tmp_path / "seed0" / "C"), "seed1/C": str(tmp_path / "seed1" / "C")}
