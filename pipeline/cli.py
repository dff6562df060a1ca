"""The `enspipe` command line: parse, validate, call a stage function, print.

Results go to stdout (paths, tables); progress and messages to stderr. A user error
(`EnspipeError`, a bad option, an OS error such as a full disk) is one line on stderr
and a non-zero exit, never a traceback. Stage modules are imported inside the commands
so that `enspipe --help` stays fast.
"""
from __future__ import annotations

import json
import sys

import click

from enspipe.errors import EnspipeError


class EpsType(click.ParamType):
    """An eps in (0, 1]: `0.3` or a fraction such as `16/256`."""

    name = "EPS"

    def convert(self, value, param, ctx):
        from enspipe.attacks import parse_eps

        try:
            return parse_eps(value)
        except EnspipeError as e:
            self.fail(str(e), param, ctx)


EPS = EpsType()
DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
DATA_ROOT = click.option("--data-root", type=click.Path(file_okay=False), default=None,
                         help="Where datasets live (else $ENSPIPE_DATA, else ~/.cache/enspipe/data).")
IMAGE_SIZE = click.option("--image-size", type=click.IntRange(min=8), default=None,
                          help="Resize (imagefolder: resize + center-crop) images to this square size.")
LIMIT = click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="Use only the first N samples of the canonical order (imagefolder: N spread over the "
                          "classes in turn).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="enspipe")
def cli() -> None:
    """Ensemble Adversarial Training (Tramer et al., ICLR 2018) as an offline pipeline.

    \b
    Typical flow:
      enspipe train --model A --dataset mnist --out runs/A
      enspipe precompute --model runs/A --dataset mnist --attack fgsm --out stores
      enspipe train --model A --dataset mnist --mode ens-adv --shards STORE --out runs/A-ens
      enspipe evaluate --model runs/A-ens --sources runs/B --dataset mnist --out results
    """


@cli.command()
@click.option("--model", required=True, help="Architecture (A, B, B*, C, C-code, D, resnet50, timm:NAME) or a run dir to start from.")
@click.option("--dataset", default="digits", show_default=True, help="digits, mnist, cifar10, imagefolder:PATH or wds:PATTERN.")
@click.option("--split", default="train", show_default=True)
@DATA_ROOT
@LIMIT
@IMAGE_SIZE
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--mode", type=click.Choice(["clean", "adv", "ens-adv"]), default="clean", show_default=True)
@click.option("--shards", multiple=True, help="A precomputed store (repeat for several static models). ens-adv only.")
@click.option("--attack", type=click.Choice(["fgsm", "step_ll"]), default=None,
              help="Single-step attack of the training-time examples [default: the stores' own (ens-adv), else fgsm].")
@click.option("--eps", type=EPS, default="0.3", show_default=True, help="l-inf budget: 0.3 or 16/256.")
@click.option("--eps-dist", type=click.Choice(["fixed", "truncnorm"]), default="fixed", show_default=True,
              help="truncnorm draws eps per example from |N(0, eps/2)| truncated to [0, eps] (Kurakin et al.).")
@click.option("--adv-fraction", type=float, default=0.5, show_default=True, help="Share of each batch replaced by adversarial examples.")
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "rmsprop", "sgd"]), default="adam", show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate [adam 1e-3, rmsprop 0.045, sgd 0.01].")
@click.option("--lr-decay", type=float, default=1.0, show_default=True, help="Multiply lr by this every --lr-decay-every epochs (ImageNet: 0.94).")
@click.option("--lr-decay-every", type=int, default=2, show_default=True)
@click.option("--augment", type=click.Choice(["none", "crop", "flip", "crop+flip"]), default="none", show_default=True)
@click.option("--weights", type=click.Path(exists=True), default=None,
              help="Initial weights: an enspipe run/checkpoint or a torchvision/timm state dict (.safetensors, .pth).")
@click.option("--new-head", is_flag=True, help="Load --weights except the classifier head, which starts fresh "
              "(fine-tune on another number of classes).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader worker processes.")
@DEVICE
@click.option("--resume", is_flag=True, help="Continue a killed run from its last epoch checkpoint.")
@click.option("--log-every", type=click.IntRange(min=1), default=20, show_default=True, help="Batches per metrics.jsonl line.")
@click.option("--record-indices", is_flag=True, hidden=True, help="Save each rank's sample order per epoch.")
@click.option("--adv-loss", type=click.Choice(["replace", "paired"]), default="replace", show_default=True,
              help="replace: adversarial examples replace --adv-fraction of each batch (the paper's ImageNet "
                   "setup); paired: they come in addition to the whole clean batch (the reference code's "
                   "MNIST loss, with --adv-fraction 1).")
@click.option("--adv-weight", type=float, default=1.0, show_default=True,
              help="lambda of Kurakin et al.'s loss (sum clean + lambda * sum adv) / (n_clean + lambda * n_adv) "
                   "(ImageNet: 0.3).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="Weight decay, not on biases and norm weights [0].")
@click.option("--schedule", type=click.Choice(["step", "cosine"]), default=None,
              help="step: lr x --lr-decay every --lr-decay-every epochs; cosine: to 0 over the epochs [step].")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=None, help="Epochs of linear lr warmup [0].")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=None, metavar="K",
              help="Keep only the last K epoch checkpoints [all].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="bf16/fp16: autocast (fp16 with a grad scaler), channels_last on CUDA [fp32].")
@click.option("--val-limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Each epoch, record clean and FGSM error on N held-out test samples in metrics.jsonl.")
@click.option("--log", type=click.Choice(["csv", "tensorboard"]), multiple=True,
              help="Also log metrics to metrics.csv or TensorBoard (repeatable).")
def train(out, resume, **kw) -> None:
    """Train a model: clean, online adversarial (adv) or ensemble adversarial (ens-adv)."""
    from enspipe.config import OptionError, flag_of
    from enspipe.train import TrainConfig, train as run_train

    kw["shards"] = tuple(kw["shards"])
    # Knobs left out take TrainConfig's defaults (declared there once).
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        cfg = TrainConfig(**kw)
    except OptionError as e:  # name the field as the user typed it
        raise click.UsageError(e.render(flag_of(TrainConfig, e.field))) from None
    result = run_train(cfg, out, resume=resume)
    click.echo(str(result.run_dir))


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@cli.command()
@click.option("--model", "models", multiple=True, required=True, help="A run dir or checkpoint (repeat for several targets).")
@click.option("--dataset", default="digits", show_default=True)
@click.option("--split", default="test", show_default=True)
@DATA_ROOT
@LIMIT
@IMAGE_SIZE
@click.option("--attacks", default="fgsm", show_default=True,
              help="Comma list of fgsm, step_ll, rand_fgsm, rand_step_ll, iter_fgsm, iter_ll, pgd, pgd_cw.")
@click.option("--eps", type=EPS, default="0.3", show_default=True)
@click.option("--sources", multiple=True, help="Holdout model(s) whose attacks transfer to the targets (black-box).")
@click.option("--ensemble-source", is_flag=True, help="Also attack with the ensemble of all --sources.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@DEVICE
@click.option("--out", required=True, type=click.Path(), help="Directory (or .json path) for results.")
@click.option("--attack-option", "attack_options", multiple=True, metavar="ATTACK.KEY=VALUE",
              help="Set one parameter of one attack, e.g. rand_fgsm.alpha=0.05, pgd_cw.kappa=50, "
                   "pgd.steps=100 (repeatable).")
def evaluate(models, attacks, sources, out, **kw) -> None:
    """Clean, white-box and black-box (transfer) error of trained models."""
    from enspipe.config import OptionError, flag_of
    from enspipe.evaluate import EvalConfig, evaluate as run_eval

    try:
        cfg = EvalConfig(models=tuple(models), attacks=_csv(attacks), sources=tuple(sources), **kw)
    except OptionError as e:  # name the field as the user typed it
        raise click.UsageError(e.render(flag_of(EvalConfig, e.field))) from None
    res = run_eval(cfg, out)
    for name, m in res["models"].items():
        line = [f"{name}: clean {100 * m['clean']['error']:.1f}%"]
        line += [f"{a} {100 * r['error']:.1f}%" for a, r in m["whitebox"].items()]
        if m["blackbox_max"] is not None:
            line.append(f"black-box max {100 * m['blackbox_max']:.1f}%")
        click.echo("  ".join(line), err=True)
    click.echo(res["path"])


@cli.command()
@click.option("--model", required=True, help="Static model: a run dir / checkpoint, or a name with --weights/--pretrained.")
@click.option("--weights", type=click.Path(), default=None)
@click.option("--pretrained", is_flag=True, help="Load hub weights (needs the network).")
@click.option("--dataset", default="digits", show_default=True)
@DATA_ROOT
@click.option("--split", default="train", show_default=True)
@LIMIT
@IMAGE_SIZE
@click.option("--attack", "attack", default="step_ll", show_default=True, help="fgsm, step_ll, or both: step_ll,fgsm.")
@click.option("--label", type=click.Choice(["pred", "true"]), default="pred", show_default=True,
              help="Label the FGSM direction uses (pred avoids label leaking).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store ROOT; the store path is derived under it.")
@click.option("--format", "fmt", type=click.Choice(["zarr", "wds", "both"]), default="zarr", show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@DEVICE
@click.option("--workers", type=int, default=None, help="Start a local dask cluster of N worker processes.")
@click.option("--scheduler", default=None, help="Address of an existing dask scheduler (tcp://host:port).")
@click.option("--loader-workers", type=click.IntRange(min=0), default=None,
              help="Processes that decode images ahead of the compute (default: from the cores; 0: in-process).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast (channels_last on CUDA); a store of its own beside the fp32 one.")
@click.option("--wds-images", type=click.Choice(["source", "none"]), default="source", show_default=True,
              help="wds stores: carry each image as the source encoded it, or none.")
def precompute(attack, **kw) -> None:
    """Compute a static model's adversarial directions over a dataset into stores."""
    from enspipe.precompute import PrecomputeConfig, precompute as run_pre

    cfg = PrecomputeConfig(attacks=_csv(attack), **kw)
    for line in run_pre(cfg):
        click.echo(str(line))


@cli.command()
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


@cli.command(name="ls")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls_cmd(root, as_json) -> None:
    """List the stores under ROOT."""
    from dataclasses import asdict

    from enspipe.stores import list_stores

    infos = list_stores(root)
    if as_json:
        click.echo(json.dumps([{**asdict(i), "path": str(i.path)} for i in infos], indent=2))
        return
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


@cli.command()
@click.option("--model", "models", multiple=True, required=True, help="A run dir (repeat to compare models).")
@click.option("--other", default=None, help="Another model whose adversarial direction spans the loss surface (Figures 1, 4, 5).")
@click.option("--dataset", default="digits", show_default=True)
@click.option("--split", default="test", show_default=True)
@DATA_ROOT
@click.option("--limit", type=click.IntRange(min=1), default=500, show_default=True, help="Test samples to measure on.")
@IMAGE_SIZE
@click.option("--eps", type=EPS, default="0.3", show_default=True)
@DEVICE
@click.option("--out", required=True, type=click.Path(file_okay=False))
def diagnose(models, other, dataset, split, data_root, limit, image_size, eps, device, out) -> None:
    """Gradient-masking evidence: approximation ratio, cosine, loss surfaces, adversarial subspaces."""
    from enspipe.diagnostics import run_diagnose
    from enspipe.evaluate import model_label

    path = run_diagnose({model_label(m): m for m in models}, other=other, dataset=dataset, data_root=data_root,
                        limit=limit, eps=eps, out_dir=out, device=device, image_size=image_size, split=split)
    click.echo(str(path))


@cli.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--paper", type=click.Choice(["mnist", "imagenet"]), default=None,
              help="Print the paper's numbers beside ours.")
@click.option("--title", default=None)
def report(directory, paper, title) -> None:
    """Write report.md (tables beside the paper's, PNG figures) from the results under DIRECTORY."""
    from enspipe.report import write_report

    click.echo(str(write_report(directory, paper=paper, title=title)))


@cli.command()
@click.argument("job", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Job outputs [runs/<job name>].")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Step cache shared between jobs [$ENSPIPE_CACHE or ~/.cache/enspipe].")
@click.option("--dry-run", is_flag=True, help="Print the plan and what would be reused; run nothing.")
@DEVICE
def run(job, out, cache, dry_run, device) -> None:
    """Run a job spec (jobs/*.toml) as a graph of cached steps."""
    from enspipe.jobs import run_job

    res = run_job(job, out=out, cache=cache, dry_run=dry_run, device=device)
    if not dry_run:
        click.echo(res["report"])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="enspipe", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("enspipe: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        msg = e.format_message().replace("\n", " ")
        ctx = getattr(e, "ctx", None)
        where = f" {ctx.info_name}" if ctx is not None and ctx.info_name != "enspipe" else ""
        click.echo(f"enspipe{where}: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except EnspipeError as e:
        click.echo(f"enspipe: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        sys.exit(1)
    except OSError as e:
        # A full disk, a permission denied, a path that is a file: the user's environment.
        click.echo(f"enspipe: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("enspipe: interrupted", err=True)
        sys.exit(130)
