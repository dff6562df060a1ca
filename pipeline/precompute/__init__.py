"""precompute: a static model's adversarial directions over a dataset, into perturbation stores.

    precompute(PrecomputeConfig(model="runs/B", dataset="mnist", attacks=("step_ll",), out="stores"))

Plan (DESIGN §2-3):
1. Open the dataset and the static model (eval mode, no parameter gradients); the store
   identity is (dataset identity incl. fingerprint, geometry, classes, model name, weights
   sha256, attack, label mode, precision). `stores.store_path` derives each store's path
   under ROOT from it, so a store that already exists complete is reused and nothing is written.
2. Create every store (all arrays, once) in this process, before any worker runs.
3. Cut the samples into shards (`shard_size` whole samples). A shard is the unit of work, of
   writing and of retry: a stream computes it (its pixels decoded ahead by loader processes,
   once for every attack that lacks the shard) and writes it with one `StoreWriter.write_shard`
   per store, which is atomic (files first, completion record last).
   Shards with a valid record are skipped, so a re-run after a crash or `kill -9` finishes the
   rest. Tasks are idempotent: a shard computed twice is written with identical bytes.
4. Finalize every store (manifest with all shard records, complete=true).

The rooms: `config` (PrecomputeConfig), `plan` (store identity, ShardJob, reuse / resume /
create), `compute` (the stream of shards: batches decoded by `enspipe.data.loader`'s worker
processes -> attack in fp32 or bf16 -> host copy; determinism),
`sink` (messages, the background writer of whole shards), `dask_runner` (local cluster,
existing scheduler, the same stream in each worker), `recheck` (`verify --recompute`).
`_open_inputs` and `_gpu_worker_specs` keep their names for the benchmarks and tests.

torch (and the attacks) are imported where they are used, so that a bad option is reported
before the second or two that importing torch takes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from enspipe.util._callable import callable_stage
from enspipe.config import OptionError
from enspipe.data.loader import ChunkLoader
from enspipe.precision import Precision
from enspipe.util.errors import ModelError

from .compute import (
    InputBatch,
    compute_shard,
    run_in_process,
    shard_task,
    stream_shards,
    stream_task,
)
from .config import ATTACKS, FORMATS, LABEL_MODES, PRECISIONS, WDS_IMAGES, PrecomputeConfig
from .dask_runner import _gpu_worker_specs as _gpu_worker_specs  # tests check the GPU worker specs
from .dask_runner import connect, local_client, run_on_dask
from .plan import (
    Plan,
    ShardJob,
    _open_inputs,
    absolute_if_path,
    check_root,
    create_root,
    log,
    manifest_extra,
    pending_shards,
    plan_stores,
    store_identity,
    store_locks,
    store_precision,
)
from .sink import BatchDone, CleanImages, ShardBegin, ShardEnd, ShardSink
from .recheck import recompute_check

__all__ = [
    "ATTACKS",
    "FORMATS",
    "LABEL_MODES",
    "PRECISIONS",
    "WDS_IMAGES",
    "BatchDone",
    "ChunkLoader",
    "CleanImages",
    "InputBatch",
    "Plan",
    "PrecomputeConfig",
    "ShardBegin",
    "ShardEnd",
    "ShardJob",
    "ShardSink",
    "compute_shard",
    "plan_stores",
    "precompute",
    "recompute_check",
    "shard_task",
    "store_identity",
    "store_precision",
    "stream_shards",
    "stream_task",
]


def precompute(cfg: PrecomputeConfig, *, overlap: bool = True) -> list[Path]:
    """Compute (or reuse) one store per (attack, format); return their paths in that order.

    `overlap=False` writes each shard in the computing thread (for benchmarks only).
    """
    from enspipe.data.decode import resolve_decoder
    from enspipe.util.runtime import resolve_device
    from enspipe.stores import create_store, open_writer

    from enspipe.models import HeadMismatch, is_model_path
    from enspipe.paths import check_outside_dataset, check_store_root

    device = resolve_device(cfg.device)
    if not cfg.scheduler:  # an existing cluster's workers choose their own device
        Precision.resolve(cfg.precision, device, strict=True)  # fails before any work
        resolve_decoder(cfg.decoder, device)  # nvjpeg without CUDA: likewise
    model_is_path = is_model_path(cfg.model, weights_given=cfg.weights is not None or cfg.pretrained)
    if cfg.weights is None and not cfg.pretrained and not model_is_path:
        # An architecture name alone would be a randomly initialised "static" model.
        raise OptionError("model", f"{cfg.model} is no run directory or checkpoint; an architecture name "
                          "needs `weights` CHECKPOINT or `pretrained`")
    check_root(cfg.out)
    check_store_root(cfg.out)
    check_outside_dataset(cfg.out, cfg.dataset)  # a store's folders would be classes of the dataset
    with contextlib.ExitStack() as stack:
        # An existing scheduler is reached first (it is cheap), so an unreachable one fails
        # in seconds; a local cluster is only started when there is work for it.
        client = connect(cfg.scheduler, stack) if cfg.scheduler else None
        try:
            dataset, model, sha = _open_inputs(absolute_if_path(cfg.model) if model_is_path else cfg.model,
                                               absolute_if_path(cfg.weights),
                                               cfg.pretrained, cfg.dataset, cfg.split, cfg.limit,
                                               absolute_if_path(cfg.data_root), device, cfg.image_size)
        except HeadMismatch as e:
            raise _head_mismatch(cfg, e) from None
        create_root(cfg.out)
        plan = plan_stores(cfg, dataset, model, sha, device)
        if not plan.jobs:
            return plan.paths
        # One writer per store: a second precompute of a store being written waits for the first,
        # then plans again (the store may be complete by then: reused, nothing computed twice).
        if stack.enter_context(store_locks([path for path, _, _ in plan.create])):
            plan = plan_stores(cfg, dataset, model, sha, device)
            if not plan.jobs:
                return plan.paths
        if client is None:
            client = local_client(cfg, device, stack)
        # Every store (all its arrays) is created here, before any task runs.
        for path, identity, fmt in plan.create:
            job = next(j for j in plan.jobs if str(path) in j.stores)
            create_store(path, identity, fmt=fmt, shard_size=cfg.shard_size,
                         extra=manifest_extra(cfg, job, device))
        # A stream decodes each shard once for all the attacks lacking it (it groups them by sample
        # range), and `task_groups` keeps a shard's attacks in one dask task: any order will do.
        units = [(job, s) for job in plan.jobs for s in pending_shards(job)]
        where = f"on {len(client.scheduler_info()['workers'])} dask worker(s)" if client else "in-process"
        log(f"precompute: {len(units)} shard(s) to compute for {len(plan.jobs)} attack(s) {where}")
        if client is None:
            run_in_process(units, overlap=overlap)
        else:
            run_on_dask(client, units)
        for job in plan.jobs:  # under the locks: a waiting precompute then finds the stores complete
            for path in job.stores:
                open_writer(path).finalize()
    return plan.paths


def _head_mismatch(cfg: PrecomputeConfig, e) -> ModelError:
    """The static model's head predicts other classes than the data has (ImageNet weights over a
    class subset): its stored labels and logits would be in another label space than the data's,
    which the trainer joins them with. What exists to do instead: fine-tune it first."""
    given = f"`weights` {cfg.weights}" if cfg.weights else "`pretrained`"
    return ModelError(
        f"{cfg.model} with {given} predicts {e.file_classes} classes but {cfg.dataset} has {e.model_classes}: "
        f"precompute stores a static model's directions, logits and labels in the data's classes, so it "
        f"needs a model with {e.model_classes} outputs. Fine-tune one first (`enspipe train` with `model` "
        f"{cfg.model}, {given}, `new_head` and `dataset` {cfg.dataset}) and precompute that run's folder")


callable_stage(__name__)  # `enspipe.precompute(cfg)` is precompute(cfg)
