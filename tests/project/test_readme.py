"""README.md as a newcomer reads it: every python block runs as printed, and every command named
in its shell blocks exists with the flags it is given.

The python blocks run in order in one namespace (as a reader pastes them into one session), in a
scratch working directory: the API block trains a static model and precomputes its stores, the
own-loop and Lightning recipes train on them, the webdataset snippet reads a wds store. Nothing
is substituted: the blocks are extracted from README.md and executed verbatim. The oracles are
the test's own: the loss the recipe prints falls, the trained model's accuracy on the held-out
digits (computed here) is far above chance, and every module of the model is in train mode
while it trains (the recipe's dropout is on).
"""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def _blocks(lang: str | None) -> list[str]:
    """The fenced blocks of README.md in `lang` (None: blocks without a language)."""
    text = README.read_text()
    found = re.findall(r"^```([a-z]*)\n(.*?)^```$", text, flags=re.M | re.S)
    return [body for tag, body in found if (tag or None) == lang]


def _python_block(marker: str) -> str:
    (block,) = [b for b in _blocks("python") if marker in b]
    return block


# Each python block, named by a line only it has; a block the test does not know fails below.
MARKERS = {"api": "import enspipe\n", "loop": "def ens_adv_loss", "lightning": "import lightning",
           "wds": "import glob, webdataset"}


def test_every_python_block_is_run_here():
    blocks = _blocks("python")
    named = [[name for name, m in MARKERS.items() if m in b] for b in blocks]
    assert all(len(n) == 1 for n in named), f"a README python block this test does not run: {named}"
    assert [n[0] for n in named] == list(MARKERS), "the blocks run in README order: api, loop, lightning, wds"


def _run(block: str, ns: dict) -> None:
    exec(compile(block, str(README), "exec"), ns)  # noqa: S102 -- README's own code, verbatim


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The namespace after the API block (static model D, its store, A trained ens-adv on it),
    run in a scratch directory that stays the working directory of the later blocks."""
    work = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("ENSPIPE_PROGRESS", "0")
        ns: dict = {"__name__": "readme"}
        _run(_python_block(MARKERS["api"]), ns)
        yield work, ns


def _accuracy(model) -> float:
    """Clean accuracy on the held-out digits, computed here from the data and the model's logits."""
    import torch

    from enspipe.data import create_dataset

    test = create_dataset("digits", split="test")
    x = torch.from_numpy(test.images_uint8(np.arange(len(test)))).float() / 255
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    return float((pred == np.asarray(test.labels)).mean())


def test_the_api_block_makes_runs_and_stores(session):
    work, ns = session
    assert [Path(p).suffix for p in ns["stores"]] == [".zarr"]
    for sub in ("runs/D/model.safetensors", "runs/A_ens/model.safetensors", "results/results.json"):
        assert (work / sub).is_file(), sub
    assert any((work / "diag").glob("*.json"))


def _every_module_trains(model, seen: list[bool]):
    """A forward pre-hook on every submodule recording whether it is in train mode when called."""
    return [m.register_forward_pre_hook(lambda mod, _inp: seen.append(mod.training)) for m in model.modules()]


def test_the_own_loop_recipe_trains(session, capsys, monkeypatch):
    import torch

    from enspipe import models

    work, ns = session
    monkeypatch.chdir(work)
    seen: list[bool] = []
    create = models.create_model

    def watched(*a, **kw):   # the recipe's model, watched: is every module training when it runs?
        model = create(*a, **kw)
        _every_module_trains(model, seen)
        return model

    monkeypatch.setattr(models, "create_model", watched)
    torch.manual_seed(0)
    _run(_python_block(MARKERS["loop"]), ns)
    losses = [float(v) for v in re.findall(r"^epoch \d+: loss ([0-9.]+)$", capsys.readouterr().out, flags=re.M)]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    # Dropout of model A (input dropout included) must be on: every module ran in train mode
    # (attacks.direction's online pass may switch modes for its own forward; the step's does not).
    assert seen and sum(seen) / len(seen) > 0.5 and ns["model"].training
    assert _accuracy(ns["model"]) > 0.6   # chance is 0.1


def test_a_created_model_is_in_train_mode():
    """create_model follows torch's convention (a new module trains); every submodule, too."""
    from enspipe.models import create_model

    for name in ("A", "B", "C", "D"):
        model = create_model(name, num_classes=10, input_size=(1, 28, 28))
        assert all(m.training for m in model.modules()), name


def test_the_lightning_recipe_trains(session, monkeypatch, recwarn, caplog, capsys):
    pytest.importorskip("lightning", reason="lightning is an optional extra: pip install -e '.[lightning]'")
    import torch

    work, ns = session
    monkeypatch.chdir(work)
    if "ens_adv_loss" not in ns:   # the loop block defines it; run alone, run that block's definitions
        _run(_python_block(MARKERS["loop"]).split("stream = DirectionStream")[0], ns)
    torch.manual_seed(0)
    _run(_python_block(MARKERS["lightning"]), ns)
    trainer = ns["trainer"]
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * int(np.ceil(1500 / 64))
    said = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    # Lightning warns "Found N module(s) in eval mode" when fit starts with modules in eval mode.
    assert not [s for s in said if re.search(r"Found \d+ module\(s\) in eval mode", s)], said
    assert [s for s in said if re.search(r"^0\s+Modules in eval mode", s, flags=re.M)], said
    out = capsys.readouterr().out   # Lightning's progress bar shares the lines (carriage returns)
    losses = [float(v) for v in re.findall(r"epoch \d+: loss ([0-9.]+)$", out, flags=re.M)]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], out[-2000:]
    assert _accuracy(trainer.lightning_module.model) > 0.6


def test_the_webdataset_snippet_reads_the_stores_directions(session, capsys, monkeypatch):
    from enspipe.stores import open_store

    work, ns = session
    monkeypatch.chdir(work)
    _run(_python_block(MARKERS["wds"]), ns)
    out = capsys.readouterr().out
    assert re.search(r"^1500 samples; the last: index \d+, direction int8 \(1, 28, 28\), label \d$", out, flags=re.M), out
    i = int(ns["i"])
    want = open_store(ns["store"]).read(i, i + 1)
    np.testing.assert_array_equal(ns["d"], want["direction"][0])
    assert ns["label"] == want["label"][0]


# --- shell blocks ---------------------------------------------------------------------------------

def _commands() -> list[list[str]]:
    """Every `enspipe ...` command line of README's shell blocks, as argv (continuations joined,
    comments and `[optional]` parts dropped)."""
    found = []
    for block in _blocks(None) + _blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            for part in line.split("&&"):
                part = re.sub(r"\[[^\]]*\]", "", part.split("#")[0]).strip()
                if part.startswith("enspipe "):
                    found.append(shlex.split(part)[1:])
    return found


def test_every_readme_command_and_flag_exists():
    import click

    from enspipe.cli import cli

    commands = _commands()
    assert len(commands) >= 14, commands   # the MNIST (7) and ImageNet (6) lists and the quickstart
    ctx = click.Context(cli)
    for argv in commands:
        cmd = cli.get_command(ctx, argv[0])
        assert cmd is not None, f"README names `enspipe {argv[0]}`, which does not exist"
        names = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for a in argv[1:]:
            if a.startswith("--"):
                assert a.split("=")[0] in names, f"README: `enspipe {argv[0]}` has no {a}"


def test_the_install_lines_name_extras_that_exist():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r"pip install[^\n`]*?-e '\.\[([a-z,]+)\]'", README.read_text())
    assert named
    for group in named:
        for extra in group.split(","):
            assert extra in extras, f"README installs the extra {extra!r}, which pyproject.toml lacks"
