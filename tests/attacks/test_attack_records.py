"""One record per attack: every list of attacks reads the records, and adding an attack a store
can hold is one function and one record (shown in a scratch copy of the package, end to end)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from enspipe import attacks
from enspipe.attack_records import ATTACK_RECORDS, RECORDS, attack_names
from cli_runner import CLI

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"


def test_every_list_of_attacks_reads_the_records():
    from enspipe import report
    from enspipe.configs.diagnose import DiagnoseConfig
    from enspipe.config import _opt
    from enspipe.precompute import ATTACKS as PRECOMPUTE_ATTACKS
    from enspipe.train import TrainConfig

    def choices(cls, name):
        return next(_opt(f).choices for f in __import__("dataclasses").fields(cls) if f.name == name)

    # The paper's attacks, as the paper groups them (§3.2, §4.1): written here, not read from the code.
    assert set(ATTACK_RECORDS) == {"fgsm", "step_ll", "rand_fgsm", "rand_step_ll", "iter_fgsm", "iter_ll", "pgd",
                                   "pgd_cw"}
    assert set(attacks.SINGLE_STEP) == {"fgsm", "step_ll", "rand_fgsm", "rand_step_ll"}
    assert set(attacks.RANDOM) == {"rand_fgsm", "rand_step_ll", "pgd", "pgd_cw"}
    assert set(attacks.STORABLE) == {"fgsm", "step_ll"}
    assert list(attacks.ATTACKS) == [r.name for r in RECORDS]
    assert PRECOMPUTE_ATTACKS == choices(TrainConfig, "attack") == attack_names(storable=True)
    assert choices(DiagnoseConfig, "single") == attacks.SINGLE_STEP
    assert choices(DiagnoseConfig, "iterative") == attacks.ITERATIVE
    assert report.ATTACK_NAMES == {r.name: r.display for r in RECORDS} and report.ATTACK_NAMES["step_ll"] == "Step-LL"
    assert report.SINGLE_STEP_WHITEBOX == ("fgsm", "step_ll")  # Tables 4 and 8's white-box columns


def test_store_identities_of_the_recorded_attacks_are_unchanged():
    """A store's path derives from its identity: the records must describe FGSM and Step-LL
    exactly as the stores written before them do (these dicts are copied from such manifests)."""
    from enspipe.precompute.plan import _attack_params, _label_mode

    assert _attack_params("fgsm", "pred") == {"loss": "ce", "target": "pred_label", "direction": "sign(grad)"}
    assert _attack_params("fgsm", "true", "bf16") == {"loss": "ce", "target": "true_label",
                                                      "direction": "sign(grad)", "precision": "bf16"}
    assert _attack_params("step_ll", "true") == {"loss": "ce", "target": "least_likely", "direction": "-sign(grad)"}
    assert (_label_mode("fgsm", "true"), _label_mode("step_ll", "true")) == ("true", "pred")


def test_alpha_and_label_rules_come_from_the_records():
    # Closed forms of the docstrings: R+ eps/2, I- eps/k, PGD 2.5 eps/k; least-likely attacks take no label.
    assert attacks.attack_params("rand_step_ll", eps=0.3)["alpha"] == pytest.approx(0.15)
    assert attacks.attack_params("iter_ll", eps=0.3, steps=3)["alpha"] == pytest.approx(0.1)
    assert attacks.attack_params("pgd_cw", eps=0.2, steps=10)["alpha"] == pytest.approx(0.05)
    assert "label" not in attacks.attack_params("step_ll", eps=0.3)
    with pytest.raises(Exception, match="at most eps"):
        attacks.attack_params("rand_fgsm", eps=0.1, alpha=0.2)


# --- adding a storable attack: one function and one record ---------------------------------

NEW_FUNCTION = '''

def _cw_sign_direction(model, x, y, target):
    """sign of the gradient of the Carlini-Wagner margin max_{j != y} z_j - z_y (unclamped)."""
    grad, logits, labels = _input_grad(model, x, y, target, loss="cw", kappa=float("inf"))
    return grad.sign_(), logits, labels
'''
NEW_RECORD = ('    AttackRecord("fgsm_cw", "FGSM (CW margin)", None, "single-step", direction="_cw_sign_direction",\n'
              '                 store={"loss": "cw", "target": "{label}_label", "direction": "sign(grad)"}),\n')


def _scratch_package(root: Path) -> Path:
    """A copy of the package with one more storable attack: a function and a record, nothing else."""
    src = root / "src"
    shutil.copytree(PIPELINE, src / "enspipe", ignore=shutil.ignore_patterns("__pycache__"))
    with open(src / "enspipe" / "attacks.py", "a") as f:
        f.write(NEW_FUNCTION)
    records = src / "enspipe" / "attack_records.py"
    text = records.read_text()
    anchor = text.index("\n)\n", text.index("RECORDS: tuple[AttackRecord, ...] = ("))
    records.write_text(text[:anchor + 1] + NEW_RECORD + text[anchor + 1:])
    return src


def _cw_margin_sign(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The oracle, written out here: sign of d/dx (max_{j != y} z_j - z_y) with y = argmax z."""
    x = x.clone().requires_grad_(True)
    z = model(x).float()
    y = z.detach().argmax(1)
    other = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    (other - z.gather(1, y[:, None]).squeeze(1)).sum().backward()
    return x.grad.sign().to(torch.int8).numpy(), y.numpy()


def test_a_storable_attack_is_one_function_and_one_record(digits_static, tmp_path):
    """In a scratch copy, a new storable attack (sign of the CW margin's gradient) added as one
    function in attacks.py and one record in attack_records.py is precomputed into a store
    (whose directions equal the closed form computed here), trained with (ens-adv, its online
    passes included) and evaluated, through the command line."""
    src = _scratch_package(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(src), "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def cli(*args: object) -> subprocess.CompletedProcess:
        r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=1800)
        assert r.returncode == 0, r.stderr
        return r

    n = 256
    r = cli("precompute", "--model", digits_static, "--attacks", "fgsm_cw", "--limit", n, "--shard-size", 128,
            "--batch-size", 128, "--device", "cpu", "--out", tmp_path / "stores")
    store = r.stdout.split()[-1]
    manifest = json.loads((Path(store) / "manifest.json").read_text())
    assert manifest["identity"]["attack"] == "fgsm_cw"
    assert manifest["identity"]["attack_params"] == {"loss": "cw", "target": "pred_label", "direction": "sign(grad)"}

    # The stored directions are the CW margin's gradient signs, not FGSM's (the real package reads the store).
    from enspipe.data import create_dataset
    from enspipe.models import load_model
    from enspipe.stores import open_store

    model = load_model(digits_static).eval()
    stored = open_store(store).read_indices(np.arange(n))
    ds = create_dataset("digits", limit=n)
    want, labels = zip(*(_cw_margin_sign(model, ds.images(slice(b, b + 128))) for b in range(0, n, 128)))
    want, labels = np.concatenate(want), np.concatenate(labels)
    assert np.array_equal(stored["label"], labels)
    agree = (stored["direction"] == want).mean()
    assert agree > 0.999, agree  # only a gradient within rounding of 0 may take another sign
    fgsm_d = attacks.direction(model, ds.images(slice(0, n)), attack="fgsm", label="pred")[0].numpy()
    assert (fgsm_d != want).mean() > 0.01  # another loss: the test would notice FGSM stored instead

    cli("train", "--model", "D", "--mode", "ens-adv", "--shards", store, "--limit", n, "--epochs", 1,
        "--batch-size", 32, "--block-size", 32, "--device", "cpu", "--out", tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["attack"] == "fgsm_cw" and saved["stores"][0]["attack"] == "fgsm_cw"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m.get("online_passes", 0) for m in metrics) > 0  # the model itself attacked with fgsm_cw online

    r = cli("evaluate", "--model", tmp_path / "run", "--attacks", "fgsm_cw,fgsm", "--limit", 64, "--device", "cpu",
            "--out", tmp_path / "results")
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(results["models"]["run"]["whitebox"]) == {"fgsm_cw", "fgsm"}
