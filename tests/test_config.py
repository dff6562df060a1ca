"""The config machinery: strict parsing by field, CLI options derived from the same fields."""
from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from enspipe.config import OptionError, check, click_options, option, parse_config


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
        check(self.epochs >= 1, "epochs", f"must be at least 1, not {self.epochs}")


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
    assert CliRunner().invoke(cmd, ["--model", "A", "--epochs", "0"]).exit_code == 2
    assert CliRunner().invoke(cmd, []).exit_code == 2  # --model is required
