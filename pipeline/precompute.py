"""precompute: a static model's adversarial directions over a dataset, into perturbation stores.

    precompute(PrecomputeConfig(model="runs/B", dataset="mnist", attacks=("step_ll",), out="stores"))

Plan (DESIGN §2-3):
1. Open the dataset and the static model (eval mode, no parameter gradients); the store
   identity is (dataset identity incl. fingerprint, geometry, classes, model name, weights
   sha256, attack, label mode). `stores.store_path` derives each store's path under ROOT from
   it, so a store that already exists complete is reused and nothing is written.
2. Create every store (all arrays, once) in this process, before any worker runs.
3. Cut the samples into shards (`shard_size` whole samples). A shard is the unit of work, of
   writing and of retry: one task computes all of it and writes it with one
   `StoreWriter.write_shard` per store, which is atomic (files first, completion record last).
   Shards with a valid record are skipped, so a re-run after a crash or `kill -9` finishes the
   rest. Tasks are idempotent: a shard computed twice is written with identical bytes.
4. Finalize every store (manifest with all shard records, complete=true).

Determinism: batches start at the shard's first sample and have `batch_size` samples (the
last one fewer), so a shard's directions do not depend on which process computed it or when.
On CPU the kernels give bit-identical results for any thread count (tests check this: a
2-worker run with one torch thread each equals the in-process run with two). Across GPU
models this is not guaranteed; a store records the device that started it.

Overlap: batches are computed in the calling thread; a single background thread, at a lower
priority, turns each finished batch into numpy and writes each finished shard, so the next
batch (and shard) is computed while the previous one is encoded and written
(benchmarks/bench_precompute.py measures it against writing in the computing thread). In a
dask task the shard is written before the task returns: a finished task is a durable shard.

Workers: in-process by default. `workers=N` starts a local dask.distributed cluster of N
single-threaded worker processes on loopback; `scheduler=ADDR` uses an existing cluster
(ROOT, the data and the model must then be at the same paths on every worker). One task per
shard via `client.map(..., pure=False, retries=2)`; a worker that dies has its task rerun
elsewhere by dask. Each worker process loads the dataset and model once (module caches).
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from enspipe.errors import ConfigError, EnspipeError, ModelError, StoreError

if TYPE_CHECKING:
    import torch

# torch (and the attacks) are imported where they are used, so that a bad option is
# reported before the second or two that importing torch takes.

ATTACKS = ("fgsm", "step_ll")
LABEL_MODES = ("pred", "true")
FORMATS = {"zarr": ("zarr",), "wds": ("wds",), "both": ("zarr", "wds")}
WRITER_NICE = 10                    # niceness of the background writer thread (see _ShardSink._loop)
SCHEDULER_CONNECT_TIMEOUT_S = 5     # an unreachable scheduler fails in seconds, not minutes
SCHEDULER_WORKERS_TIMEOUT_S = 60    # a reachable scheduler must have a worker within this


@dataclass(frozen=True)
class PrecomputeConfig:
    """What to precompute; the CLI and the job runner build it from their options."""

    model: str                      # a run dir / checkpoint, or a registry name with weights/pretrained
    out: str                        # store ROOT: store paths are derived under it
    weights: str | None = None
    pretrained: bool = False
    dataset: str = "digits"
    data_root: str | None = None
    split: str = "train"
    limit: int | None = None
    image_size: int | None = None   # resize (imagefolder: resize + center-crop) to this square size
    attacks: tuple[str, ...] = ("step_ll",)  # each attack gets its own store
    label: str = "pred"             # FGSM's label; Step-LL always uses the least-likely class
    fmt: str = "zarr"               # zarr | wds | both
    shard_size: int = 1024
    batch_size: int = 256
    device: str = "auto"
    workers: int | None = None      # local dask cluster of N worker processes
    scheduler: str | None = None    # address of an existing dask scheduler

    def __post_init__(self) -> None:
        names = (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks)
        object.__setattr__(self, "attacks", names)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("--model must name a static model (a run dir, checkpoint or architecture)")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ConfigError("--out must name the store root directory")
        if not names:
            raise ConfigError(f"--attack must name at least one of {', '.join(ATTACKS)}")
        for a in names:
            if a not in ATTACKS:
                raise ConfigError(f"unknown attack {a!r}: precompute stores {' and '.join(ATTACKS)} directions")
        if len(set(names)) != len(names):
            raise ConfigError(f"--attack lists an attack twice: {','.join(names)}")
        if self.label not in LABEL_MODES:
            raise ConfigError(f"--label must be pred or true, not {self.label!r}")
        if self.fmt not in FORMATS:
            raise ConfigError(f"--format must be zarr, wds or both, not {self.fmt!r}")
        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
        for name in ("shard_size", "batch_size", "limit"):
            value = getattr(self, name)
            if not positive(value) and not (name == "limit" and value is None):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        if self.workers is not None and not positive(self.workers):
            raise ConfigError(f"--workers must be at least 1 (leave it out to compute in-process), "
                              f"not {self.workers!r}")
        if self.scheduler is not None and not str(self.scheduler).strip():
            raise ConfigError("--scheduler must be a dask scheduler address such as tcp://host:8786")
        if self.workers is not None and self.scheduler is not None:
            raise ConfigError("--workers starts a local cluster and --scheduler uses an existing one: pass only one")
        if self.weights is not None and self.pretrained:
            raise ConfigError("--weights and --pretrained exclude each other: pass one source of weights")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attacks"] = list(self.attacks)
        return d


# --- Planning: identities, paths, reuse ------------------------------------------------------

@dataclass(frozen=True)
class _Job:
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


@dataclass
class _Plan:
    paths: list[Path] = field(default_factory=list)             # returned, in (attack, format) order
    jobs: list[_Job] = field(default_factory=list)
    create: list[tuple[Path, Any, str]] = field(default_factory=list)  # (path, identity, fmt) to create


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _absolute_if_path(spec: str | None) -> str | None:
    """Workers may run elsewhere (another cwd): hand them absolute paths."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _label_mode(attack: str, label: str) -> str:
    # Step-LL's target is the least-likely class of the model's own prediction whatever
    # --label says, so its stores are named "pred" and --label cannot split them in two.
    return "pred" if attack == "step_ll" else label


def _attack_params(attack: str, label: str) -> dict[str, Any]:
    if attack == "step_ll":
        return {"loss": "ce", "target": "least_likely", "direction": "-sign(grad)"}
    return {"loss": "ce", "target": f"{label}_label", "direction": "sign(grad)"}


def store_identity(dataset, model, sha: str, attack: str, label: str):
    """The StoreIdentity of (dataset, static model + weights, attack, label mode)."""
    from enspipe.stores import StoreIdentity

    return StoreIdentity(
        dataset=dataset.identity(), geometry=dataset.geometry.shape, preprocess=dataset.geometry.preprocess,
        num_classes=dataset.num_classes, model_name=model.config.name, weights_sha256=sha, attack=attack,
        attack_params=_attack_params(attack, label), label_mode=_label_mode(attack, label))


def _open_inputs(model: str, weights: str | None, pretrained: bool, dataset: str, split: str,
                 limit: int | None, data_root: str | None, device: torch.device, image_size: int | None = None):
    """(dataset, static model in eval mode on device, weights sha256), cached per process."""
    from enspipe.data import create_dataset
    from enspipe.models import resolve_model, weights_sha256

    # The files' stamps are part of the key: a model retrained in place is loaded again.
    def key(name: str) -> tuple:
        return (model, _stamp(model), weights, _stamp(weights), pretrained, name, split, limit, data_root, image_size,
                str(device))

    with _INPUTS_LOCK:  # a worker running several threads loads once
        if key(dataset) in _INPUTS:
            return _INPUTS[key(dataset)]
        ds = create_dataset(dataset, split=split, limit=limit, data_root=data_root, image_size=image_size)
        net = resolve_model(model, weights=weights, pretrained=pretrained, num_classes=ds.num_classes,
                            input_size=ds.geometry.shape)
        if tuple(net.config.input_size) != tuple(ds.geometry.shape):
            raise ModelError(f"model {model} takes {'x'.join(map(str, net.config.input_size))} input but "
                             f"{dataset} is {'x'.join(map(str, ds.geometry.shape))}")
        if net.config.num_classes != ds.num_classes:
            raise ModelError(f"model {model} has {net.config.num_classes} classes but {dataset} has {ds.num_classes}")
        sha = weights_sha256(net)
        # A static model: eval mode (no dropout, frozen BatchNorm) and no parameter gradients.
        net = net.eval().requires_grad_(False).to(device)
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


def _recorded_batch_size(path: Path) -> int | None:
    """The batch size a partly written store was started with (its shards must all use it)."""
    from enspipe.stores.manifest import MANIFEST_NAME, read_manifest

    if not (path / MANIFEST_NAME).is_file():
        return None
    bs = read_manifest(path).get("extra", {}).get("config", {}).get("batch_size")
    return int(bs) if isinstance(bs, int) and bs > 0 else None


def _plan(cfg: PrecomputeConfig, dataset, model, sha: str, device: torch.device) -> _Plan:
    """Decide, per (attack, format), whether the store is reused, resumed or created."""
    from enspipe.stores import open_store, store_path
    from enspipe.stores.manifest import MANIFEST_NAME, read_manifest

    plan = _Plan()
    for attack in cfg.attacks:
        identity = store_identity(dataset, model, sha, attack, cfg.label)
        todo: list[str] = []
        batch_size = cfg.batch_size
        for fmt in FORMATS[cfg.fmt]:
            path = store_path(Path(cfg.out).absolute(), identity, fmt)
            plan.paths.append(path)
            if (path / MANIFEST_NAME).is_file() and read_manifest(path)["complete"]:
                open_store(path)  # refuses a damaged store (a shard file missing or resized)
                _log(f"reused {path}")
                continue
            recorded = _recorded_batch_size(path)
            if recorded is not None and recorded != cfg.batch_size:
                _log(f"{path}: resuming with batch size {recorded}, the size its first shards were computed with")
                batch_size = recorded
            plan.create.append((path, identity, fmt))
            todo.append(str(path))
        if todo:
            plan.jobs.append(_Job(
                model=_absolute_if_path(cfg.model), weights=_absolute_if_path(cfg.weights),
                pretrained=cfg.pretrained, dataset=dataset.name, split=cfg.split, limit=cfg.limit,
                data_root=_absolute_if_path(cfg.data_root), image_size=cfg.image_size,
                fingerprint=dataset.fingerprint,
                weights_sha256=sha, attack=attack, label=cfg.label, batch_size=batch_size,
                # Workers of an existing cluster choose their own device from the user's spec.
                device=cfg.device if cfg.scheduler else str(device), stores=tuple(todo)))
    return plan


def _manifest_extra(cfg: PrecomputeConfig, job: _Job, device: torch.device) -> dict[str, Any]:
    from enspipe.runtime import versions

    # Paths made absolute and the dataset's canonical name, so `verify --recompute` can rebuild it.
    config = {**cfg.to_dict(), "attacks": [job.attack], "batch_size": job.batch_size, "dataset": job.dataset,
              "data_root": job.data_root, "out": str(Path(cfg.out).absolute())}
    return {
        "producer": "enspipe precompute",
        "versions": versions(),
        "model": {"spec": job.model, "weights": job.weights, "pretrained": job.pretrained},
        "device": str(device),
        "config": config,
    }


def _check_root(root: str) -> None:
    """Fail before any work when ROOT cannot be created or written; creates nothing."""
    p = Path(root).absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise StoreError(f"cannot create the store root {root}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"cannot create the store root {root}: {existing} is not writable")


def _create_root(root: str) -> None:
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the store root {root}: {e.strerror or e}") from None


# --- The public entry point ------------------------------------------------------------------

def precompute(cfg: PrecomputeConfig, *, overlap: bool = True) -> list[Path]:
    """Compute (or reuse) one store per (attack, format); return their paths in that order.

    `overlap=False` writes each shard in the computing thread (for benchmarks only).
    """
    from enspipe.runtime import resolve_device
    from enspipe.stores import create_store, open_writer

    device = resolve_device(cfg.device)
    if cfg.weights is None and not cfg.pretrained and not Path(cfg.model).expanduser().exists():
        # An architecture name alone would be a randomly initialised "static" model.
        raise ConfigError(f"--model {cfg.model} is no run directory or checkpoint; an architecture name "
                          "needs --weights CHECKPOINT or --pretrained")
    _check_root(cfg.out)
    with contextlib.ExitStack() as stack:
        # An existing scheduler is reached first (it is cheap), so an unreachable one fails
        # in seconds; a local cluster is only started when there is work for it.
        client = _connect(cfg.scheduler, stack) if cfg.scheduler else None
        dataset, model, sha = _open_inputs(_absolute_if_path(cfg.model), _absolute_if_path(cfg.weights),
                                           cfg.pretrained, cfg.dataset, cfg.split, cfg.limit,
                                           _absolute_if_path(cfg.data_root), device, cfg.image_size)
        _create_root(cfg.out)
        plan = _plan(cfg, dataset, model, sha, device)
        if not plan.jobs:
            return plan.paths
        if client is None:
            client = _local_client(cfg, device, stack)
        # Every store (all its arrays) is created here, before any task runs.
        for path, identity, fmt in plan.create:
            job = next(j for j in plan.jobs if str(path) in j.stores)
            create_store(path, identity, fmt=fmt, shard_size=cfg.shard_size,
                         extra=_manifest_extra(cfg, job, device))
        units = [(job, s) for job in plan.jobs for s in _pending(job)]
        where = f"on {len(client.scheduler_info()['workers'])} dask worker(s)" if client else "in-process"
        _log(f"precompute: {len(units)} shard(s) to compute for {len(plan.jobs)} attack(s) {where}")
        if client is None:
            _run_in_process(units, overlap=overlap)
        else:
            _run_on_dask(client, units)
    for job in plan.jobs:
        for path in job.stores:
            open_writer(path).finalize()
    return plan.paths


def _pending(job: _Job) -> list[int]:
    """Shards that some store of this attack still lacks (all stores share the shard plan)."""
    from enspipe.stores import open_writer

    writers = [open_writer(p) for p in job.stores]
    return sorted({s for w in writers for s in w.pending_shards()})


# --- Computing one shard ---------------------------------------------------------------------

def _batches(job: _Job, dataset, model: torch.nn.Module, start: int, stop: int, pixels: np.ndarray,
             device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(offset in shard, direction int8, logits float32, labels) per fixed batch of the shard."""
    import torch

    from enspipe import attacks

    for b in range(start, stop, job.batch_size):
        e = min(b + job.batch_size, stop)
        # The same conversion as SampleSource.images (uint8 / 255), from pixels read once per shard.
        x = torch.from_numpy(pixels[b - start:e - start]).to(torch.float32).div_(255).to(device)
        y = torch.from_numpy(dataset.labels[b:e]).to(device) if job.label == "true" else None
        d, logits, labels = attacks.direction(model, x, y, attack=job.attack, label=job.label)
        yield b - start, d, logits, labels


def _compute_shard(job: _Job, s: int, sink: "_ShardSink", device: torch.device) -> None:
    """Compute shard s of every store in job that lacks it and hand it to the sink."""
    from enspipe.stores import open_writer

    dataset, model, sha = _open_inputs(job.model, job.weights, job.pretrained, job.dataset, job.split,
                                       job.limit, job.data_root, device, job.image_size)
    if dataset.fingerprint != job.fingerprint or sha != job.weights_sha256:
        what = "dataset" if dataset.fingerprint != job.fingerprint else "model weights"
        raise EnspipeError(f"a worker sees other {what} than the client ({job.dataset} / {job.model}); "
                           "every worker needs the same files at the same paths")
    # Writers are reopened per shard (a manifest read): cheap, and never stale.
    writers = [w for w in (open_writer(p) for p in job.stores) if not w.shard_done(s)]
    if not writers:  # a retried or duplicated task whose shard is already written
        return
    start, stop = writers[0].shard_range(s)
    pixels = dataset.images_uint8(slice(start, stop))
    wants_images = any(w.fmt == "wds" for w in writers)  # wds keeps the clean image beside d
    sink.begin(s, start, stop, writers, keys=dataset.keys[start:stop],
               images=pixels if wants_images else None,
               true_label=dataset.labels[start:stop] if wants_images else None)
    for offset, d, logits, labels in _batches(job, dataset, model, start, stop, pixels, device):
        sink.add(offset, d, logits, labels)
    sink.end()


class _ShardSink:
    """Turns computed batches into numpy shard buffers and writes whole shards.

    With `background=True` a single thread does this while the caller computes the next
    batch; the queue is bounded, so at most about two shards are held in memory. The
    caller sees a writer error at its next call (or at `close`).
    """

    def __init__(self, *, background: bool, max_batches: int = 64) -> None:
        self._queue: queue.Queue | None = queue.Queue(maxsize=max_batches) if background else None
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._buf: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="enspipe-shard-writer", daemon=True)
            self._thread.start()

    # producer side
    def begin(self, s: int, start: int, stop: int, writers: Sequence[Any], **meta: Any) -> None:
        self._put(("begin", s, start, stop, list(writers), meta))

    def add(self, offset: int, d: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._put(("batch", offset, d, logits, labels))

    def end(self) -> None:
        self._put(("end",))

    def close(self) -> None:
        """Wait until everything handed over is written; re-raise a writer error."""
        if self._thread is not None:
            self._put(None)
            self._thread.join()
            self._thread = None
        self._raise()

    def abort(self) -> None:
        """Stop without writing what is still queued (the caller failed)."""
        self._abort.set()
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._thread.join(timeout=60)
            self._thread = None

    def __enter__(self) -> "_ShardSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _put(self, item: Any) -> None:
        self._raise()
        if self._queue is None:
            self._handle(item)
            return
        while True:  # poll so a dead writer thread cannot block the producer forever
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # consumer side
    def _loop(self) -> None:
        # Lower this thread's priority (Linux: per thread): the writer should fill the gaps in
        # the compute, not preempt torch's threads, whose parallel regions all wait for the
        # slowest one. If it falls behind, the bounded queue stalls the compute and it runs.
        # Measured on 2 cores: faster than both writing inline and an equal-priority thread.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        while True:
            item = self._queue.get()
            if item is None or self._abort.is_set():
                return
            if self._error is None:
                try:
                    self._handle(item)
                except BaseException as e:  # handed to the producer, which raises it
                    self._error = e

    def _handle(self, item: Any) -> None:
        kind = item[0]
        if kind == "begin":
            _, s, start, stop, writers, meta = item
            n = stop - start
            w = writers[0]
            self._buf = {"s": s, "writers": writers, "meta": meta, "n": n,
                         "direction": np.empty((n, *w.geometry), np.int8),
                         "logits": np.empty((n, w.num_classes), np.float16),
                         "label": np.empty((n,), np.int64)}
        elif kind == "batch":
            _, offset, d, logits, labels = item
            b = self._buf
            m = d.shape[0]
            b["direction"][offset:offset + m] = d.cpu().numpy()
            b["logits"][offset:offset + m] = logits.float().cpu().numpy()  # float32 -> float16, nearest
            b["label"][offset:offset + m] = labels.cpu().numpy()
        else:  # end: write the whole shard to every store that lacks it
            b, self._buf = self._buf, {}
            meta = b["meta"]
            for w in b["writers"]:
                wds = w.fmt == "wds"
                w.write_shard(b["s"], direction=b["direction"], logits=b["logits"], label=b["label"],
                              keys=meta["keys"], images=meta["images"] if wds else None,
                              true_label=meta["true_label"] if wds else None)


@contextlib.contextmanager
def _deterministic(threads: int | None = None) -> Iterator[None]:
    """Deterministic kernels (and a thread count) for the duration; restored afterwards."""
    import torch

    # cuBLAS needs this before its first use to be deterministic; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    fill = torch.utils.deterministic
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.get_num_threads(), fill.fill_uninitialized_memory)
    # warn_only: an op without a deterministic kernel warns instead of failing the store.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also NaN-fills every torch.empty (~10% of a CPU step, profiled);
    # that only guards against reading uninitialized memory, which no kernel here does.
    fill.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.set_num_threads(saved[3])
        fill.fill_uninitialized_memory = saved[4]


def _run_in_process(units: list[tuple[_Job, int]], *, overlap: bool) -> None:
    import torch

    from enspipe.runtime import progress

    with _deterministic(), _ShardSink(background=overlap) as sink:
        bar = progress(units, total=len(units), desc="precompute", unit="shard")
        for job, s in bar:
            _compute_shard(job, s, sink, torch.device(job.device))


def _shard_task(job: _Job, s: int) -> int:
    """One dask task: compute and write shard s, returning only once it is written."""
    from enspipe.runtime import resolve_device

    with _deterministic(job.torch_threads), _ShardSink(background=True) as sink:
        _compute_shard(job, s, sink, resolve_device(job.device))
    return s


# --- dask --------------------------------------------------------------------------------------

def _local_client(cfg: PrecomputeConfig, device: torch.device, stack: contextlib.ExitStack):
    """A client of a local cluster for --workers (closed by `stack`), or None for in-process.

    On a machine with several GPUs and `--device auto|cuda`, one worker per GPU is started even
    without --workers (DESIGN §3). That path cannot be exercised on the CPU-only test machine.
    """
    import torch

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    n = cfg.workers
    if n is None and gpus > 1:
        n = gpus
    if n is None:
        return None
    if gpus and n > gpus:
        raise ConfigError(f"--workers {n} asks for more GPU workers than the {gpus} GPU(s) here")
    return _local_cluster(n, gpus, stack)


def _quiet_dask() -> None:
    import dask

    # Workers of a LocalCluster log at WARNING when a peer dies or restarts: not the user's
    # concern while the task is rerun. Errors still surface as exceptions.
    dask.config.set({"distributed.logging.distributed": "error"})
    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker",
                 "distributed.core", "distributed.comm", "distributed.client"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _connect(address: str, stack: contextlib.ExitStack):
    from dask.distributed import Client

    _quiet_dask()
    try:
        client = Client(address, timeout=SCHEDULER_CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise ConfigError(f"cannot reach the dask scheduler at {address} within "
                          f"{SCHEDULER_CONNECT_TIMEOUT_S} s ({type(e).__name__}); is it running?") from None
    stack.callback(client.close)
    try:
        client.wait_for_workers(1, timeout=SCHEDULER_WORKERS_TIMEOUT_S)
    except (TimeoutError, OSError):
        raise ConfigError(f"the dask scheduler at {address} has no workers "
                          f"(waited {SCHEDULER_WORKERS_TIMEOUT_S} s)") from None
    return client


def _gpu_worker_specs(n: int, gpus: Sequence[str]) -> dict[int, dict[str, Any]]:
    """SpecCluster worker specs: worker i is a nanny whose process sees only GPU gpus[i % len]."""
    return {i: {"options": {"nthreads": 1, "host": "127.0.0.1", "silence_logs": logging.ERROR,
                            "env": {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}}} for i in range(n)}


def _local_cluster(n: int, gpus: int, stack: contextlib.ExitStack):
    """n single-threaded worker processes on loopback; with GPUs, one GPU per worker.

    The GPU branch cannot be exercised on the CPU-only test machine.
    """
    from dask.distributed import Client, LocalCluster

    _quiet_dask()
    # No dashboard; the scheduler's HTTP health endpoint still starts, on a free port, not 8787.
    scheduler_options = {"host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0"}
    if not gpus:
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, scheduler_kwargs=scheduler_options,
                               silence_logs=logging.ERROR)
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
        try:
            from dask_cuda import LocalCUDACluster  # rotates CUDA_VISIBLE_DEVICES, one worker per GPU

            cluster = LocalCUDACluster(n_workers=n, threads_per_worker=1, dashboard_address=None,
                                       scheduler_kwargs=scheduler_options, silence_logs=logging.ERROR)
        except ImportError:
            from distributed import Nanny, Scheduler, SpecCluster

            specs = _gpu_worker_specs(n, visible)
            for spec in specs.values():
                spec["cls"] = Nanny
            cluster = SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": scheduler_options},
                                  silence_logs=logging.ERROR)
    stack.enter_context(cluster)
    return stack.enter_context(Client(cluster, set_as_default=False))


def _torch_threads(client) -> int:
    """Intra-op threads per worker: the host's cores shared by its workers (no oversubscription)."""
    cores = client.run(os.cpu_count)  # {worker address: cores of its host}
    per_host: dict[str, list[int]] = {}
    for addr, c in cores.items():
        per_host.setdefault(addr.rsplit(":", 1)[0], []).append(int(c or 1))
    return max(1, min(cs[0] // len(cs) for cs in per_host.values()))


def _run_on_dask(client, units: list[tuple[_Job, int]]) -> None:
    from dask.distributed import as_completed
    from distributed.scheduler import KilledWorker

    from enspipe.runtime import progress

    threads = _torch_threads(client)
    jobs = {id(job): replace(job, torch_threads=threads) for job, _ in units}
    keys = [f"enspipe-shard-{job.attack}-{s}-{uuid.uuid4().hex[:8]}" for job, s in units]
    shard_of = {k: f"{job.attack} shard {s}" for k, (job, s) in zip(keys, units)}

    def on_event(event: tuple[float, Any]) -> None:
        """Say when a worker dies holding our shards (dask reruns them; the logs are silenced)."""
        msg = event[1]
        if isinstance(msg, dict) and msg.get("action") == "remove-worker" and not msg.get("expected"):
            lost = sorted(shard_of[k] for k in msg.get("processing-tasks", ()) if k in shard_of)
            if lost:
                _log(f"precompute: dask worker {msg.get('worker')} died while holding {', '.join(lost)}; "
                     "retrying them on the other workers")

    client.subscribe_topic("all", on_event)
    futures = client.map(_shard_task, [jobs[id(j)] for j, _ in units], [s for _, s in units],
                         key=keys, pure=False, retries=2)
    bar = progress(total=len(futures), desc="precompute", unit="shard")
    try:
        for fut in as_completed(futures, loop=client.loop):
            try:
                fut.result()
            except KilledWorker:
                raise EnspipeError("dask workers kept dying while computing a shard (out of memory?); "
                                   "the shards written so far are kept: re-run to finish") from None
            bar.update(1)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
        # Without this the scheduler keeps a handler on a client that is about to close,
        # and the close ends in a CommClosedError traceback on stderr.
        client.unsubscribe_topic("all")


# --- recompute_check -------------------------------------------------------------------------

def recompute_check(store: str | os.PathLike, *, k: int, model: str | None = None, data_root: str | None = None,
                    device: str = "auto", seed: int | None = None) -> list[str]:
    """Recompute k random samples' directions with the static model and compare with the store.

    The model is the one recorded in the manifest's `extra` unless `model` is given. Each
    sample is first recomputed in one small batch; a sample that differs is recomputed again
    inside its original batch (same boundaries as precompute), which must match bit for bit,
    since a different batch size may legitimately flip the sign of a near-zero gradient.
    Returns problem strings (empty = sound).
    """
    import torch

    from enspipe import attacks
    from enspipe.data import create_dataset
    from enspipe.models import resolve_model, weights_sha256
    from enspipe.runtime import resolve_device
    from enspipe.stores import open_store

    reader = open_store(store)
    ident, extra = reader.identity, reader.manifest.get("extra", {})
    recorded, config = extra.get("model", {}), extra.get("config", {})
    spec = model or recorded.get("spec")
    if not spec:
        raise ConfigError(f"store {store} records no model; pass --model")
    weights = None if model else recorded.get("weights")
    pretrained = False if model else bool(recorded.get("pretrained", False))
    if "dataset" not in config:
        raise StoreError(f"store {store} records no dataset configuration to recompute from")
    dataset = create_dataset(config["dataset"], split=config.get("split", ident.dataset["split"]),
                             limit=config.get("limit"), data_root=data_root or config.get("data_root"),
                             image_size=config.get("image_size"))
    if dataset.fingerprint != ident.dataset["fingerprint"]:
        return [f"the dataset {config['dataset']} found now has another fingerprint than the store's"]
    dev = resolve_device(device)
    net = resolve_model(spec, weights=weights, pretrained=pretrained, num_classes=dataset.num_classes,
                        input_size=dataset.geometry.shape)
    if weights_sha256(net) != ident.weights_sha256:
        return [f"model {spec} has other weights (sha256 {weights_sha256(net)[:12]}..) than the store's "
                f"({ident.weights_sha256[:12]}..)"]
    net = net.eval().requires_grad_(False).to(dev)
    label = config.get("label", "pred") if ident.attack == "fgsm" else "pred"
    batch_size = int(config.get("batch_size", 256))

    n = len(dataset)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))
    stored = reader.read_indices(idx)
    stored_keys = [reader.keys(int(i), int(i) + 1)[0] for i in idx]

    def run(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = dataset.images(indices).to(dev)
        y = torch.from_numpy(dataset.labels[indices]).to(dev) if label == "true" else None
        d, logits, labels = attacks.direction(net, x, y, attack=ident.attack, label=label)
        return d.cpu().numpy(), logits.float().cpu().numpy().astype(np.float16), labels.cpu().numpy()

    def matches(row: int, d: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> bool:
        return (np.array_equal(d, stored["direction"][row]) and int(labels) == int(stored["label"][row])
                and np.array_equal(logits, stored["logits"][row], equal_nan=True))

    def batch_of(i: int) -> tuple[int, int]:
        """precompute's batch holding sample i: batches start at their shard's first sample."""
        shard_start = i // reader.shard_size * reader.shard_size
        b = shard_start + (i - shard_start) // batch_size * batch_size
        return b, min(b + batch_size, shard_start + reader.shard_size, n)

    problems: list[str] = []
    batches: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    with _deterministic():
        quick = run(idx)
        for row, i in enumerate(idx.tolist()):
            if stored_keys[row] != dataset.keys[i]:
                problems.append(f"sample {i}: stored key {stored_keys[row]!r} is not the dataset's {dataset.keys[i]!r}")
                continue
            if matches(row, quick[0][row], quick[1][row], quick[2][row]):
                continue
            b, e = batch_of(i)
            if (b, e) not in batches:  # several suspects may share a batch: compute it once
                batches[b, e] = run(np.arange(b, e))
            d, logits, labels = (a[i - b] for a in batches[b, e])
            if matches(row, d, logits, labels):
                continue
            diff = int((d != stored["direction"][row]).sum())
            problems.append(f"sample {i} ({dataset.keys[i]}): recomputed direction differs in {diff} of "
                            f"{d.size} elements, label {int(labels)} vs stored {int(stored['label'][row])}")
    return problems
