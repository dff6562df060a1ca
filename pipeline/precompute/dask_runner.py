"""Running shard tasks on dask.distributed: a local cluster, an existing scheduler, one task per shard.

`workers=N` starts a local cluster of N single-threaded worker processes on loopback;
`scheduler=ADDR` uses an existing cluster (ROOT, the data and the model must then be at the
same paths on every worker). One task per shard via `client.map(..., pure=False,
retries=2)`; a worker that dies has its task rerun elsewhere by dask. Each worker process
loads the dataset and model once (module caches in `plan`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

from enspipe.errors import ConfigError, EnspipeError

from .compute import shard_task
from .config import PrecomputeConfig
from .plan import ShardJob, log

if TYPE_CHECKING:
    import torch

__all__ = ["connect", "local_client", "run_on_dask"]

SCHEDULER_CONNECT_TIMEOUT_S = 5     # an unreachable scheduler fails in seconds, not minutes
SCHEDULER_WORKERS_TIMEOUT_S = 60    # a reachable scheduler must have a worker within this


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


def run_on_dask(client, units: list[tuple[ShardJob, int]]) -> None:
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
                log(f"precompute: dask worker {msg.get('worker')} died while holding {', '.join(lost)}; "
                     "retrying them on the other workers")

    client.subscribe_topic("all", on_event)
    futures = client.map(shard_task, [jobs[id(j)] for j, _ in units], [s for _, s in units],
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
