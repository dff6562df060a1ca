"""Planning: the store identity of each attack, and per store whether it is reused, resumed or created.

A store's path is derived from its identity (dataset identity incl. fingerprint, geometry,
classes, model name, weights sha256, attack, label mode, precision), so a store that already exists
complete is reused and nothing is written; a partly written one is resumed with the batch
size its first shards used (a shard's bytes depend on its batch boundaries). Each attack
that has work becomes one `ShardJob`: everything a process needs to compute its shards.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enspipe.attack_records import record
from enspipe.util.errors import ModelError, StoreError

from .config import FORMATS, PrecomputeConfig

if TYPE_CHECKING:
    import torch

    from enspipe.stores import StoreIdentity

__all__ = ["Plan", "ShardJob", "plan_stores", "store_identity", "store_precision"]


@dataclass(frozen=True)
class ShardJob:
    """Everything a process needs to compute and write shards of one attack (picklable)."""

    model: str                   # absolute path when the spec is a path
    weights: str | None
    pretrained: bool
    dataset: str                 # the source's canonical name (absolute paths for imagefolder:/wds:)
    split: str
    limit: int | None
    data_root: str | None
    image_size: int | None
    fingerprint: str             # what the worker's dataset must hash to
    weights_sha256: str          # what the worker's model must hash to
    attack: str
    label: str
    batch_size: int
    device: str
    stores: tuple[str, ...]      # every store of this attack that has shards to write
    torch_threads: int | None = None
    precision: str = "fp32"      # fp32 | bf16 (part of the stores' identity)
    loader_workers: int | None = None  # decoding processes; None: from the cores (loader.default_workers)
    wds_images: str = "source"   # source | none: what wds stores carry beside the directions
    decoder: str = "cpu"         # cpu (PIL in the loader) | nvjpeg (on the device): resolved, part of the identity


@dataclass
class Plan:
    paths: list[Path] = field(default_factory=list)             # returned, in (attack, format) order
    jobs: list[ShardJob] = field(default_factory=list)
    create: list[tuple[Path, StoreIdentity, str]] = field(default_factory=list)  # (path, identity, fmt)


def log(message: str) -> None:
    """One line on stderr (stdout carries the store paths)."""
    print(message, file=sys.stderr, flush=True)


def absolute_if_path(spec: str | None) -> str | None:
    """Workers may run elsewhere (another cwd): hand them absolute paths."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


# --- Identity ----------------------------------------------------------------------------------

def _label_mode(attack: str, label: str) -> str:
    # A least-likely attack (Step-LL) targets the least-likely class of the model's own
    # prediction whatever --label says, so its stores are named "pred" and --label cannot
    # split them in two: the attack's record says which rule it follows.
    return record(attack).label_mode(label)


def _attack_params(attack: str, label: str, precision: str = "fp32", decoder: str = "cpu") -> dict[str, Any]:
    from enspipe.data.decode import decoder_params

    params: dict[str, Any] = record(attack).store_params(label)
    # fp32 is the absence of the key: every store written before precisions existed is fp32 and
    # keeps its identity (and so its path); other precisions are stores of their own.
    if precision != "fp32":
        params["precision"] = precision
    # Likewise the decoder: the PIL path ("cpu") made every store before decoders existed.
    params.update(decoder_params(decoder))
    return params


def store_precision(identity: StoreIdentity) -> str:
    """The numeric precision a store's directions were computed in."""
    return str(identity.attack_params.get("precision", "fp32"))


def store_identity(dataset, model, sha: str, attack: str, label: str, precision: str = "fp32",
                   decoder: str = "cpu") -> StoreIdentity:
    """The StoreIdentity of (dataset, static model + weights, attack, label mode, precision, decoder)."""
    from enspipe.stores import StoreIdentity

    return StoreIdentity(
        dataset=dataset.identity(), geometry=dataset.geometry.shape, preprocess=dataset.geometry.preprocess,
        num_classes=dataset.num_classes, model_name=model.config.name, weights_sha256=sha, attack=attack,
        attack_params=_attack_params(attack, label, precision, decoder), label_mode=_label_mode(attack, label))


# --- Inputs: the dataset and the static model, once per process ---------------------------------

def _open_inputs(model: str, weights: str | None, pretrained: bool, dataset: str, split: str,
                 limit: int | None, data_root: str | None, device: torch.device, image_size: int | None = None):
    """(dataset, static model in eval mode on device, weights sha256), cached per process."""
    from enspipe.data import create_dataset
    from enspipe.models import EnsModel, load_model_for, weights_sha256

    # The files' stamps are part of the key: a model retrained in place is loaded again.
    def key(name: str) -> tuple:
        return (model, _stamp(model), weights, _stamp(weights), pretrained, name, split, limit, data_root, image_size,
                str(device))

    with _INPUTS_LOCK:  # a worker running several threads loads once
        if key(dataset) in _INPUTS:
            return _INPUTS[key(dataset)]
        ds = create_dataset(dataset, split=split, limit=limit, data_root=data_root, image_size=image_size)
        # A static model: eval mode (no dropout, frozen BatchNorm) and no parameter gradients.
        net = load_model_for(model, ds, device, weights=weights, pretrained=pretrained).requires_grad_(False)
        if not isinstance(net, EnsModel):  # a binarized model's gradient is zero: nothing to store
            raise ModelError(f"precompute needs a plain static model, not {model}")
        sha = weights_sha256(net)
        _INPUTS.clear()  # one (dataset, model) per process at a time keeps worker memory flat
        # Also under the source's canonical name, which is what shard tasks ask for.
        _INPUTS[key(dataset)] = _INPUTS[key(ds.name)] = (ds, net, sha)
        return _INPUTS[key(dataset)]


_INPUTS: dict[tuple, tuple[Any, torch.nn.Module, str]] = {}
_INPUTS_LOCK = threading.Lock()


def _stamp(spec: str | None) -> tuple[int, int] | None:
    """(mtime, size) of a checkpoint path (a run dir's model.safetensors), None for a name."""
    if spec is None:
        return None
    p = Path(spec)
    p = p / "model.safetensors" if p.is_dir() else p
    with contextlib.suppress(OSError):
        st = p.stat()
        return (st.st_mtime_ns, st.st_size)
    return None


# --- The plan: reuse, resume or create ----------------------------------------------------------

def _recorded_batch_size(manifest: dict | None) -> int | None:
    """The batch size a partly written store was started with (its shards must all use it)."""
    if manifest is None:
        return None
    bs = manifest.get("extra", {}).get("config", {}).get("batch_size")
    return int(bs) if isinstance(bs, int) and bs > 0 else None


def plan_stores(cfg: PrecomputeConfig, dataset, model, sha: str, device: torch.device) -> Plan:
    """Decide, per (attack, format), whether the store is reused, resumed or created."""
    from enspipe.stores import existing_manifest, open_store, store_path

    from enspipe.data.decode import device_decoder

    plan = Plan()
    decoder = device_decoder(cfg.decoder, device, dataset)
    for attack in cfg.attacks:
        identity = store_identity(dataset, model, sha, attack, cfg.label, cfg.precision, decoder)
        todo: list[str] = []
        batch_size = cfg.batch_size
        for fmt in FORMATS[cfg.format]:
            path = store_path(store_root(cfg.out), identity, fmt)
            plan.paths.append(path)
            manifest = existing_manifest(path)
            if manifest is not None and manifest["complete"]:
                open_store(path)  # refuses a damaged store (a shard file missing or resized)
                log(f"reused {path}")
                continue
            recorded = _recorded_batch_size(manifest)
            if recorded is not None and recorded != cfg.batch_size:
                log(f"{path}: resuming with batch size {recorded}, the size its first shards were computed with")
                batch_size = recorded
            plan.create.append((path, identity, fmt))
            todo.append(str(path))
        if todo:
            plan.jobs.append(ShardJob(
                model=absolute_if_path(cfg.model), weights=absolute_if_path(cfg.weights),
                pretrained=cfg.pretrained, dataset=dataset.name, split=cfg.split, limit=cfg.limit,
                data_root=absolute_if_path(cfg.data_root), image_size=cfg.image_size,
                fingerprint=dataset.fingerprint,
                weights_sha256=sha, attack=attack, label=cfg.label, batch_size=batch_size,
                # Workers of an existing cluster choose their own device from the user's spec.
                device=cfg.device if cfg.scheduler else str(device), stores=tuple(todo),
                precision=cfg.precision, loader_workers=cfg.loader_workers, wds_images=cfg.wds_images,
                decoder=decoder))
    return plan


def manifest_extra(cfg: PrecomputeConfig, job: ShardJob, device: torch.device) -> dict[str, Any]:
    """What a new store's manifest records of its producer (`verify --recompute` rebuilds from it)."""
    from enspipe.util.runtime import versions

    # Paths made absolute and the dataset's canonical name, so `verify --recompute` can rebuild it.
    config = {**cfg.to_dict(), "attacks": [job.attack], "batch_size": job.batch_size, "dataset": job.dataset,
              "data_root": job.data_root, "out": str(store_root(cfg.out))}
    return {
        "producer": "enspipe precompute",
        "versions": versions(),
        "model": {"spec": job.model, "weights": job.weights, "pretrained": job.pretrained},
        "device": str(device),
        "config": config,
    }


def pending_shards(job: ShardJob) -> list[int]:
    """Shards that some store of this attack still lacks (all stores share the shard plan)."""
    from enspipe.stores import open_writer

    writers = [open_writer(p) for p in job.stores]
    return sorted({s for w in writers for s in w.pending_shards()})


# --- One writer per store -----------------------------------------------------------------------

def lock_path(store: Path) -> Path:
    """The lock of a store: a hidden file beside it, in its parent (the store itself may not exist yet)."""
    return store.parent / f".{store.name}.lock"


@contextlib.contextmanager
def store_locks(paths: list[Path]):
    """Hold an exclusive lock on each store (in sorted order, so two precomputes never wait on
    each other in a cycle) for as long as this precompute writes them. A store another precompute
    is writing is waited for, with one line saying so. The lock is an flock: the OS releases it
    when its holder dies, however it dies, so a killed precompute never leaves a store locked.
    Yields True when some lock had to be waited for (the other writer may have finished the store)."""
    try:
        import fcntl  # noqa: F401 -- only whether flock exists here
    except ImportError:  # no flock (Windows): one writer per store is then the user's to keep
        yield False
        return
    from enspipe.util.fileio import file_lock
    from enspipe.stores.remote import is_url

    waited = False
    with contextlib.ExitStack() as stack:
        # Object storage has no flock: there two writers of one store write the same bytes
        # (content-addressed shards, the manifest last), so one wins and nothing is corrupted.
        for store in sorted({p for p in paths if not is_url(p)}, key=str):
            lock = lock_path(store)
            if not stack.enter_context(file_lock(lock)):
                try:
                    holder = (lock.read_text().strip().splitlines() or ["another process"])[-1]  # what its writer wrote
                except OSError:
                    holder = "another process"
                log(f"{store}: another precompute ({holder}) is writing this store; waiting for it to finish")
                stack.enter_context(file_lock(lock, blocking=True))
                waited = True
            lock.write_text(f"pid {os.getpid()}\n")  # for the next writer's line (the lock is the flock)
        yield waited


# --- The store root -----------------------------------------------------------------------------

def store_root(out: str) -> Path | str:
    """`out` as stores are named under it: a local folder made absolute, a store URL as it is."""
    from enspipe.stores.remote import is_url, local_path

    return out if is_url(out) else Path(local_path(out)).absolute()


def check_root(root: str) -> None:
    """Fail before any work when ROOT cannot be created or written; creates nothing. A URL root:
    its bucket must exist and answer (one line naming the URL otherwise)."""
    from enspipe.stores.remote import check_remote_root, is_url, local_path

    if is_url(root):
        check_remote_root(root)
        return
    root = local_path(root)
    p = Path(root).absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise StoreError(f"cannot create the store root {root}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"cannot create the store root {root}: {existing} is not writable")


def create_root(root: str) -> None:
    from enspipe.stores.remote import is_url, local_path

    if is_url(root):
        return  # object storage has no folders to make
    root = local_path(root)
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the store root {root}: {e.strerror or e}") from None
