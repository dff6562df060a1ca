"""The config machinery: strict parsing by field, CLI options derived from the same fields."""
from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from enspipe.config import OptionError, check_declared, click_options, option, parse_config


def _eps(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den or 1)


@dataclass(frozen=True)
class Demo:
    model: str = option(help="a model")
    epochs: int = option(6, help="epochs", minimum=1)
    lr: float | None = option(None, help="lr")
    shards: tuple[str, ...] = option((), help="stores")
    resume: bool = option(False, help="go on")
    mode: str = option("clean", choices=("clean", "adv"), help="mode")
    eps: float = option(0.3, parse=_eps, metavar="EPS", help="budget")
    hidden: int = option(1, cli=False, job=False)

    def __post_init__(self):
        check_declared(self)


def test_parse_is_strict_and_names_the_field():
    d = parse_config(Demo, {"model": "A", "epochs": 3, "lr": 1, "shards": ["a", "b"], "eps": "16/256"})
    assert d == Demo(model="A", epochs=3, lr=1.0, shards=("a", "b"), eps=0.0625)
    assert isinstance(d.lr, float)
    cases = [({"model": "A", "epoch": 3}, "epoch", "is not an option"),
             ({"model": "A", "epochs": "3"}, "epochs", "must be an integer, not '3'"),
             ({"model": "A", "epochs": True}, "epochs", "must be an integer, not bool"),
             ({"model": "A", "shards": "a"}, "shards", "must be a list, not str"),
             ({"model": "A", "mode": "ens"}, "mode", "must be one of clean, adv, not 'ens'"),
             ({"model": "A", "resume": 1}, "resume", "must be true or false, not int"),
             ({"model": "A", "epochs": 0}, "epochs", "must be at least 1, not 0"),
             ({}, "model", "is required")]
    for table, field, problem in cases:
        with pytest.raises(OptionError) as e:
            parse_config(Demo, table)
        assert (e.value.field, e.value.problem[:len(problem)]) == (field, problem), table
        assert e.value.render("--" + field) == f"--{field} {e.value.problem}"


def test_cli_options_come_from_the_fields():
    @click.command()
    @click_options(Demo)
    def cmd(**kw):
        click.echo(repr(parse_config(Demo, kw)))

    r = CliRunner().invoke(cmd, ["--model", "A", "--shards", "x", "--shards", "y", "--eps", "16/256", "--resume"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(Demo(model="A", shards=("x", "y"), eps=0.0625, resume=True))
    help_text = CliRunner().invoke(cmd, ["--help"]).output
    assert "--hidden" not in help_text and "default: 6" in help_text and "clean|adv" in help_text
    # `minimum` is the config's own check (one message for the command line, job specs and the
    # API), not a click range: the command gets the OptionError naming the field.
    r = CliRunner().invoke(cmd, ["--model", "A", "--epochs", "0"])
    assert isinstance(r.exception, OptionError) and str(r.exception) == "epochs must be at least 1, not 0"
    assert CliRunner().invoke(cmd, []).exit_code == 2  # --model is required


def test_check_declared_enforces_choices_and_minimum_of_every_field():
    """What option() declares is enforced on every construction path (the API too), each item of
    a list field against its choices, a bounded number finite; None (an unset optional field) passes."""
    @dataclass(frozen=True)
    class C:
        n: int | None = option(None, minimum=1)
        k: int = option(0, minimum=0)
        x: float = option(0.5, minimum=0.25)
        f: float = option(0.5, above=0, maximum=1)
        p: float | None = option(None, above=0)
        mode: str = option("a", choices=("a", "b"))
        attacks: tuple[str, ...] = option(("p",), choices=("p", "q"))

        def __post_init__(self):
            check_declared(self)

    assert C(n=None, k=0, x=0.25, f=1, mode="b", attacks=("q", "p")) == C(None, 0, 0.25, 1, None, "b", ("q", "p"))
    cases = [({"n": 0}, "n", "must be at least 1, not 0"), ({"k": -1}, "k", "must be 0 or more, not -1"),
             ({"x": 0.2}, "x", "must be at least 0.25, not 0.2"), ({"n": "3"}, "n", "must be a number, not '3'"),
             ({"x": float("nan")}, "x", "must be at least 0.25, not nan"),
             ({"n": True}, "n", "must be a number, not True"),
             ({"f": 0}, "f", "must be in (0, 1], not 0"), ({"f": 1.5}, "f", "must be in (0, 1], not 1.5"),
             ({"f": float("inf")}, "f", "must be in (0, 1], not inf"), ({"p": 0.0}, "p", "must be a positive number, not 0.0"),
             ({"k": float("inf")}, "k", "must be 0 or more, not inf"),
             ({"mode": "c"}, "mode", "must be one of a, b, not 'c'"),
             ({"attacks": ("p", "r")}, "attacks", "names an unknown attack 'r': use one of p, q")]
    for kw, field, problem in cases:
        with pytest.raises(OptionError) as e:
            C(**kw)
        assert (e.value.field, e.value.problem) == (field, problem), kw


def test_stage_configs_declare_what_they_check():
    """Every stage config enforces its declared choices and minimums (check_declared) in a planted
    wrong value of each, so no hand-written copy of a declaration is needed."""
    import dataclasses

    import enspipe
    from enspipe.config import _opt

    required = {"TrainConfig": {"model": "D"}, "PrecomputeConfig": {"model": "m", "out": "o"},
                "EvalConfig": {"models": ("m",)}, "DiagnoseConfig": {"models": ("m",)}}
    checked = 0
    for name, base in required.items():
        cls = getattr(enspipe, name)
        for f in dataclasses.fields(cls):
            opt = _opt(f)
            bad = ("no-such-choice",) if opt.choices and f.name in ("attacks", "log") else \
                "no-such-choice" if opt.choices else (opt.minimum - 1 if opt.minimum is not None else
                                                      opt.above if opt.above is not None else None)
            if bad is None:
                continue
            with pytest.raises(OptionError) as e:
                cls(**base, **{f.name: bad})
            assert e.value.field == f.name, (name, f.name, str(e.value))
            checked += 1
    assert checked >= 35  # choices and ranges across the four stage configs


def test_the_config_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "import enspipe.configs.train, enspipe.configs.evaluate, enspipe.configs.diagnose\n"
            "import enspipe.precompute.config, enspipe.precision, enspipe.attack_records\n"
            "from enspipe.jobs import spec as jobspec\n"
            "keys = {k: jobspec.step_keys(k) for k in ('models', 'stores', 'evaluate', 'diagnose')}\n"
            "assert 'attack' in keys['models'] and 'precision' in keys['stores'], keys\n"
            "enspipe.configs.train.TrainConfig(model='D', precision='bf16', attack='step_ll')\n"
            "enspipe.configs.diagnose.DiagnoseConfig(models=('m',))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
