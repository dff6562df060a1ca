"""Running shards on dask.distributed: a local cluster, an existing scheduler, tasks of a few shards.

`workers=N` starts a local cluster of N single-threaded worker processes on loopback;
`scheduler=ADDR` uses an existing cluster (ROOT, the data and the model must then be at the
same paths on every worker). A task is a run of consecutive shards that the worker streams
exactly as the in-process path does (`compute.stream_shards`: its own loader processes
decode ahead across the shards of the task, each shard once for all the attacks that lack
it: a task holds every attack's unit of its shards), so a worker computes at the in-process
rate once started; a task per shard would drain the pipeline between shards. Tasks go out via
`client.map(..., pure=False, retries=2)`; a worker that dies has its task rerun elsewhere by
dask, and the rerun skips the shards already written. Each worker process loads the dataset
and model once (module caches in `plan`) and forks its loader processes once (`compute`).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

from enspipe.util.errors import ConfigError, EnspipeError

from .compute import stream_task
from .config import PrecomputeConfig
from .plan import ShardJob, log

if TYPE_CHECKING:
    import torch

__all__ = ["connect", "describe", "local_client", "run_on_dask", "task_groups"]

SCHEDULER_CONNECT_TIMEOUT_S = 5     # an unreachable scheduler fails in seconds, not minutes
SCHEDULER_WORKERS_TIMEOUT_S = 60    # a reachable scheduler must have a worker within this
TASK_SHARDS = 16                    # at most this many shards per task: balance and retries stay fine-grained


def local_client(cfg: PrecomputeConfig, device: torch.device, stack: contextlib.ExitStack):
    """A client of a local cluster for --workers (closed by `stack`), or None for in-process.

    On a machine with several GPUs and `--device auto|cuda`, one worker per GPU is started even
    without --workers (DESIGN §3). That path cannot be exercised on the CPU-only test machine.
    """
    import torch

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    n = cfg.dask_workers
    if n is None and gpus > 1:
        n = gpus
    if n is None:
        return None
    if gpus and n > gpus:
        raise ConfigError(f"`dask_workers` {n} asks for more GPU workers than the {gpus} GPU(s) here")
    return _local_cluster(n, gpus, stack)


def _quiet_dask() -> None:
    import dask

    # Workers of a LocalCluster log at WARNING when a peer dies or restarts: not the user's
    # concern while the task is rerun. Errors still surface as exceptions.
    dask.config.set({"distributed.logging.distributed": "error"})
    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker",
                 "distributed.core", "distributed.comm", "distributed.client"):
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(address: str, stack: contextlib.ExitStack):
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

    import dask

    _quiet_dask()
    # Worker processes fork their loader processes; a daemonic process may not have children.
    # Set for the process (not a context): the nanny reads it again when it restarts a worker.
    dask.config.set({"distributed.worker.daemon": False})
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


def task_groups(units: list[tuple[ShardJob, int]], workers: int) -> list[tuple[tuple[ShardJob, int], ...]]:
    """The units in runs of one shard each (its attacks, whatever order `units` has them in), cut into
    tasks only between shards: a task decodes its shards once for all their attacks. At least one
    task per worker, at most TASK_SHARDS shards each, near-equal in shards."""
    by_shard = sorted(units, key=lambda unit: unit[1])  # stable: a shard's attacks keep their order
    runs = [list(run) for _, run in itertools.groupby(by_shard, key=lambda unit: unit[1])]
    n = max(1, min(len(runs), max(workers, math.ceil(len(runs) / TASK_SHARDS))))
    bounds = [round(k * len(runs) / n) for k in range(n + 1)]
    return [tuple(u for run in runs[a:b] for u in run) for a, b in zip(bounds, bounds[1:]) if b > a]


def describe(group: Sequence[tuple[ShardJob, int]]) -> str:
    """`step_ll shard 4-7, fgsm shard 0-3`: the shards of a task, per attack, as ranges."""
    parts: list[str] = []
    for attack in dict.fromkeys(job.attack for job, _ in group):
        shards = [s for job, s in group if job.attack == attack]
        runs: list[list[int]] = []
        for s in shards:
            if runs and s == runs[-1][1] + 1:
                runs[-1][1] = s
            else:
                runs.append([s, s])
        parts += [f"{attack} shard {a}" if a == b else f"{attack} shard {a}-{b}" for a, b in runs]
    return ", ".join(parts)


def run_on_dask(client, units: list[tuple[ShardJob, int]]) -> None:
    from dask.distributed import as_completed
    from distributed.scheduler import KilledWorker

    from enspipe.util.runtime import progress

    threads = _torch_threads(client)
    jobs = {id(job): replace(job, torch_threads=threads) for job, _ in units}
    units = [(jobs[id(job)], s) for job, s in units]
    groups = task_groups(units, len(client.scheduler_info()["workers"]))
    keys = [f"enspipe-shards-{g[0][0].attack}-{g[0][1]}-{uuid.uuid4().hex[:8]}" for g in groups]
    shards_of = {k: describe(g) for k, g in zip(keys, groups)}

    def on_event(event: tuple[float, Any]) -> None:
        """Say when a worker dies holding our shards (dask reruns them; the logs are silenced)."""
        msg = event[1]
        if isinstance(msg, dict) and msg.get("action") == "remove-worker" and not msg.get("expected"):
            lost = sorted(shards_of[k] for k in msg.get("processing-tasks", ()) if k in shards_of)
            if lost:
                log(f"precompute: dask worker {msg.get('worker')} died while holding {', '.join(lost)}; "
                     "retrying them on the other workers (shards already written are kept)")

    client.subscribe_topic("all", on_event)
    futures = client.map(stream_task, groups, key=keys, pure=False, retries=2)
    size = {f.key: len(g) for f, g in zip(futures, groups)}
    bar = progress(total=len(units), desc="precompute", unit="shard")
    try:
        for fut in as_completed(futures, loop=client.loop):
            try:
                fut.result()
            except KilledWorker:
                raise EnspipeError("dask workers kept dying while computing a shard (out of memory?); "
                                   "the shards written so far are kept: re-run to finish") from None
            bar.update(size[fut.key])
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
        # Without this the scheduler keeps a handler on a client that is about to close,
        # and the close ends in a CommClosedError traceback on stderr.
        client.unsubscribe_topic("all")
