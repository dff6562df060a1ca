"""One vocabulary: flags, job keys, config fields and the API name the same things the same way;
examples in every --help; field errors shown as flags; deprecated flags; train --config;
--pretrained offline; SIGTERM / SIGINT of real processes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields

import click
import pytest

from enspipe.cli import cli
from enspipe.config import config_defaults, job_keys
from cli_runner import run_cli

from cli_runner import CLI  # noqa: E402 -- a fresh interpreter
ENV = {**os.environ, "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

# Per step kind: the flags a job spec sets elsewhere ([data], `enspipe run --device/--out`, the
# step graph), and the job-only keys that say how steps connect. Everything else is one name.
SURFACE = {
    "train": ("models", {"--model", "--dataset", "--split", "--data-root", "--limit", "--image-size", "--device",
                         "--out", "--resume", "--config"}, {"arch", "train", "description"}),
    "precompute": ("stores", {"--weights", "--pretrained", "--dataset", "--data-root", "--limit",
                              "--image-size", "--device", "--out"}, {"description"}),
    "evaluate": ("evaluate", {"--model", "--weights", "--pretrained", "--dataset", "--split", "--data-root",
                              "--image-size", "--device", "--out", "--source-store", "--whitebox-store"},
                 {"targets", "options", "description", "source_stores", "whitebox_stores"}),
    "diagnose": ("diagnose", {"--weights", "--pretrained", "--dataset", "--split", "--data-root", "--image-size",
                              "--device", "--out"}, {"description"}),
}


# Repeatable flags named for one value that fill a tuple field (`--model A --model B`).
SINGULAR = {("--model", "models"), ("--attack-option", "attack_options"), ("--source-store", "source_stores"),
            ("--whitebox-store", "whitebox_stores")}


def _command(name: str) -> click.Command:
    with click.Context(cli) as ctx:
        return cli.get_command(ctx, name)


def _flags(cmd: click.Command) -> dict[str, str]:
    """{flag: parameter name} of a command, deprecated aliases left out."""
    return {p.opts[0]: p.name for p in cmd.params if isinstance(p, click.Option) and not p.name.startswith("_old_")
            and p.name != "help"}


@pytest.mark.parametrize("command", sorted(SURFACE))
def test_every_flag_is_a_job_key_and_every_job_key_a_flag(command):
    from enspipe.jobs import step_configs, step_keys

    kind, cli_only, job_only = SURFACE[command]
    flags = _flags(_command(command))
    keys = step_keys(kind)
    assert {name for flag, name in flags.items() if flag not in cli_only} == keys - job_only
    # and each flag is its config field's name (the exceptions: SINGULAR).
    cls = step_configs()[kind]
    names = {f.name for f in fields(cls)}
    for flag, name in flags.items():
        if flag == "--config":
            continue
        assert name in names, flag
        assert flag == "--" + name.replace("_", "-") or (flag, name) in SINGULAR, flag
    # Every field a job may set is a flag.
    assert job_keys(cls) <= set(flags.values())


def test_every_command_has_an_example():
    def walk(group: click.Group, prefix: list[str]):
        with click.Context(group) as ctx:
            for name in group.list_commands(ctx):
                cmd = group.get_command(ctx, name)
                yield [*prefix, name], cmd
                if isinstance(cmd, click.Group):
                    yield from walk(cmd, [*prefix, name])

    from enspipe.cli import main

    seen = []
    for path, _ in walk(cli, []):
        r = run_cli(*path, "--help", env=ENV)  # the help's content, not its start-up: forked from the zygote
        assert r.returncode == 0, r.stderr
        assert re.search(r"^\s*Examples?:", r.stdout, re.M), f"enspipe {' '.join(path)} --help has no example"
        seen.append(" ".join(path))
    assert {"train", "precompute", "evaluate", "diagnose", "run", "ls", "verify", "report", "cache ls",
            "cache gc"} <= set(seen)
    assert main is not None


def test_the_defaults_are_the_configs(tmp_path):
    """The CLI shows the config's defaults; a job's store step, the CLI and the API share one
    default attack (the API's: step_ll)."""
    from enspipe.jobs import load_job, step_config, step_configs

    for command, (kind, _, _) in SURFACE.items():
        cls = step_configs()[kind]
        defaults = config_defaults(cls)
        for p in _command(command).params:
            if p.name in defaults and not p.name.startswith("_") and not p.required:
                want = defaults[p.name]
                assert p.default == want or (isinstance(want, tuple) and tuple(p.default or ()) == want), p.name
    assert config_defaults(step_configs()["stores"])["attacks"] == ("step_ll",)
    assert _command("precompute").params[[p.name for p in _command("precompute").params].index("attacks")].default \
        == ("step_ll",)
    spec = tmp_path / "job.toml"
    spec.write_text('[data]\ndataset = "digits"\n[models.s]\narch = "D"\n[stores.s_dirs]\nmodel = "s"\n')
    job = load_job(spec)
    store = next(s for s in job.steps if s.kind == "stores")
    assert step_config(job, store).attacks == ("step_ll",)


def test_field_errors_are_shown_as_flags(tmp_path):
    r = subprocess.run([*CLI, "train", "--model", "D", "--mode", "adv", "--adv-fraction", "1.5", "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, env=ENV)
    # A value outside the field's declared range is a usage error (exit 2), as click's own checks.
    assert r.returncode == 2 and r.stderr.strip() == "enspipe train: error: --adv-fraction must be in (0, 1], not 1.5"
    r = subprocess.run([*CLI, "precompute", "--model", "D", "--weights", __file__, "--pretrained", "--out",
                        str(tmp_path / "s")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 1
    assert r.stderr.strip() == ("enspipe: error: --weights and --pretrained exclude each other: pass one source "
                                "of weights")
    # The library itself speaks in field names.
    from enspipe.config import OptionError
    from enspipe.train import TrainConfig

    with pytest.raises(OptionError) as e:
        TrainConfig(model="D", mode="ens-adv")
    assert (e.value.field, str(e.value)) == ("mode", "mode ens-adv needs at least one `shards` STORE (the static "
                                                     "models' directions)")
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_deprecated_flags_still_work_with_one_warning_line(tmp_path):
    r = subprocess.run([*CLI, "precompute", "--model", "D", "--workers", "0", "--out", str(tmp_path / "s")],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["enspipe: --workers is deprecated: use --dask-workers",
                                     "enspipe: error: --dask-workers must be at least 1 (leave it out to compute "
                                     "in-process), not 0"]
    r = subprocess.run([*CLI, "train", "--model", "D", "--workers", "1", "--epochs", "0", "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["enspipe: --workers is deprecated: use --loader-workers",
                                     "enspipe train: error: --epochs must be at least 1, not 0"]
    assert "--workers" not in subprocess.run([*CLI, "train", "--help"], capture_output=True, text=True,
                                             env=ENV).stdout.replace("--loader-workers", "")
    # The API's old field names still construct (with a DeprecationWarning) and read.
    from enspipe.precompute import PrecomputeConfig
    from enspipe.train import TrainConfig

    with pytest.warns(DeprecationWarning, match="loader_workers"):
        assert TrainConfig(model="D", workers=2).loader_workers == 2
    with pytest.warns(DeprecationWarning, match="format"):
        cfg = PrecomputeConfig(model="D", out="s", fmt="both", dask_workers=2)
    assert (cfg.format, cfg.fmt, cfg.workers) == ("both", "both", 2)


def test_train_reads_a_config_file_and_flags_override_it(tmp_path):
    conf = tmp_path / "train.toml"
    conf.write_text('model = "D"\ndataset = "digits"\nlimit = 64\nepochs = 3\nbatch_size = 32\ndevice = "cpu"\n'
                    'workers = 0\n')
    run = tmp_path / "run"
    # Real processes, forked from the suite's pre-imported zygote (tests/reliability/zygote.py).
    r = run_cli("train", "--config", conf, "--epochs", "1", "--out", run, env=ENV)
    assert r.returncode == 0, r.stderr
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["epochs"], saved["limit"], saved["batch_size"], saved["model"]) == (1, 64, 32, "D")
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "D"\n\nwarmup = 3\n')
    r = run_cli("train", "--config", bad, "--out", tmp_path / "r2", env=ENV)
    assert r.returncode == 1 and r.stderr.startswith(f"enspipe: error: {bad}:3: warmup is not an option")
    bad.write_text('model = "D"\nepochs = "many"\n')
    r = run_cli("train", "--config", bad, "--out", tmp_path / "r2", env=ENV)
    assert r.returncode == 1 and f"{bad}:2: epochs must be an integer, not 'many'" in r.stderr
    r = run_cli("train", "--out", tmp_path / "r3", env=ENV)
    assert r.returncode == 2 and "Missing option '--model'" in r.stderr
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


@pytest.mark.parametrize("argv, cache_var", [
    (["precompute", "--model", "timm:resnet18", "--pretrained", "--out", "{tmp}/s"], "HF_HOME"),
    (["evaluate", "--model", "resnet18", "--pretrained", "--dataset", "digits", "--limit", "4", "--out", "{tmp}/e"],
     "TORCH_HOME"),
])
def test_pretrained_offline_fails_fast_naming_the_cache(tmp_path, argv, cache_var):
    """No network and an empty hub cache: one line naming the cache and the variable to set,
    after one connection attempt (enspipe's probe), not after the hub's retries (timm would
    retry for ~40 s). Counted, not timed: a wall-clock bound fails on a loaded machine. Every
    way out is refused and counted: socket.create_connection (the probe, httpx) and
    socket.connect (urllib3/requests); timm and the hub are imported inside."""
    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": ""}
    offline = ("import socket, sys\n"
               "import torch, torchvision\n"
               "assert 'huggingface_hub' not in sys.modules\n"
               "tries = []\n"
               "def refuse(*a, **k):\n"
               "    tries.append(a[-1])\n"
               "    raise OSError('network is unreachable')\n"
               "socket.create_connection = refuse\n"
               "socket.socket.connect = refuse\n"
               "from enspipe.cli import main\n"
               "try:\n"
               "    main(sys.argv[1:])\n"
               "finally:\n"
               "    print(f'connection attempts {len(tries)}', file=sys.stdout)\n")
    args = [a.format(tmp=tmp_path) for a in argv] + ["--device", "cpu"]
    r = subprocess.run([sys.executable, "-c", offline, *args], capture_output=True, text=True, env=env, timeout=600)
    tries = int(r.stdout.split()[-1])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("enspipe: error: --pretrained: ") and cache_var in lines[0], lines[0]
    assert str(tmp_path / ("hf" if cache_var == "HF_HOME" else "torch")) in lines[0] and "--weights" in lines[0]
    assert tries <= 1, f"{tries} connection attempts: something retried after the probe found no network"


# --- Signals: real processes ------------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_train_with_the_command_that_resumes_it(tmp_path, sig, code):
    run = tmp_path / "run"
    args = ["train", "--model", "D", "--dataset", "digits", "--epochs", "200", "--device", "cpu", "--out", str(run)]
    p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 600  # an event wait: the cap is only for a hang
    while not (run / "metrics.jsonl").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1]
    p.send_signal(sig)
    out, err = p.communicate(timeout=600)  # far above a loaded machine's need: a hang, not a slow stop
    lines = [ln for ln in err.splitlines() if ln.strip()]
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    assert p.returncode == code, err
    assert lines[-1] == f"enspipe: train interrupted ({name}); resume with: enspipe {' '.join(args)} --resume"
    assert "Traceback" not in err and out == ""


def test_sigterm_stops_precompute_with_the_same_command(tmp_path, digits_static2, mnist_root):
    args = ["precompute", "--model", str(digits_static2), "--dataset", "mnist", "--data-root", str(mnist_root),
            "--limit", "6144", "--shard-size", "256", "--batch-size", "64", "--device", "cpu",
            "--out", str(tmp_path / "stores")]
    p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 600  # an event wait: the cap is only for a hang
    while not list((tmp_path / "stores").glob("*/*/*.zarr/shards/*.json")) and p.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=600)  # far above a loaded machine's need: a hang, not a slow stop
    assert p.returncode == 143, err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last == f"enspipe: precompute interrupted (SIGTERM); resume with: enspipe {' '.join(args)}"
    assert "Traceback" not in err
    again = run_cli(*args, env=ENV)  # the line's command resumes it (forked from the zygote: what it does)
    assert again.returncode == 0, again.stderr
    from enspipe.stores import verify_store

    assert verify_store(again.stdout.strip()).ok
