"""The `enspipe` command line: parse, validate, call a stage function, print.

(Over 400 lines on purpose: every command's examples, output format and exit codes in one
place; the options themselves come from the config classes.)

The stage commands (train, precompute, evaluate, diagnose) take their options from their
config class (`enspipe.config.click_options`): every field is a flag, with its default and
help, and the stage's errors name fields, which are shown here as flags. Those commands are
built when first used, from the torch-free config modules (`enspipe.configs`), and the stage
itself is imported only when the command runs (`_lazy_stage`): `enspipe train --help` (and
evaluate's, diagnose's) imports no torch.

Results go to stdout (paths, tables); progress and messages to stderr. A user error
(`EnspipeError`, a bad option, an OS error such as a full disk) is one line on stderr
and a non-zero exit, never a traceback. SIGINT and SIGTERM (what SLURM and Kubernetes send)
stop a command the same way, with one line saying how to resume it (exit 130 / 143).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
from typing import Any, Callable

import click

from enspipe.util.errors import EnspipeError

_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _examples(*lines: str) -> str:
    """A command's epilog: its examples, kept as written (`\\b` stops click re-wrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


# --- Showing the library's field names as flags --------------------------------------------

_speaking: list[type | None] = [None]  # the config class of the command that runs


def _flag(field: str) -> str:
    from enspipe.config import flag_of

    cls = _speaking[0]
    return flag_of(cls, field) if cls is not None else "--" + field.replace("_", "-")


def _message(e: EnspipeError) -> str:
    """The error's first line, with fields shown as this command's flags."""
    from enspipe.config import OptionError, speak

    if isinstance(e, OptionError):
        return e.render(_flag(e.field), _flag).splitlines()[0]
    text = _unwrap_worker(e, str(e))
    text = text.splitlines()[0] if text else type(e).__name__
    return speak(text, _flag)


def _unwrap_worker(e: Exception, text: str) -> str:
    """A DataLoader worker's error as torch re-raises it ("Caught DataError in DataLoader
    worker process 0.", then the worker's traceback) is the worker's own message again,
    which names the file (the traceback ends in 'enspipe.util.errors.DataError: MESSAGE')."""
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    head = f"{type(e).__module__}.{type(e).__qualname__}: "
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(head):
            return "\n".join([lines[i][len(head):], *lines[i + 1:]])
    return text


# --- Stage commands built from their config classes -----------------------------------------

def _deprecated(old: str, new: str, **kw: Any) -> Callable[[Callable], Callable]:
    """A hidden flag `old` that still works for one release, saying once to use `new`."""
    return click.option(old, "_old_" + old.lstrip("-").replace("-", "_"), hidden=True, default=None,
                        expose_value=True, **kw)


def _take_deprecated(kw: dict[str, Any], renames: dict[str, tuple[str, str]]) -> None:
    """Move the values of used deprecated flags to their fields (a warning line for each)."""
    from enspipe.config import _split_values

    for old, (field, new) in renames.items():
        value = kw.pop("_old_" + old.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        click.echo(f"enspipe: {old} is deprecated: use {new}", err=True)
        kw[field] = _split_values(",", None, None, (value,)) if isinstance(kw.get(field), tuple) else value


def _build(ctx: click.Context, cls: type, kw: dict[str, Any], config_file: str | None = None,
           must: tuple[str, ...] = ()) -> Any:
    """The config from the command's flags (over a --config file's values, over defaults)."""
    from dataclasses import MISSING, fields

    from enspipe.config import DeclaredError, parse_config, read_toml

    _speaking[0] = cls
    values = dict(kw)
    if config_file is not None:
        from_file = read_toml(cls, config_file)
        given = {k for k in values if ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT, None)}
        values.update({k: v for k, v in from_file.items() if k not in given})
    for f in fields(cls):
        needed = f.name in must or f.default is MISSING and f.default_factory is MISSING  # type: ignore[misc]
        if needed and values.get(f.name) in (None, ()):
            param = next(p for p in ctx.command.params if p.name == f.name)
            raise click.MissingParameter(ctx=ctx, param=param)
    try:
        return parse_config(cls, {k: v for k, v in values.items() if v is not None})
    except DeclaredError as e:  # a flag's value outside its declared choices or range: a usage error
        raise click.UsageError(_message(e), ctx=ctx) from None


def _stage_command(cls: type, stage: Callable[[Any], Any], show: Callable[[Any], None], *, help: str,
                   examples: tuple[str, ...], required: tuple[str, ...] = (),
                   deprecated: dict[str, tuple[str, str, Any]] | None = None,
                   config_file: bool = False) -> click.Command:
    """A command whose options are the fields of `cls`: it builds the config, runs `stage` on
    it and `show`s the result. `deprecated` = {old flag: (field, new flag, click type)};
    `config_file` adds --config FILE.toml (flags override its values)."""
    from enspipe.config import click_options

    deprecated = deprecated or {}

    def command(ctx: click.Context, config_file: str | None = None, **kw: Any) -> None:
        _take_deprecated(kw, {old: (field, new) for old, (field, new, _) in deprecated.items()})
        show(stage(_build(ctx, cls, kw, config_file, must=required)))

    decorated: Callable = click.pass_context(command)
    for old, (_, new, type_) in deprecated.items():
        decorated = _deprecated(old, new, type=type_)(decorated)
    decorated = click_options(cls, require=not config_file, required=() if config_file else required)(decorated)
    if config_file:
        decorated = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                                 help="A TOML file of these options (keys as the flags without --, _ for -); "
                                 "flags override it.")(decorated)
    return click.command(context_settings=_SETTINGS, help=help, epilog=_examples(*examples))(decorated)


def _lazy_stage(module: str, name: str) -> Callable[[Any], Any]:
    """The stage `module.name`, imported when the command runs: the command itself is built from
    the torch-free config class, so `enspipe STAGE --help` imports no torch."""
    def run(cfg: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(cfg)

    return run


def _train_command() -> click.Command:
    from enspipe.configs.train import TrainConfig

    return _stage_command(
        TrainConfig, _lazy_stage("enspipe.train", "train"), lambda result: click.echo(str(result.run_dir)),
        help="Train a model: clean, online adversarial (adv) or ensemble adversarial (ens-adv).",
        examples=("enspipe train --model A --dataset mnist --out runs/A",
                  "enspipe train --model A --dataset mnist --mode ens-adv --shards STORE1 --shards STORE2 "
                  "--out runs/A_ens",
                  "enspipe train --config train.toml --epochs 12     # a TOML table of these options; flags win",
                  "enspipe train --model A --dataset mnist --out runs/A --resume   # after a kill"),
        required=("out",), config_file=True,
        deprecated={"--workers": ("loader_workers", "--loader-workers", click.IntRange(min=0))})


def _precompute_command() -> click.Command:
    from enspipe.precompute import PrecomputeConfig, precompute

    return _stage_command(
        PrecomputeConfig, precompute, lambda paths: [click.echo(str(p)) for p in paths],
        help="Compute a static model's adversarial directions over a dataset into stores (one per attack).",
        examples=("enspipe precompute --model runs/D --dataset mnist --attacks fgsm --out stores",
                  "enspipe precompute --model resnet50 --weights resnet50.safetensors --dataset "
                  "imagefolder:/data/imagenet --attacks step_ll,fgsm --format both --dask-workers 4 --out stores"),
        deprecated={"--workers": ("dask_workers", "--dask-workers", int), "--attack": ("attacks", "--attacks", str)})


def _show_evaluation(res: dict[str, Any]) -> None:
    for name, m in res["models"].items():
        line = [f"{name}: clean {100 * m['clean']['error']:.1f}%"]
        line += [f"{a} {100 * r['error']:.1f}%" for a, r in m["whitebox"].items()]
        if m["blackbox_max"] is not None:
            line.append(f"black-box max {100 * m['blackbox_max']:.1f}%")
        click.echo("  ".join(line), err=True)
    click.echo(res.get("path", ""))


def _evaluate_command() -> click.Command:
    from enspipe.configs.evaluate import EvalConfig

    return _stage_command(
        EvalConfig, _lazy_stage("enspipe.evaluate", "evaluate"), _show_evaluation,
        help="Clean, white-box and black-box (transfer) error of trained or released models.",
        examples=("enspipe evaluate --model runs/A_ens --sources runs/B --dataset mnist --attacks fgsm,pgd "
                  "--out results",
                  "enspipe evaluate --model timm:inception_resnet_v2.tf_ens_adv_in1k --pretrained "
                  "--dataset imagefolder:/data/imagenet --image-size 299 --eps 16/256 --limit 1000 --out results"),
        required=("out",))


def _diagnose_command() -> click.Command:
    from enspipe.configs.diagnose import DiagnoseConfig

    return _stage_command(
        DiagnoseConfig, _lazy_stage("enspipe.diagnostics", "run_diagnose"), lambda res: click.echo(str(res["path"])),
        help="Gradient-masking evidence: approximation ratio, cosine, loss surfaces, adversarial subspaces.",
        examples=("enspipe diagnose --model runs/A_ens --model runs/A_adv --other runs/B --dataset mnist "
                  "--out diag",
                  "enspipe diagnose --model timm:inception_v3.tf_adv_in1k --pretrained "
                  "--dataset imagefolder:/data/imagenet --image-size 299 --eps 16/256 --limit 100 --out diag"),
        required=("out",))


class _Group(click.Group):
    """A group whose stage commands are built on first use; `--help` lists them from a table."""

    lazy: dict[str, tuple[Callable[[], click.Command], str]] = {
        "train": (_train_command, "Train a model: clean, online adversarial (adv) or ensemble adversarial."),
        "precompute": (_precompute_command, "Compute a static model's adversarial directions into stores."),
        "evaluate": (_evaluate_command, "Clean, white-box and black-box error of trained or released models."),
        "diagnose": (_diagnose_command, "Gradient-masking evidence: ratios, cosines, loss surfaces, subspaces."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            self.add_command(self.lazy[name][0](), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy[name][1] if name in self.lazy and name not in self.commands
                 else self.commands[name].get_short_help_str(80)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_Group, context_settings=_SETTINGS)
@click.version_option(package_name="enspipe")
def cli() -> None:
    """Ensemble Adversarial Training (Tramer et al., ICLR 2018) as an offline pipeline.

    \b
    Typical flow:
      enspipe train --model A --dataset mnist --out runs/A
      enspipe precompute --model runs/A --dataset mnist --attacks fgsm --out stores
      enspipe train --model A --dataset mnist --mode ens-adv --shards STORE --out runs/A-ens
      enspipe evaluate --model runs/A-ens --sources runs/B --dataset mnist --out results
    """


# --- The other commands ---------------------------------------------------------------------

DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")


@cli.command(context_settings=_SETTINGS, epilog=_examples(
    "enspipe verify stores/mnist-train/D-0123456789ab/fgsm-pred-0123456789abcdef.zarr",
    "enspipe verify STORE --recompute 16 --device cpu"))
@click.argument("store", type=click.Path())
@click.option("--recompute", type=click.IntRange(min=0), default=0, help="Recompute K random samples with the model and compare.")
@click.option("--model", default=None, help="The static model, for --recompute (default: the path recorded in the manifest).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@DEVICE
def verify(store, recompute, model, data_root, device) -> None:
    """Check a store's schema, completeness and checksums (exit 1 naming each bad shard)."""
    from enspipe.stores import verify_store

    report = verify_store(store)
    problems = list(report.problems)
    if report.ok and recompute:
        from enspipe.precompute import recompute_check

        problems += recompute_check(store, k=recompute, model=model, data_root=data_root, device=device)
    if problems:
        for p in problems:
            click.echo(f"{store}: {p}", err=True)
        click.echo(f"BAD {store}")
        sys.exit(1)
    click.echo(f"OK {store} ({report.shards_checked} shards"
               + (f", {recompute} samples recomputed" if recompute else "") + ")")


@cli.command(name="ls", context_settings=_SETTINGS, epilog=_examples(
    "enspipe ls stores", "enspipe ls runs/quickstart      # a job's output folder: its models and stores",
    "enspipe ls . --json"))
@click.argument("root", default=".")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls_cmd(root, as_json) -> None:
    """List the runs (model folders) and stores under ROOT (a folder, or a URL such as s3://bucket/prefix)."""
    from dataclasses import asdict

    from enspipe.jobs.runs import list_runs
    from enspipe.stores import list_stores
    from enspipe.stores.remote import is_url, local_path

    if not is_url(root):  # object storage holds stores only; runs are local folders
        root = local_path(root)
        if not os.path.isdir(root):  # the words click.Path(exists=True, file_okay=False) would use
            what = "is a file" if os.path.exists(root) else "does not exist"
            raise click.BadParameter(f"Directory {root!r} {what}.", param_hint="'ROOT'")
    runs, infos = ([] if is_url(root) else list_runs(root)), list_stores(root)
    if as_json:
        click.echo(json.dumps([{"kind": "run", **asdict(r), "path": str(r.path)} for r in runs]
                              + [{"kind": "store", **asdict(i), "path": str(i.path)} for i in infos], indent=2))
        return
    if runs:
        click.echo(f"{'run: model':<18} {'dataset':<18} {'mode':<8} {'epochs':>6} {'size':>9} path")
        for r in runs:
            click.echo(f"{r.model or '?':<18.18} {r.dataset or '-':<18.18} {r.mode or '-':<8} "
                       f"{r.epochs_done if r.epochs_done is not None else '-':>6} {_size(r.bytes_on_disk):>9} "
                       f"{r.path}" + (f"  ({r.problem})" if r.problem else ""))
        click.echo("")
    head = f"{'dataset':<18} {'model':<16} {'attack':<12} {'N':>7} {'size':>9} {'bits/el':>7} {'status':<10} path"
    click.echo(head)
    for i in infos:
        dataset = f"{i.dataset_source or '?'}/{i.dataset_split or '?'}"
        attack = f"{i.attack or '?'}/{i.label_mode or '?'}"
        bits = f"{i.bits_per_element:.3f}" if i.bits_per_element is not None else "-"
        status = ("complete" if i.complete else f"{i.shards_done}/{i.num_shards if i.num_shards is not None else '?'}")
        if i.problem:
            status = "BROKEN"
        click.echo(f"{dataset:<18.18} {i.model or '?':<16.16} {attack:<12} {i.num_samples or 0:>7} "
                   f"{_size(i.bytes_on_disk):>9} {bits:>7} {status:<10} {i.path}"
                   + (f"  ({i.problem})" if i.problem else ""))


@cli.command(context_settings=_SETTINGS, epilog=_examples(
    "enspipe report runs/quickstart", "enspipe report runs/mnist_table8 --paper mnist --title 'Table 8'"))
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--paper", type=click.Choice(["mnist", "imagenet"]), default=None,
              help="Print the paper's numbers beside ours.")
@click.option("--title", default=None)
def report(directory, paper, title) -> None:
    """Write report.md (tables beside the paper's, PNG figures) from the results under DIRECTORY."""
    from enspipe.report import write_report

    click.echo(str(write_report(directory, paper=paper, title=title)))


CACHE = click.option("--cache", type=click.Path(file_okay=False), default=None,
                     help="Step cache shared between jobs [$ENSPIPE_CACHE or ~/.cache/enspipe].")


@cli.command(context_settings=_SETTINGS, epilog=_examples(
    "enspipe run jobs/quickstart.toml --out runs/quickstart",
    "enspipe run jobs/mnist_table8.toml --dry-run      # the plan: which steps run, which are reused"))
@click.argument("job", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Job outputs, as real files [runs/<job name>].")
@CACHE
@click.option("--dry-run", is_flag=True, help="Print the plan and what would be reused; run nothing.")
@click.option("--set", "params", multiple=True, metavar="NAME=VALUE",
              help="Set a parameter the spec declares in [params] (repeatable), e.g. --set imagenet=/data/in1k.")
@DEVICE
def run(job, out, cache, dry_run, params, device) -> None:
    """Run a job spec (jobs/*.toml) as a graph of cached steps."""
    from enspipe.jobs.params import parse_set
    from enspipe.jobs import run_job

    res = run_job(job, out=out, cache=cache, dry_run=dry_run, device=device, params=parse_set(params))
    if not dry_run:
        click.echo(res["report"])


@cli.group(context_settings=_SETTINGS, epilog=_examples("enspipe cache ls", "enspipe cache gc --dry-run"))
def cache() -> None:
    """The step cache that jobs share: list it, remove what no job output uses."""


@cache.command(name="ls", context_settings=_SETTINGS, epilog=_examples(
    "enspipe cache ls", "enspipe cache ls --cache /scratch/enspipe-cache"))
@CACHE
def cache_ls(cache) -> None:
    """List the cached steps: size, and which job outputs (--out folders) use them."""
    from enspipe.jobs.cache import cache_entries, default_cache

    root = cache or default_cache()
    entries = cache_entries(root)
    click.echo(f"{'status':<8} {'step':<32} {'key':<12} {'size':>9} used by")
    for e in entries:
        click.echo(f"{e.status:<8} {e.kind + '.' + e.name:<32.32} {e.key[:12]:<12} {_size(e.bytes_on_disk):>9} "
                   + (", ".join(e.jobs) or "-"))
    click.echo(f"{len(entries)} cached steps, {_size(sum(e.bytes_on_disk for e in entries))} in {root}", err=True)


@cache.command(name="gc", context_settings=_SETTINGS, epilog=_examples(
    "enspipe cache gc --dry-run", "enspipe cache gc --cache /scratch/enspipe-cache"))
@CACHE
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def cache_gc(cache, dry_run) -> None:
    """Remove the cached steps that no existing job output uses and no running job holds."""
    from enspipe.jobs.cache import default_cache, gc

    root = cache or default_cache()
    removed = gc(root, dry_run=dry_run)
    for e in removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {e.kind}.{e.name} {e.key[:12]} "
                   f"({_size(e.bytes_on_disk)})")
    click.echo(f"{'would free' if dry_run else 'freed'} {_size(sum(e.bytes_on_disk for e in removed))} in {root}",
               err=True)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- Entry point ----------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that every cleanup runs the same way
    (and a forked worker that inherits the handler stops as quietly as on SIGINT)."""


_signal_seen: list[int] = []


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Any:
    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked worker: die as SIGTERM would make it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        _signal_seen.append(signum)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(args: list[str]) -> str:
    """One line: what was interrupted, and the command that resumes it."""
    name = "SIGTERM" if signal.SIGTERM in _signal_seen else "SIGINT"
    command = next((a for a in args if not a.startswith("-")), None)
    again = ["enspipe", *args]
    if command == "train" and "--resume" not in args:
        again.append("--resume")
    if command in ("train", "precompute", "run"):
        return f"enspipe: {command} interrupted ({name}); resume with: {shlex.join(again)}"
    return f"enspipe: {command or 'enspipe'} interrupted ({name})"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _signal_seen.clear()
    _speaking[0] = None
    try:
        with _sigterm_as_interrupt():
            cli.main(args=args, prog_name="enspipe", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        # A signal to the whole process group (scancel, a container stop) also ended the
        # DataLoader workers; torch's SIGCHLD handler would report each as a traceback while
        # the loader is torn down after this line. They were told to stop: let them go quietly.
        with contextlib.suppress(ValueError, AttributeError):
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        click.echo(_interrupted(args), err=True)
        sys.exit(143 if signal.SIGTERM in _signal_seen else 130)
    except click.ClickException as e:
        msg = e.format_message().replace("\n", " ")
        ctx = getattr(e, "ctx", None)
        where = f" {ctx.info_name}" if ctx is not None and ctx.info_name != "enspipe" else ""
        click.echo(f"enspipe{where}: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except EnspipeError as e:
        click.echo(f"enspipe: error: {_message(e)}", err=True)
        sys.exit(1)
    except OSError as e:
        # A full disk, a permission denied, a path that is a file: the user's environment.
        click.echo(f"enspipe: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", err=True)
        sys.exit(1)
