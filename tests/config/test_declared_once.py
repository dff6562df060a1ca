"""Each concept declared once (issue 27's leftovers): the eps range, the evaluable attacks, the
precision vocabulary and the "static model step" rule each have one statement that every
reader uses. The oracles are written out here: the paper's eps budget lies in (0, 1] (pixels
are in [0, 1]); a `[models.X]` step is static when `train = false`, which `pretrained = true`
implies unless `train` says otherwise (README, "Job specs")."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from enspipe.attack_records import RECORDS
from enspipe.config import DeclaredError, OptionError
from enspipe.configs.diagnose import DiagnoseConfig
from enspipe.configs.evaluate import EvalConfig
from enspipe.configs.train import TrainConfig

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"

STAGES = [lambda eps: TrainConfig(model="A", eps=eps), lambda eps: EvalConfig(models=("A",), eps=eps),
          lambda eps: DiagnoseConfig(models=("A",), eps=eps)]


@pytest.mark.parametrize("make", STAGES, ids=["train", "evaluate", "diagnose"])
def test_eps_range_is_checked_once_the_same_for_text_and_numbers(make):
    # Inside (0, 1]: accepted as text or number, fractions read exactly.
    for text, value in (("1", 1.0), ("16/256", 0.0625), ("1e-9", 1e-9), (0.3, 0.3)):
        assert make(text).eps == value
    # Outside: the field's declared range refuses, with one line that does not depend on
    # whether the value came as text (a job key, a flag) or as a number (the Python API).
    for bad in (0.0, 1.5, -0.25, 1.0000001):
        with pytest.raises(DeclaredError) as as_number:
            make(bad)
        with pytest.raises(DeclaredError) as as_text:
            make(repr(bad))
        assert str(as_text.value) == str(as_number.value) == f"eps must be in (0, 1], not {float(bad)!r}"
    # Text that is no number at all: the parser's one line, naming the field.
    with pytest.raises(OptionError, match=r"^eps must be a number in \(0, 1\] such as 0.3 or 16/256, got 'abc'"):
        make("abc")


def test_eval_attacks_are_the_records_and_no_second_list():
    from enspipe import attacks
    from enspipe.config import _opt
    from enspipe.configs import evaluate as evaluate_config
    import dataclasses

    names = tuple(r.name for r in RECORDS)
    choices = {f.name: _opt(f).choices for f in dataclasses.fields(EvalConfig)}["attacks"]
    assert choices == names == tuple(attacks.ATTACKS)
    assert not hasattr(evaluate_config, "ATTACKS")
    # No module of the package assigns another tuple/list of attack names by hand.
    spelled = [p.relative_to(PIPELINE) for p in PIPELINE.rglob("*.py")
               if re.search(r'^\w*ATTACKS\w* = [(\[]"', p.read_text(), re.M)]
    assert spelled == [], spelled


@pytest.mark.parametrize("options, static", [
    ({}, False), ({"train": True}, False), ({"train": False}, True), ({"pretrained": True}, True),
    ({"pretrained": True, "train": True}, False), ({"pretrained": False, "train": False}, True),
])
def test_static_model_step_rule_is_stated_once(options, static):
    from enspipe.jobs.spec import is_static

    assert is_static(options) is static


def test_static_model_step_expression_appears_once():
    hits = [(p.relative_to(PIPELINE), n) for p in PIPELINE.rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if 'get("train", not' in line]
    assert [str(p) for p, _ in hits] == ["jobs/spec.py"], hits


def test_a_job_static_step_without_weights_is_refused(tmp_path):
    from enspipe.jobs.spec import load_job

    spec = tmp_path / "job.toml"
    spec.write_text('[data]\ndataset = "digits"\n[models.a]\narch = "A"\ntrain = false\n')
    from enspipe.util.errors import ConfigError

    with pytest.raises(ConfigError, match="models.a.train = false uses a model as given"):
        load_job(spec)


def test_a_job_key_left_out_means_the_configs_default(tmp_path, monkeypatch):
    """[budget] epoch_scale scales the epochs a model step leaves out: TrainConfig's default,
    read from the field (moved to 9 here: ceil(9 * 0.5) = 5), not a copy of it."""
    from enspipe.jobs.spec import load_job, resolved

    spec = tmp_path / "job.toml"
    spec.write_text('[data]\ndataset = "digits"\n[budget]\nepoch_scale = 0.5\n[models.a]\narch = "A"\n'
                    '[models.b]\narch = "A"\nepochs = 4\n')
    monkeypatch.setattr(TrainConfig.__dataclass_fields__["epochs"], "default", 9)
    job = load_job(spec)
    assert {s.name: resolved(job, s)["epochs"] for s in job.steps} == {"a": 5, "b": 2}


def test_help_strings_read_the_lists_they_name():
    """`--lr`'s help shows the optimizers' default learning rates (the paper's Adam 1e-3 for
    MNIST, RMSProp 0.045 for Inception; SGD the reference code's 0.01) from OPTIMIZERS, and
    `--model`'s the model registry's MNIST architectures."""
    import dataclasses

    from enspipe.config import _opt, help_text
    from enspipe.models import MNIST_ARCHS

    opts = {f.name: _opt(f) for f in dataclasses.fields(TrainConfig)}
    assert help_text(opts["lr"]) == "Learning rate [adam 0.001, rmsprop 0.045, sgd 0.01]."
    # Written out (`--help` must not import torch, which enspipe.models does), kept equal here.
    assert help_text(opts["model"]).startswith(f"Architecture ({', '.join(MNIST_ARCHS)}, resnet50, timm:NAME)")
