"""Issue 13: Iter-LL's fixed y_LL, per-attack options end to end, and BPDA on binarized models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from enspipe import attacks
from enspipe.attacks import attack_params, create_attack, iter_ll, parse_attack_options
from enspipe.data import create_dataset
from enspipe.util.errors import AttackError
from enspipe.evaluate import EvalConfig, evaluate
from enspipe.models import load_model_for
from cli_runner import run_cli  # real processes, forked from the suite's pre-imported zygote

LIMIT = 128


@pytest.fixture(scope="module")
def digits_test():
    return create_dataset("digits", split="test", limit=LIMIT)


@pytest.fixture(scope="module")
def model(digits_static, digits_test):
    return load_model_for(digits_static, digits_test, "cpu")


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.images(slice(0, LIMIT)), torch.as_tensor(digits_test.labels[:LIMIT])


# --- Iter-LL ------------------------------------------------------------------------------

def _iter_ll_loop(model, x, eps, steps, alpha, *, recompute: bool) -> torch.Tensor:
    """Iter-LL written out: y_LL = argmin h(x) of the clean x (Kurakin et al. 2017a), or, with
    `recompute`, the bug of issue 13 (argmin of the current iterate at every step)."""
    with torch.no_grad():
        y_ll = model(x).argmin(1)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    x_adv = x.clone()
    for _ in range(steps):
        xr = x_adv.clone().requires_grad_(True)
        logits = model(xr)
        target = logits.detach().argmin(1) if recompute else y_ll
        (g,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), xr)
        x_adv = torch.clamp(x_adv - alpha * g.sign(), lo, hi)
    return x_adv


def test_iter_ll_keeps_the_least_likely_class_of_the_clean_input(model, batch):
    x, _ = batch
    eps, steps = 0.3, 10
    got = iter_ll(model, x, eps=eps, steps=steps)
    assert torch.equal(got, _iter_ll_loop(model, x, eps, steps, eps / steps, recompute=False))
    # The test tells the two readings apart: recomputing y_LL per step gives another result.
    assert not torch.equal(got, _iter_ll_loop(model, x, eps, steps, eps / steps, recompute=True))
    assert torch.equal(create_attack("iter_ll", eps=eps, steps=steps)(model, x), got)


# --- per-attack options reach the attack ----------------------------------------------------

OPTION_CASES = [
    # (option, direct call with that parameter, the same call at the default)
    ("rand_fgsm.alpha=0.05",
     lambda m, x, y, g: attacks.rand_fgsm(m, x, y, eps=0.3, alpha=0.05, generator=g),
     lambda m, x, y, g: attacks.rand_fgsm(m, x, y, eps=0.3, generator=g)),
    ("pgd_cw.kappa=0.5",
     lambda m, x, y, g: attacks.pgd_cw(m, x, y, eps=0.3, steps=5, kappa=0.5, generator=g),
     lambda m, x, y, g: attacks.pgd_cw(m, x, y, eps=0.3, steps=5, generator=g)),
    ("pgd.steps=7",
     lambda m, x, y, g: attacks.pgd(m, x, y, eps=0.3, steps=7, generator=g),
     lambda m, x, y, g: attacks.pgd(m, x, y, eps=0.3, generator=g)),
    ("iter_fgsm.steps=3",
     lambda m, x, y, g: attacks.iter_fgsm(m, x, y, eps=0.3, steps=3),
     lambda m, x, y, g: attacks.iter_fgsm(m, x, y, eps=0.3)),
    ("iter_fgsm.alpha=0.05",
     lambda m, x, y, g: attacks.iter_fgsm(m, x, y, eps=0.3, alpha=0.05),
     lambda m, x, y, g: attacks.iter_fgsm(m, x, y, eps=0.3)),
]


@pytest.mark.parametrize("option, direct, default", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_an_attack_option_reaches_the_attack(option, direct, default, model, batch):
    x, y = batch
    opts = parse_attack_options([option])
    (name,) = opts
    extra = {"steps": 5} if name == "pgd_cw" else {}  # keep PGD-CW short; steps is its own option
    made = create_attack(name, eps=0.3, seed=3, **extra, **opts[name])(model, x, y)
    want = direct(model, x, y, torch.Generator().manual_seed(3))
    assert torch.equal(made, want)
    assert not torch.equal(made, default(model, x, y, torch.Generator().manual_seed(3)))


def test_evaluate_runs_and_records_every_resolved_parameter(digits_static, model, batch, tmp_path):
    """--attack-option through the stage: each option changes the error exactly as the direct
    call with that parameter does, and results.json holds every parameter of every attack."""
    x, y = batch
    options = ("rand_fgsm.alpha=0.05", "pgd_cw.kappa=0.5", "pgd_cw.steps=5", "pgd.steps=7")
    cfg = EvalConfig(models=(str(digits_static),), dataset="digits", limit=LIMIT, batch_size=LIMIT,
                     attacks=("fgsm", "rand_fgsm", "pgd", "pgd_cw"), attack_options=options, device="cpu")
    res = evaluate(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["attack_options"] == list(options)
    params = saved["attack_params"]
    assert params["rand_fgsm"] == {"eps": 0.3, "alpha": 0.05, "label": "true"}
    assert params["pgd_cw"] == {"eps": 0.3, "steps": 5, "alpha": pytest.approx(2.5 * 0.3 / 5), "kappa": 0.5,
                                "label": "true", "random_start": True}
    assert params["pgd"]["steps"] == 7 and params["pgd"]["loss"] == "ce" and "kappa" not in params["pgd"]
    assert params["fgsm"] == {"eps": 0.3, "label": "true"}
    (wb,) = [m["whitebox"] for m in res["models"].values()]
    seed = 0  # evaluate seeds batch b with seed * 1_000_003 + b: one batch, b = 0
    for name, call in [("rand_fgsm", OPTION_CASES[0][1]), ("pgd_cw", OPTION_CASES[1][1]),
                       ("pgd", OPTION_CASES[2][1])]:
        x_adv = call(model, x, y, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            errors = int((model(x_adv).argmax(1) != y).sum())
        assert wb[name]["errors"] == errors, name


def test_attack_params_are_the_documented_defaults():
    assert attack_params("rand_fgsm", eps=0.3)["alpha"] == 0.15          # the paper's eps/2
    assert attack_params("iter_fgsm", eps=0.3) == {"eps": 0.3, "steps": 10, "alpha": pytest.approx(0.03),
                                                   "label": "true"}   # the reference code's
    cw = attack_params("pgd_cw", eps=0.3)
    assert cw["kappa"] == 100.0 and cw["steps"] == 40 and cw["random_start"] is True
    assert attack_params("pgd", eps=0.3, loss="cw")["kappa"] == 100.0
    with pytest.raises(AttackError, match="kappa"):
        attack_params("pgd", eps=0.3, kappa=5)  # the CE loss has no confidence
    assert parse_attack_options(["pgd.random_start=false", "iter_fgsm.alpha=16/256"]) == {
        "pgd": {"random_start": False}, "iter_fgsm": {"alpha": 0.0625}}


@pytest.mark.parametrize("option, message", [
    ("pgd.kappa=-1", "--attack-option pgd.kappa=-1: kappa must be a finite number >= 0"),
    ("nope.alpha=1", "--attack-option nope.alpha=1: unknown attack 'nope'"),
    ("fgsm.steps=3", "--attack-option fgsm.steps=3: attack 'fgsm' has no option 'steps'; its options are label"),
    ("pgd_cw.kappa=5", "pgd_cw is not among the attacks evaluated (fgsm, pgd)"),
    ("pgd.eps=0.1", "eps is not a per-attack option"),
    ("pgd.steps", "must read ATTACK.KEY=VALUE"),
])
def test_a_bad_attack_option_is_one_clear_line(option, message, tmp_path):
    r = run_cli("evaluate", "--model", "D", "--attacks", "fgsm,pgd", "--attack-option", option, "--out", tmp_path / "r")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0], lines[0]
    assert not (tmp_path / "r").exists()


def test_a_job_spec_sets_attack_options_and_a_bad_one_names_its_line(tmp_path):
    from enspipe.util.errors import ConfigError
    from enspipe.jobs import load_job

    spec = """
[job]
name = "opts"
[data]
dataset = "digits"
[models.m]
arch = "D"
[evaluate.main]
targets = ["m"]
attacks = ["fgsm", "rand_fgsm", "pgd_cw"]
[evaluate.main.options]
rand_fgsm = { alpha = 0.05 }
pgd_cw = { kappa = 50, steps = 100 }
"""
    path = tmp_path / "job.toml"
    path.write_text(spec)
    (step,) = [s for s in load_job(path).steps if s.kind == "evaluate"]
    assert attacks.attack_option_strings(step.options["options"]) == (
        "rand_fgsm.alpha=0.05", "pgd_cw.kappa=50", "pgd_cw.steps=100")
    for bad, message in [("kappa = 50", "kappa = -1"), ("alpha = 0.05", "steps = 3")]:
        path.write_text(spec.replace(bad, message))
        with pytest.raises(ConfigError, match=r"job\.toml:\d+: evaluate\.main\.options .*" + message.split()[0]):
            load_job(path)
    path.write_text(spec.replace("rand_fgsm = { alpha = 0.05 }", "nope = { alpha = 1 }"))
    with pytest.raises(ConfigError, match="unknown attack 'nope'"):
        load_job(path)


# --- Appendix C.1: binarized inputs, attacked through the binarization ------------------------

def test_bpda_attacks_a_binarized_model_and_the_masked_one_does_not_move(digits_static, digits_test, batch):
    x, y = batch
    bpda = load_model_for(f"binarized:{digits_static}", digits_test, "cpu")
    masked = load_model_for(f"binarized-masked:{digits_static}", digits_test, "cpu")
    assert bpda.gradient == "bpda" and masked.gradient == "zero"

    def error(m, inputs):
        with torch.no_grad():
            return float((m(inputs).argmax(1) != y).float().mean())

    clean = error(bpda, x)
    assert clean == error(masked, x)  # the same forward pass
    attack = create_attack("iter_fgsm", eps=0.3)
    assert error(bpda, attack(bpda, x, y)) > clean + 0.05  # BPDA's white-box I-FGSM
    x_masked = attack(masked, x, y)
    assert torch.equal(x_masked, x) and error(masked, x_masked) == clean  # gradient masking


def test_evaluate_names_the_two_binarized_readings(digits_static, tmp_path):
    cfg = EvalConfig(models=(f"binarized:{digits_static}", f"binarized-masked:{digits_static}"),
                     dataset="digits", limit=64, attacks=("iter_fgsm",), device="cpu")
    res = evaluate(cfg, tmp_path)
    name = Path(digits_static).name
    bpda, masked = res["models"][f"{name}+binarized"], res["models"][f"{name}+binarized-masked"]
    assert masked["whitebox"]["iter_fgsm"]["error"] == masked["clean"]["error"]
    assert bpda["whitebox"]["iter_fgsm"]["error"] > bpda["clean"]["error"]


def test_evaluate_builds_each_attack_once_not_per_batch(digits_static, monkeypatch):
    """Parsing an attack's parameters happens once per evaluation: four batches parse exactly as
    often as one (the count of one batch is the oracle), and the seeded noise still differs
    per batch, as before (a random attack's errors over 4 batches equal those of its 4 batches
    evaluated with their own seeds)."""
    calls = []
    real = attacks._parse_params
    monkeypatch.setattr(attacks, "_parse_params", lambda name, params: calls.append(name) or real(name, params))

    def run(batch_size: int) -> tuple[int, dict]:
        calls.clear()
        res = evaluate(EvalConfig(models=(str(digits_static),), limit=LIMIT, batch_size=batch_size,
                                  attacks=("fgsm", "rand_fgsm"), device="cpu"))
        return len(calls), res["models"]

    one, _ = run(LIMIT)
    four, models = run(LIMIT // 4)
    assert four == one and one > 0
    (wb,) = [m["whitebox"] for m in models.values()]
    model = load_model_for(str(digits_static), create_dataset("digits", limit=1), torch.device("cpu"))
    data = create_dataset("digits", split="test", limit=LIMIT)
    errors = 0
    for b in range(4):  # seed * 1_000_003 + b with seed 0: batch b's own generator
        sl = slice(b * LIMIT // 4, (b + 1) * LIMIT // 4)
        x, y = data.images(sl), torch.as_tensor(data.labels[sl])
        x_adv = attacks.rand_fgsm(model, x, y, eps=0.3, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            errors += int((model(x_adv).argmax(1) != y).sum())
    assert wb["rand_fgsm"]["errors"] == errors
