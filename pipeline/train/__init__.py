"""Training: clean, online single-step adversarial, and ensemble adversarial (§3.4, §4.2).

(Over 400 lines on purpose: a run's batches, its preparation and the one training loop read
best together; the configuration is `enspipe.configs.train`, the loop's machinery `enspipe.train.kit`.)

A run is `prepare_run` (the attack resolved, data and stores verified, model, optimizer and grad
scaler made or restored, config.json written: a `Prepared`) and then `_train`'s one loop.

One loop serves the three modes. Per batch an adversarial *source* is drawn:
  clean    no source; the batch is trained as is.
  adv      always the model itself: one online forward+backward to get its direction.
  ens-adv  uniformly from {the model itself} + every precomputed store. Only when the model
           itself is drawn is an online pass made; otherwise the stored direction d of the
           drawn static model gives x_adv = clip(x + eps*d, 0, 1) for free.
A fraction (`adv_fraction`, default 1/2) of each batch is replaced by its adversarial
version (Kurakin et al. 2017b). Attacks on the model itself use its predicted label, never
the true one (label leaking, Appendix C.2).

Streaming: the clean images and the stores' directions are joined by sample index. A
`BatchStream` (`enspipe.stream.SourceBatches` configured by a TrainConfig, run in DataLoader
workers) reads contiguous blocks in a shuffled block order, draws each block's source before
reading it so that only the drawn store's directions are read (a batch uses one source),
shuffles a buffer of blocks in memory, applies identical crops/flips to image and direction,
and hands the main process ready batches, so the training step never waits on per-sample
I/O. The loader's workers live for the whole run and read the next epoch while the current
one ends. Data order and source draws depend only on (seed, epoch, rank, worker), so a run
resumed from an epoch checkpoint replays exactly what an uninterrupted run would have.

The step never waits for the GPU: loss, accuracy and the non-finite-loss check accumulate on
the device and are read every `log_every` steps (a non-finite loss still stops the run before
any checkpoint holds it). `precision` bf16/fp16 runs the forward passes under autocast (fp16
with a grad scaler) and, on CUDA, in channels_last.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from enspipe.train import losses
from enspipe.util._callable import callable_stage
from enspipe.attack_records import parse_eps  # noqa: F401 -- `enspipe.train.parse_eps`, as before
from enspipe.config import OptionError, runtime_fields
from enspipe.configs.train import MODES, OPTIMIZERS, STORABLE, TrainConfig  # noqa: F401 -- re-exported
from enspipe.data import SampleSource, create_dataset
from enspipe.data.decode import (UndecodableJPEG, device_decoder, named, other_decoder_line, resolve_decoder,
                                 store_decoder)
from enspipe.util.errors import ConfigError, EnspipeError, StoreError
from enspipe.util.fileio import atomic_target, hold_folder, release_folder
from enspipe.models import EnsModel, load_model_for, save_model
from enspipe.paths import check_output, check_outside_dataset
from enspipe.report.runlog import RunLog, check_sinks
from enspipe.util.runtime import progress, read_json, resolve_device, seed_everything, versions, write_json
from enspipe.train.schedule import learning_rate, param_groups, set_learning_rate
from enspipe.precision import PRECISIONS, Precision  # noqa: F401 -- `enspipe.train.PRECISIONS`, as before
from enspipe.stores import StoreReader
from enspipe.stores.remote import is_url, local_path
from enspipe.stream import SELF  # noqa: F401 -- `enspipe.train.SELF`, as before
from enspipe.train.batches import (  # noqa: F401 -- `enspipe.train.BatchStream` etc., as before
    AdversarialFn, BatchStream, MetricsFn, StreamFactory, adversarial_inputs, batch_loader,
    batch_stream, block_ranges)
from enspipe.train.kit import CheckpointWriter, FrozenModel, Validation, Window, epoch_batches, prune_checkpoints, snapshot

# Fields that say where and how a run goes, not what it computes: a resumed run may change
# them (config.json's other fields must match). The rest are declared `runtime=True`.
NOT_IDENTITY = ("device", "out", "resume")

_log = logging.getLogger(__name__)


# --- The run ------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    final: dict[str, Any] = field(default_factory=dict)


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def open_stores(shards: Sequence[str | StoreReader]) -> list[StoreReader]:
    """Each store of a run opened once (its manifest read and schema-checked once); the handles
    are passed on to the attack resolution, the checks and every epoch's stream."""
    from enspipe.stores import open_store

    for p in shards:
        if not isinstance(p, StoreReader) and not is_url(p) and not Path(local_path(p)).exists():
            raise EnspipeError(f"store {p} does not exist")
    return [open_store(p) for p in shards]


def resolve_attack(shards: Sequence[str | StoreReader], attack: str | None) -> str:
    """The attack a run trains with: `attack` if given, else the stores' own (they must all
    hold the same one), else FGSM. A given attack that the stores do not hold is an error.
    `shards`: store paths, or the readers `open_stores` made."""
    held: dict[str, str] = {}
    for r in open_stores(shards):
        held[str(r.path)] = r.identity.attack
    kinds = sorted(set(held.values()))
    if len(kinds) > 1:
        which = ", ".join(f"{p} holds {a}" for p, a in held.items())
        raise StoreError(f"the stores hold directions of different attacks ({which}); train on stores of one attack")
    if attack is not None and kinds and attack != kinds[0]:
        raise StoreError(f"`attack` {attack} conflicts with the stores, which hold {kinds[0]} directions "
                         f"({next(iter(held))}); leave `attack` out to train with {kinds[0]}, or precompute "
                         f"{attack} directions")
    return attack or (kinds[0] if kinds else "fgsm")


def _check_stores(dataset: SampleSource, paths: Sequence[str | StoreReader]) -> list[dict[str, Any]]:
    """Refuse, before training starts, any store that does not match the training data."""
    from enspipe.stores import check_against

    out = []
    for reader in open_stores(paths):
        check_against(reader, dataset)
        out.append({"path": reader.location, "model": reader.identity.model_name, "attack": reader.identity.attack,
                    "weights_sha256": reader.identity.weights_sha256,
                    "decoder": store_decoder(reader.identity.attack_params)})
    return out


def _note_store_decoders(stores: list[dict[str, Any]], decoder: str) -> None:
    """One line when a store's directions were computed on another decoder's pixels (`other_decoder_line`)."""
    if (line := other_decoder_line("train", stores, decoder)) is not None:
        _log.warning(line)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("epoch-*.pt"))


def train(cfg: TrainConfig, run_dir: str | os.PathLike | None = None, *, resume: bool | None = None,
          stream_factory: StreamFactory | None = None, on_metrics: MetricsFn | None = None,
          adversarial: AdversarialFn | None = None) -> TrainResult:
    """Train `cfg.model` on `cfg.dataset` into the run directory `cfg.out` (see the module
    docstring); `cfg.resume` continues a killed run. `train(cfg, run_dir, resume=...)` is the
    deprecated form of `train(replace(cfg, out=run_dir, resume=...))`.

    `resume` continues the run from its last epoch checkpoint, with the same configuration
    except the runtime options (`config.runtime_fields`) and `epochs`: a larger `epochs` extends a
    finished run (see `enspipe.train.schedule` for what the schedule then does).

    The seams (none of them is recorded in config.json, so a resumed run may differ in them):
      stream_factory(dataset, cfg, epoch, rank, world) -> the IterableDataset of the epoch's
          batches (default `batch_stream`: the BatchStream over cfg.shards);
      on_metrics(record) is called with every metrics record this rank makes (rank 0 also
          writes each one to metrics.jsonl, as without it);
      adversarial(model, batch, cfg, device) -> (x, y, online) makes a batch's training
          inputs (default `adversarial_inputs`).
    """
    if run_dir is not None or resume is not None:
        warnings.warn("train(cfg, run_dir, resume=...) is deprecated: put them in the config, "
                      "train(TrainConfig(..., out=run_dir, resume=...))", DeprecationWarning, stacklevel=2)
        cfg = replace(cfg, **({} if run_dir is None else {"out": os.fspath(run_dir)}),
                      **({} if resume is None else {"resume": resume}))
    if cfg.out is None:
        raise OptionError("out", "is required: the run directory to write")
    run_dir = Path(cfg.out)
    check_output(run_dir)  # never inside a store
    check_outside_dataset(run_dir, cfg.dataset)  # nor inside the image folder it trains on
    rank, world, local_rank = _distributed()
    device = resolve_device(cfg.device)
    resolve_decoder(cfg.decoder, device)  # nvjpeg without CUDA: one line, before any work
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    finished = False
    try:
        if rank == 0 and run_dir.is_dir():
            # One train per run folder (issue 25): refused before anything there is read or
            # written; a folder that does not exist yet is locked as _train creates it.
            hold_folder(run_dir, what="train", field="out")
        result = _train(cfg, run_dir, resume=cfg.resume, rank=rank, world=world, device=device,
                        stream_factory=stream_factory or batch_stream, on_metrics=on_metrics,
                        adversarial=adversarial or adversarial_inputs)
        finished = True
        return result
    finally:
        release_folder(run_dir)
        if world > 1:
            import torch.distributed as dist

            if finished:
                # The ranks leave together: a rank that tears gloo down while its peer still
                # works (rank 0 writing the final weights) was seen to abort in gloo's threads
                # ("terminate called without an active exception", SIGABRT). Not after an
                # error: a barrier could then wait for a rank that will never come.
                dist.barrier()
            dist.destroy_process_group()


def _resume_history(cfg: TrainConfig, config_path: Path, run_dir: Path) -> list[dict[str, int]]:
    """Refuse to resume with another configuration; return the run's epochs history. Runtime
    options and `epochs` may differ: a larger `epochs` extends a finished run."""
    saved = read_json(config_path)
    if not isinstance(saved, dict) or not isinstance(saved.get("train", {}), dict):
        raise ConfigError(f"{config_path}: not an enspipe run configuration (delete the run folder or choose another `out`)")
    # Options added since the run was started compare at their defaults.
    old = {**TrainConfig.defaults(), **saved.get("train", {})}
    # `decoder` compares as resolved, not as the option (`_check_resumed_decoder`).
    skip = (*NOT_IDENTITY, *runtime_fields(TrainConfig), "epochs", "decoder")
    mine = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    diff = [k for k, v in mine.items() if old.get(k) != v]
    if diff:
        raise OptionError("resume", f"{run_dir} was trained with another configuration "
                          f"(differs in: {', '.join(f'`{k}`' for k in diff)})")
    return saved.get("epochs_history") or [{"epochs": old["epochs"], "from_epoch": 0}]


def _recorded_decoders(saved: dict[str, Any], dataset: SampleSource, run_dir: Path) -> list[dict[str, Any]]:
    """The decoders a run's training images were decoded with, [{"decoder", "from_epoch"}], from its
    config.json. A run saved before this record: with no `decoder` option at all, PIL (the only
    path then); with one, what it resolved to on the device config.json names, as the code of the
    time resolved it (auto: nvjpeg on CUDA for a source of files)."""
    if (recs := saved.get("decoders")) is not None:
        if not (isinstance(recs, list) and recs and all(
                isinstance(d, dict) and d.get("decoder") in ("cpu", "nvjpeg") and type(d.get("from_epoch")) is int
                for d in recs)):
            raise ConfigError(f"{run_dir / 'config.json'}: `decoders` is not a list of "
                              '{"decoder": cpu|nvjpeg, "from_epoch": N} records (edited by hand?)')
        return recs
    option = saved.get("train", {}).get("decoder")
    if option is None:
        return [{"decoder": "cpu", "from_epoch": 0}]
    try:
        was = device_decoder(option, saved.get("device", "cpu"), dataset)
    except OptionError:  # a config.json edited by hand: take its word
        was = str(option)
    return [{"decoder": was, "from_epoch": 0}]


def _kept_decoders(recorded: list[dict[str, Any]], run_dir: Path) -> list[dict[str, Any]]:
    """The decoder records of the epochs a resume keeps: those that began at or before the last
    checkpoint's epoch (prepare_run records a decoder before its first epoch runs). The epoch is
    read from the checkpoint's name, so the check still comes before the stores' (remote ones
    download); `_decoder_history` applies the same rule with the epoch the checkpoint holds."""
    ckpts = _checkpoints(run_dir)
    try:
        last = int(ckpts[-1].stem.removeprefix("epoch-")) if ckpts else -1
    except ValueError:  # a file named by hand: every record counts, as before
        return recorded
    return [d for d in recorded if d["from_epoch"] <= last]


def _check_resumed_decoder(cfg: TrainConfig, decoder: str, recorded: list[dict[str, Any]], run_dir: Path,
                           device: torch.device, say: bool = True) -> None:
    """Refuse, or say in one line, that a resumed run decodes with another decoder than it did.

    The rule: a resume never changes the pixels silently. nvJPEG's pixels differ from PIL's by
    ~0.15 grey levels on average (a few at most), harmless for training but not the run that was
    started, and `auto` resolves by device, so a run resumed on another kind of machine would
    switch without anyone asking. So a switch that only `auto` made is refused, in one line saying
    how to keep the recorded decoder or to switch; a switch the user asked for by naming the
    decoder (`cpu` or `nvjpeg`) goes ahead with one line, and config.json records from which epoch
    each decoder ran (`decoders`)."""
    was = recorded[-1]["decoder"]
    if decoder == was:
        return
    if cfg.decoder == "auto":
        keep = (f"pass `decoder` {was} to keep them" if was == "cpu" else
                f"resume it on a CUDA device to keep them, or pass `decoder` {decoder} to switch")
        raise OptionError("decoder", f"is {decoder} here (auto on {device}), but {run_dir} decoded its training "
                          f"images with {was}: a resume does not switch decoders silently (their pixels differ "
                          f"slightly); {keep}")
    if say:
        _log.warning(f"train: {run_dir} decoded its training images with {was}; it continues with {decoder}, as "
                     "asked (config.json's \"decoders\" records from which epoch each one ran)")


def _decoder_history(recorded: list[dict[str, Any]], decoder: str, start_epoch: int) -> list[dict[str, Any]]:
    """config.json's `decoders` once the run goes on from `start_epoch` with `decoder`: the records of
    epochs it keeps, then this decoder from `start_epoch` where it differs (epochs from there are redone)."""
    kept = [d for d in recorded if d["from_epoch"] < start_epoch]
    return kept if kept and kept[-1]["decoder"] == decoder else [*kept, {"decoder": decoder, "from_epoch": start_epoch}]


@dataclass
class Prepared:
    """A run ready for its loop: what `prepare_run` resolved, loaded and restored."""

    cfg: TrainConfig                  # with the attack resolved (config.json records it)
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    precision: Precision
    dataset: SampleSource
    val: SampleSource | None          # the held-out samples of `val_limit`
    model: EnsModel
    net: torch.nn.Module              # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: Any                       # Precision.grad_scaler(): a no-op unless fp16
    start_epoch: int
    step: int
    nbatches: int                     # batches per epoch on this rank
    per_rank: int | None              # under DDP: the steps every rank takes per epoch
    schedule: dict[str, Any]          # learning_rate()'s keywords
    readers: list[StoreReader]        # the run's stores, each opened and verified once
    decoder: str                      # "cpu" | "nvjpeg": the run's decoder, resolved (config.json's `decoder`)


def prepare_run(cfg: TrainConfig, run_dir: Path, *, resume: bool, rank: int, world: int,
                device: torch.device) -> Prepared:
    """Everything before the first step: the attack resolved, a resume checked, the data and the
    stores verified, the model, optimizer and grad scaler made (and restored from the last
    checkpoint), config.json written."""
    config_path = run_dir / "config.json"
    # Resolved before anything else: config.json records the attack actually used, and a
    # resumed run compares resolved configurations.
    readers = open_stores(cfg.shards)  # each store opened once for the run, then passed on
    cfg = replace(cfg, attack=resolve_attack(readers, cfg.attack))
    check_sinks(cfg.log)
    if resume and not config_path.exists():
        # Killed before it wrote anything: re-running with --resume starts it (so a requeue
        # loop that always passes --resume recovers from every kill point).
        resume = False
    history: list[dict[str, int]] = []
    saved: dict[str, Any] = {}
    if resume:
        history = _resume_history(cfg, config_path, run_dir)
        saved = read_json(config_path)
    elif config_path.exists() and _checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; pass `resume` to continue it or choose another `out`")

    dataset = create_dataset(cfg.dataset, split=cfg.split, limit=cfg.limit, data_root=cfg.data_root,
                             image_size=cfg.image_size)
    # The decoder this run's images are decoded with, resolved once (the stream is made with it)
    # and recorded in config.json beside the device, as `device` is: the option may say auto.
    # A resume that would switch it is refused before the stores are checked (remote ones download).
    decoder = device_decoder(cfg.decoder, device, dataset)
    # Only the records of epochs the resume keeps count (those before its last checkpoint's): a record
    # written for an epoch that died before its checkpoint decoded nothing that remains.
    recorded = _kept_decoders(_recorded_decoders(saved, dataset, run_dir), run_dir) if resume else []
    if recorded:
        _check_resumed_decoder(cfg, decoder, recorded, run_dir, device, say=rank == 0)
    stores = _check_stores(dataset, readers)
    if rank == 0:
        _note_store_decoders(stores, decoder)
    val = (create_dataset(cfg.dataset, split="test", limit=cfg.val_limit, data_root=cfg.data_root,
                          image_size=cfg.image_size) if cfg.val_limit else None)
    seed_everything(cfg.seed)
    model = load_model_for(cfg.model, dataset, device, weights=cfg.weights, pretrained=cfg.pretrained,
                           new_head=cfg.new_head).train()
    if not isinstance(model, EnsModel):  # "binarized:SPEC" is an evaluation baseline, not a trainable model
        raise OptionError("model", f"{cfg.model} cannot be trained; name a model, run dir or checkpoint")
    precision = Precision.resolve(cfg.precision, device)
    precision.prepare_model(model)  # channels_last where the precision says so (Precision decides it, once)
    optimizer = _make_optimizer(cfg, model)
    # fp16 needs loss scaling (its gradients underflow); bf16 has fp32's range and does not.
    scaler = precision.grad_scaler()

    start_epoch, step = 0, 0
    if resume and (ckpts := _checkpoints(run_dir)):
        try:
            state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated file, or a pickle that weights_only refuses
            raise EnspipeError(f"`resume`: checkpoint {ckpts[-1]} is unreadable ({type(e).__name__}); "
                               "delete it to resume from the one before") from None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
    if start_epoch > cfg.epochs:
        raise OptionError("epochs", f"{cfg.epochs} is fewer than the {start_epoch} epochs {run_dir} has done")
    if resume and start_epoch == cfg.epochs and rank == 0:
        # Killed between the last checkpoint and its model files: write them from it.
        _save_final(run_dir, model, dataset, cfg, start_epoch - 1)
    if not history or history[-1]["epochs"] != cfg.epochs:
        history = [*history, {"epochs": cfg.epochs, "from_epoch": start_epoch}]
    decoders = _decoder_history(recorded, decoder, start_epoch)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        hold_folder(run_dir, what="train", field="out")  # before config.json replaces another run's
        write_json(config_path, {"train": cfg.to_dict(), "run_dir": str(run_dir), "world_size": world,
                                 "device": str(device), "decoder": decoder, "decoders": decoders,
                                 "dataset": dataset.identity(), "stores": stores,
                                 "model": model.config.to_dict(), "versions": versions(),
                                 "epochs_history": history})

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = _batches_per_rank(len(dataset), cfg, world) if world > 1 else None
    nbatches = per_rank or math.ceil(len(dataset) / world / cfg.batch_size)
    schedule = dict(schedule=cfg.schedule, batches=nbatches, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                    lr_decay=cfg.lr_decay, lr_decay_every=cfg.lr_decay_every)
    return Prepared(cfg, run_dir, rank, world, device, precision, dataset, val, model, net, optimizer, scaler,
                    start_epoch, step, nbatches, per_rank, schedule, readers, decoder)


def _train(cfg: TrainConfig, run_dir: Path, *, resume: bool, rank: int, world: int, device: torch.device,
           stream_factory: StreamFactory, on_metrics: MetricsFn | None, adversarial: AdversarialFn) -> TrainResult:
    r = prepare_run(cfg, run_dir, resume=resume, rank=rank, world=world, device=device)
    cfg, model, net, optimizer, scaler, precision, step = r.cfg, r.model, r.net, r.optimizer, r.scaler, r.precision, r.step
    if stream_factory is batch_stream:  # the stores prepare_run opened and the decoder it recorded
        stream_factory = functools.partial(batch_stream, stores=r.readers, decoder=r.decoder)
    # Records after the checkpoint's step were made by a killed run; they are made again.
    log = RunLog(run_dir, sinks=cfg.log, write=rank == 0, resume_step=step, on_metrics=on_metrics)
    writer = CheckpointWriter()
    epochs_bar = progress(total=cfg.epochs, initial=r.start_epoch, desc=f"train {run_dir.name}", unit="epoch",
                          bar=False, disable=None if rank == 0 else True)
    totals = {"online_passes": 0, "batches": 0, "samples": 0}
    # The held-out images decoded as the training ones are (the run's loader workers and recorded
    # decoder); its workers forked now, before the training loader's (epoch_batches starts them lazily).
    validation = Validation(r.val, eps=cfg.eps, device=device, precision=precision, workers=cfg.loader_workers,
                            decoder=r.decoder) if r.val is not None and rank == 0 else None
    # The epochs' batches: read, shuffled, source-drawn and augmented ahead of the step (in
    # cfg.loader_workers processes that live for the whole run) in an order fixed by (seed, epoch,
    # rank), so that a resumed run replays exactly what an uninterrupted one would have.
    epochs = epoch_batches(lambda e: stream_factory(r.dataset, cfg, e, rank, world),
                           lambda stream: batch_loader(stream, cfg, device),
                           range(r.start_epoch, cfg.epochs), cfg.loader_workers, r.per_rank)
    ended = None  # when the previous epoch's work was done: its boundary is the time to this epoch's first batch
    try:
        for epoch, batches in epochs:
            window = Window(1 + len(cfg.shards), device)
            model.train()
            bar = progress(total=r.nbatches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", lines=False,
                           leave=True, disable=None if rank == 0 else True)
            order: list[torch.Tensor] = []
            records: list[dict[str, Any]] = []
            asked = time.perf_counter()
            for i, batch in enumerate(batches):
                window.wait += time.perf_counter() - asked
                if i == 0 and ended is not None:
                    window.boundary = time.perf_counter() - ended
                if cfg.record_indices:
                    order.append(batch["index"])
                lr = learning_rate(cfg.learning_rate, epoch=epoch, batch=i, **r.schedule)
                set_learning_rate(optimizer, lr)
                # The inputs: a share of the batch replaced by x_adv, from a stored direction or,
                # when the model itself is the drawn source, from an online pass.
                x, y, online = adversarial(model, batch, cfg, device)
                x = precision.memory_format(x)
                # Forward at the run's precision, the loss in fp32. A non-finite loss is caught at
                # the next metrics line (no host sync per step), before any checkpoint holds it.
                with precision.autocast():
                    logits = net(x).float()
                    # Inside autocast: the paired loss runs a second (clean) forward pass.
                    loss = losses.training_loss(model, logits, y, batch, cfg)
                # Backward and step (fp16: through the grad scaler, a no-op otherwise). With
                # grad_accum, the gradients of grad_accum batches add up (each loss / grad_accum: the
                # mean over the effective batch) and one step follows them, or the epoch's last batch.
                if i % cfg.grad_accum == 0:
                    optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()
                if (i + 1) % cfg.grad_accum == 0 or i + 1 == r.nbatches:
                    scaler.step(optimizer)
                    scaler.update()
                step += 1
                # Bookkeeping, on the device: a metrics record every log_every steps.
                window.add(batch, loss, logits, y, online, step)
                totals["online_passes"] += int(online)
                totals["batches"] += 1
                totals["samples"] += len(y)
                bar.update(1)
                if step % cfg.log_every == 0:
                    records.append(_flush(window, epoch, step, lr, run_dir, writer))
                    bar.set_postfix(loss=records[-1]["loss"], acc=records[-1]["accuracy"],
                                    sps=round(records[-1]["samples_per_s"]))
                    log.write(records[-1])
                asked = time.perf_counter()
            bar.close()
            # End of the epoch: the sample order (audits), the last partial window (every rank
            # hears its records; rank 0 writes them), the held-out errors, and the checkpoint
            # --resume continues from (written in the background while the next epoch runs).
            if cfg.record_indices:
                (run_dir / "indices").mkdir(parents=True, exist_ok=True)
                np.save(run_dir / "indices" / f"rank{rank}-epoch{epoch:04d}.npy", torch.cat(order).numpy())
            if window.batches:
                records.append(_flush(window, epoch, step, lr, run_dir, writer))
                log.write(records[-1])
            ended = time.perf_counter()  # the device is drained (the flush read it): from here it waits
            summary = _epoch_summary(records)
            if validation is not None:
                v = validation(model)
                log.write({"kind": "val", "epoch": epoch + 1, "step": step, **v})
                summary.update(val_clean_error=round(v["clean_error"], 4), val_fgsm_error=round(v["fgsm_error"], 4))
            epochs_bar.update(1, **summary)
            if rank == 0:
                writer.submit(_checkpoint_job(run_dir, model, optimizer, scaler, epoch, step, r.dataset, cfg, device))
        writer.wait()
    except UndecodableJPEG as e:  # the step knows the sample, the source knows its file
        raise named(r.dataset, e) from None
    finally:
        if validation is not None:
            validation.close()
        writer.close()
        log.close()
        epochs_bar.close()
    return TrainResult(run_dir, cfg.epochs, totals)


def _flush(window: Window, epoch: int, step: int, lr: float, run_dir: Path, writer: CheckpointWriter) -> dict[str, Any]:
    """The window's metrics record; a non-finite loss in it stops the run here, before the
    epoch's checkpoint could keep its weights."""
    rec = window.flush(epoch, step, lr)
    if "nonfinite" in rec:
        writer.close()
        last = _checkpoints(run_dir)
        bad = rec["nonfinite"]
        raise EnspipeError(
            f"loss became {bad['loss']} at epoch {epoch + 1} step {bad['step']}; stopping "
            + (f"(last good checkpoint: {last[-1]})" if last else "(no checkpoint yet)")
            + "; try a lower `lr`")
    return rec


def _epoch_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch's line: its windows' sample-weighted loss and accuracy, its rate."""
    samples = sum(r["samples"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    if not samples:
        return {}
    return {"loss": round(sum(r["loss"] * r["samples"] for r in records) / samples, 4),
            "accuracy": round(sum(r["accuracy"] * r["samples"] for r in records) / samples, 4),
            "samples/s": round(samples / max(seconds, 1e-9)),
            "online": f"{sum(r['online_passes'] for r in records)}/{sum(r['batches'] for r in records)}"}


def _batches_per_rank(n: int, cfg: TrainConfig, world: int) -> int:
    """DDP needs every rank to take the same number of steps in every epoch: the smallest
    full-batch count over ranks and epochs (block orders are cheap permutations)."""
    counts = []
    for epoch in range(cfg.epochs):
        for r in range(world):
            blocks = block_ranges(n, cfg.block_size, seed=cfg.seed, epoch=epoch, rank=r, world_size=world)
            # Leftovers are merged over the rank's epoch (enspipe.sampling.epoch_plan), whatever
            # the loader workers, so only the rank's total matters.
            counts.append(sum(e - s for s, e in blocks) // cfg.batch_size)
    if min(counts) == 0:
        raise ConfigError(f"{n} samples over {world} ranks leave a rank without a full batch of {cfg.batch_size}")
    return min(counts)


def _make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate)
    if cfg.optimizer == "rmsprop":
        # Kurakin et al. / the paper's ImageNet setup: RMSProp, decay 0.9, eps 1.0.
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, alpha=0.9, eps=1.0)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9)


def _checkpoint_job(run_dir: Path, model: EnsModel, optimizer: torch.optim.Optimizer,
                    scaler: Any, epoch: int, step: int, dataset: SampleSource,
                    cfg: TrainConfig, device: torch.device) -> Callable[[], None]:
    """Copy this moment's state (the live tensors change as soon as the next epoch starts) and
    return the job that writes it: the epoch checkpoint, then the model files beside it."""
    frozen = FrozenModel(model)
    state = {
        "model": frozen.state_dict(),
        "optimizer": snapshot(optimizer.state_dict()),
        "rng_cpu": torch.get_rng_state(),
        "epoch": epoch,
        "step": step,
    }
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    path = run_dir / "checkpoints" / f"epoch-{epoch:04d}.pt"

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_target(path) as tmp:
                torch.save(state, tmp)
        except RuntimeError as e:
            # torch reports a failed write (e.g. a full disk) as RuntimeError: free the space,
            # keep the previous checkpoint, and say what happened in one line.
            raise EnspipeError(f"could not write checkpoint {path} ({str(e).splitlines()[0]}); "
                               "free space and re-run with `resume`") from None
        _save_final(run_dir, frozen, dataset, cfg, epoch)  # type: ignore[arg-type]
        prune_checkpoints(_checkpoints(run_dir), cfg.keep_checkpoints)

    return write


def _save_final(run_dir: Path, model: EnsModel, dataset: SampleSource, cfg: TrainConfig, epoch: int) -> None:
    save_model(model, run_dir, classes=list(dataset.classes), provenance={
        "trained_by": "enspipe train", "mode": cfg.mode, "epochs_done": epoch + 1,
        "dataset": dataset.identity(), "shards": list(cfg.shards), "seed": cfg.seed})


callable_stage(__name__)  # `enspipe.train(cfg)` is train(cfg)
