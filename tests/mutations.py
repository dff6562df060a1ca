#!/usr/bin/env python
"""Mutation check: plant small real bugs, one at a time, in a scratch copy of the repository
and check that the tests named beside each one catch it ("killed").

    python tests/mutations.py                 # every mutation, one after another; exit 1 if any survives
    python tests/mutations.py --list          # the table, without running anything
    python tests/mutations.py label-leak ...  # only these mutations
    python tests/mutations.py --jobs 2        # two mutations at a time (on a quiet machine)

Each mutation is a file, an exact text that must occur once in it, its replacement, and the
tests that must fail once it is applied. The repository is copied (without .git and caches)
to a temporary folder per mutation and made importable as `enspipe` the way `.shim` does
(`.shim/enspipe -> ../pipeline`, PYTHONPATH=.shim), so the shared virtual environment's
editable install is never touched; pytest then runs only the mutation's tests there
(`-x`: the first failure is enough). A mutation is killed when pytest exits 1 (tests
failed); 0 means it survived; anything else (an unknown test, a crash) is an error. Before
the mutations, the union of their tests runs once on an unmutated copy: a test that fails
there would kill every mutation for nothing (`--no-baseline` skips that run).

MKL_CBWR is removed from the tests' environment so that they see enspipe's own setting.
OMP_NUM_THREADS defaults to 1 (other work shares the machine), except where a mutation's
tests need threads of their own (they set them).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str                 # the bug, in words
    file: str                # relative to the repository root
    old: str                 # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]   # pytest node ids (relative to the repository root) that must catch it


ORACLES = "tests/project/test_oracles.py"
INTEGRITY = "tests/stores/test_reader_integrity.py"
THROTTLE = "tests/stores/test_object_store_throttle.py"

MUTATIONS = [
    # --- The table of issue 18: bugs the suite did not catch before it ---
    Mutation("label-leak", "the training-time attack on the model itself uses the true label (label leaking)",
             "pipeline/train/batches.py",
             'd, _, _ = attacks.direction(precision.wrap(model), x[:n_adv], attack=cfg.attack, label="pred")',
             'd, _, _ = attacks.direction(precision.wrap(model), x[:n_adv], y[:n_adv], attack=cfg.attack, label="true")',
             (f"{ORACLES}::test_online_half_is_fgsm_on_the_models_own_prediction",)),
    Mutation("online-perturbation-zeroed", "the online perturbation is zero: `adv` mode is clean training",
             "pipeline/train/batches.py",
             'd, _, _ = attacks.direction(precision.wrap(model), x[:n_adv], attack=cfg.attack, label="pred")',
             "d = torch.zeros_like(x[:n_adv])",
             (f"{ORACLES}::test_online_half_is_fgsm_on_the_models_own_prediction",
              f"{ORACLES}::test_training_learns_and_adversarial_training_resists_fgsm")),
    Mutation("evaluate-counts-correct", "evaluate counts correct predictions as errors",
             "pipeline/evaluate.py",
             "self.top1 += int((logits.argmax(1) != y).sum())",
             "self.top1 += int((logits.argmax(1) == y).sum())",
             (f"{ORACLES}::test_evaluate_counts_equal_a_closed_form_fgsm",
              "tests/cli/test_cli_e2e.py::test_evaluate_top5_binarized_and_ensemble_source")),
    Mutation("evaluate-drops-last-batch", "the loader's batches leave out the last partial batch (evaluate counts fewer samples)",
             "pipeline/data/loader.py",
             "        spans = batch_spans(0, len(data), batch_size)\n",
             "        spans = batch_spans(0, len(data) - len(data) % batch_size, batch_size)\n",
             ("tests/evaluate/test_evaluate_loader.py::test_errors_equal_a_plain_loop_over_pil_images_with_any_worker_count",
              "tests/data/test_loader.py::test_batches_are_the_pil_images_in_order_whatever_the_workers",
              "tests/diagnostics/test_diagnose_loader.py::test_diagnose_measures_the_pil_images_and_labels")),
    Mutation("loader-chunks-out-of-order", "a batch's chunks from several loader workers come back in another order "
             "than its labels (images paired with other samples' labels)",
             "pipeline/data/loader.py",
             "for b, e in batches for a in range(b, e, chunk)]",
             "for b, e in batches for a in reversed(range(b, e, chunk))]",
             ("tests/evaluate/test_evaluate_loader.py::test_errors_equal_a_plain_loop_over_pil_images_with_any_worker_count",)),
    Mutation("validation-forks-every-epoch", "the trainer's validation opens a new loader (new worker processes) at every call",
             "pipeline/train/kit.py",
             "    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:\n",
             "    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:\n"
             "        self._loader = type(self._loader)(self.data, self._loader.workers, pin=self._loader.pin,\n"
             "                                          encoded=self._loader.encoded)\n",
             ("tests/train/test_validation_loader.py::test_validation_counts_a_plain_loop_and_forks_its_workers_once",)),
    Mutation("wilson-z-1", "the Wilson interval with z = 1 (a 68% interval labelled 95%)",
             "pipeline/report/stats.py",
             "def wilson_interval(errors: int, n: int, z: float = Z95)",
             "def wilson_interval(errors: int, n: int, z: float = 1.0)",
             (f"{ORACLES}::test_wilson_interval_known_values",)),
    Mutation("truncnorm-ignored", "--eps-dist truncnorm ignored (a constant eps)",
             "pipeline/train/batches.py",
             "_draw_eps(rng, n_adv, self.cfg.eps, self.cfg.eps_dist)",
             '_draw_eps(rng, n_adv, self.cfg.eps, "fixed")',
             (f"{ORACLES}::test_eps_truncnorm_follows_its_distribution",)),
    Mutation("wds-reader-skips-sha256", "the WebDataset reader skips its sha256 check",
             "pipeline/stores/wds/store.py",
             '        if digest.hexdigest() != want:',
             "        if False:",
             (f"{INTEGRITY}::test_a_flipped_byte_in_any_wds_member_is_an_error_from_read",)),
    Mutation("training-ascends-the-loss", "training ascends the loss",
             "pipeline/train/__init__.py",
             "                scaler.scale(loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()",
             "                scaler.scale(-(loss / cfg.grad_accum if cfg.grad_accum > 1 else loss)).backward()",
             (f"{ORACLES}::test_training_learns_and_adversarial_training_resists_fgsm",)),
    # --- The table of issue 18: bugs the suite already caught ---
    Mutation("step-ll-sign-flipped", "Step-LL climbs towards the least-likely class's loss (sign flipped)",
             "pipeline/attacks.py",
             '    return d.neg_() if target == "ll" else d\n',
             "    return d\n",
             ("tests/attacks/test_attacks.py::test_step_ll_equals_its_closed_form",)),
    Mutation("no-clip", "x_adv not clipped to [0, 1]",
             "pipeline/attacks.py",
             "return (x + eps * d.to(x.dtype)).clamp_(0.0, 1.0)",
             "return x + eps * d.to(x.dtype)",
             ("tests/attacks/test_attacks.py::test_every_attack_respects_the_eps_ball_and_the_pixel_range",)),
    Mutation("ens-adv-static-only", "ens-adv draws only static sources, never the model itself",
             "pipeline/stream.py",
             "sources=([SELF] if include_self else []) + [k + 1 for k in range(len(stores))], **kw)",
             "sources=[k + 1 for k in range(len(stores))], **kw)",
             ("tests/train/test_train.py::test_ens_adv_draws_sources_uniformly",)),
    Mutation("ranks-overlap", "every DDP rank reads the same blocks",
             "pipeline/sampling.py",
             "mine = perm[rank::world_size]",
             "mine = perm[::world_size]",
             ("tests/stream/test_sampling.py::test_block_order",)),
    Mutation("optimizer-state-not-restored", "--resume does not restore the optimizer state",
             "pipeline/train/__init__.py",
             '        optimizer.load_state_dict(state["optimizer"])\n',
             "        pass  # the optimizer starts afresh\n",
             ("tests/train/test_train.py::test_killed_run_resumes_to_the_same_weights",)),
    Mutation("complete-before-every-shard", "finalize marks a store complete with shards missing",
             "pipeline/stores/base.py",
             "        if missing:\n",
             "        if False:\n",
             ("tests/stores/test_stores.py::test_incomplete_store_refused",)),
    Mutation("verify-skips-deep-checksum", "verify skips its deep checksum",
             "pipeline/stores/manifest.py",
             'elif sha256_ok is not None and not sha256_ok(rel, meta["sha256"]):',
             "elif False:",
             ("tests/stores/test_stores.py::test_verify_finds_damaged_shards",)),
    # --- Bugs fixed in the session of issue 18 ---
    Mutation("batchnorm-0dim-hash", "weights_sha256 views a 0-dim tensor (BatchNorm's counter) as bytes",
             "pipeline/models/checkpoints.py",
             "t.reshape(-1).view(torch.uint8)",
             "t.view(torch.uint8)",
             ("tests/project/test_regressions.py::test_batchnorm_models_hash_every_tensor",)),
    Mutation("train-ignores-stores-attack", "train uses FGSM whatever attack its stores hold",
             "pipeline/train/__init__.py",
             'return attack or (kinds[0] if kinds else "fgsm")',
             'return attack or "fgsm"',
             ("tests/cli/test_every_model.py::test_stores_of_two_attacks_and_a_conflicting_attack_are_refused",)),
    Mutation("mkl-strict-mode-removed", "MKL's strict reproducibility mode is not set (results depend on threads)",
             "pipeline/__init__.py",
             '_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")',
             "pass",
             ("tests/project/test_regressions.py::test_matrix_products_do_not_depend_on_the_thread_count",)),
    Mutation("mnist-missing-skips", "the MNIST fixture skips when the files are missing (CI green without its data)",
             "tests/conftest.py",
             '    if os.environ.get("ENSPIPE_TEST_MNIST") == "skip":\n',
             "    if True:\n",
             ("tests/project/test_suite_setup.py::test_a_missing_mnist_fails_unless_skipping_is_asked_for",)),
    # --- Readers verify what they read (issue 18) and bind shards to samples (issue 12, item 10) ---
    Mutation("zarr-reader-skips-checksum", "the zarr reader decodes shard files without checking their sha256",
             "pipeline/stores/zarr_store.py",
             'ok = p.stat().st_size == meta["bytes"] and sha256_matches(p, meta["sha256"], trust_checked=True)',
             "ok = True",
             (f"{INTEGRITY}::test_a_flipped_byte_in_any_zarr_shard_file_is_an_error_from_read",)),
    Mutation("verify-trusts-memory", "verify answers from the process's memory of earlier checks",
             "pipeline/stores/manifest.py",
             "    if trust_checked and _verified_key(path, st, sha256) in _VERIFIED:",
             "    if _verified_key(path, st, sha256) in _VERIFIED:",
             (f"{INTEGRITY}::test_verify_always_hashes_and_readers_reuse_its_checks",)),
    Mutation("reader-rehashes-every-read", "the zarr reader hashes a shard file on every read (a slow hot path)",
             "pipeline/stores/zarr_store.py",
             'sha256_matches(p, meta["sha256"], trust_checked=True)',
             'sha256_matches(p, meta["sha256"])',
             (f"{INTEGRITY}::test_zarr_reader_hashes_each_shard_file_once_per_version",)),
    Mutation("zarr-keys-file-unchecked", "the zarr reader parses a keys file without checking its sha256",
             "pipeline/stores/zarr_store.py",
             "if raw is not None and sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:",
             "if False:",
             (f"{INTEGRITY}::test_a_flipped_byte_in_any_zarr_shard_file_is_an_error_from_read",)),
    Mutation("check-keys-compares-nothing", "check_keys accepts any keys",
             "pipeline/stores/base.py",
             "            if got != want:\n",
             "            if False:\n",
             (f"{INTEGRITY}::test_check_keys_names_the_shard_of_other_samples",)),
    Mutation("trainer-skips-keys", "the trainer's store check does not compare the stores' keys with the data",
             "pipeline/stores/verify.py",
             "        reader.check_keys(0, len(dataset), dataset.keys)  # type: ignore[attr-defined, arg-type]\n        return\n",
             "        return\n",
             (f"{INTEGRITY}::test_a_zarr_shard_copied_over_another_is_refused_when_read_for_training",)),
    # --- Issue 27's blind spot: training under torchrun without gradient synchronisation ---
    Mutation("ddp-unwrapped", "under torchrun the model is not wrapped in DistributedDataParallel: the ranks never "
             "synchronise their gradients",
             "pipeline/train/__init__.py",
             "net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == \"cuda\" else None)",
             "net = model",
             ("tests/train/test_ddp.py::test_two_gloo_ranks_train_the_same_weights_as_one_process_on_the_global_batches",)),
    Mutation("store-reopened-per-worker", "the stream reopens every store by path in every loader worker",
             "pipeline/stream.py",
             "        return [open_store(p) if h is None else h.for_this_process() for p, h in zip(self.stores, self._handles)]\n",
             "        return [open_store(p) for p in self.stores]\n",
             ("tests/stores/test_store_formats.py::test_a_training_run_reads_each_store_manifest_once",)),
    Mutation("remote-download-unhashed", "a shard object downloaded from object storage is kept without its sha256 check",
             "pipeline/stores/remote_cache.py",
             '                ok = len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"]\n',
             '                ok = len(data) == meta["bytes"]\n',
             ("tests/stores/test_object_store.py::test_a_corrupted_object_is_refused_on_read_and_named_by_verify",
              "tests/stores/test_remote_start_check.py::"
              "test_a_byte_flipped_after_the_check_stops_the_read_naming_the_object_and_feeds_nothing_wrong",
              f"{THROTTLE}::test_a_shard_get_cut_off_mid_body_is_fetched_again_and_a_short_body_is_refused")),
    Mutation("remote-cache-unbounded", "the object-store cache never evicts",
             "pipeline/stores/remote_cache.py",
             "        total = sum(size for _, size, _ in files)\n",
             "        total = sum(size for _, size, _ in files)\n        return\n",
             ("tests/stores/test_object_store.py::test_a_second_epoch_reads_from_the_cache_and_the_cache_keeps_its_cap",)),
    Mutation("mnist-net-left-in-eval", "create_model hands the MNIST layers back in eval mode (dropout off in a plain loop)",
             "pipeline/models/mnist.py",
             "    probe.train()\n",
             "    pass\n",
             ("tests/project/test_readme.py::test_a_created_model_is_in_train_mode",)),
    Mutation("empty-class-silent", "an empty class folder silently becomes an extra class",
             "pipeline/data/imagefolder.py",
             "        _check_empty_classes(self.classes, per_class, folder, split_dirs)\n",
             "        pass\n",
             ("tests/cli/test_newcomer_mistakes.py::test_an_empty_class_folder_is_refused_not_a_silent_class",)),
    Mutation("two-writers-one-store", "a second precompute of a store being written does not wait for it",
             "pipeline/util/fileio.py",
             "                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))\n",
             "                pass\n",
             ("tests/cli/test_newcomer_mistakes.py::test_a_second_precompute_waits_for_the_store_being_written",)),
    Mutation("remote-cache-unlocked", "the object-store cache evicts without waiting for readers in other processes",
             "pipeline/stores/remote_cache.py",
             "            fcntl.flock(fd, kind)\n",
             "            pass\n",
             ("tests/stores/test_object_store_cache_lock.py::test_a_reader_in_another_process_keeps_its_shard_until_it_is_done",
              "tests/stores/test_object_store.py::test_loader_workers_share_a_cache_smaller_than_the_store_and_read_every_direction")),
    Mutation("remote-cache-reader-unlocked", "a read of cached shard files (the fast path) holds no lock: another process's eviction removes them under it",
             "pipeline/stores/remote_cache.py",
             "                fcntl.flock(here.fd, fcntl.LOCK_SH)\n",
             "                pass\n",
             ("tests/stores/test_object_store_cache_lock.py::test_a_reader_in_another_process_keeps_its_shard_until_it_is_done",)),
    Mutation("decoder-not-in-identity", "a store made by the device decoder (nvJPEG) gets the PIL path's store key",
             "pipeline/precompute/plan.py",
             "    params.update(decoder_params(decoder))\n",
             "    pass\n",
             ("tests/data/test_device_decode.py::test_decoder_resolution_and_the_store_identity",
              "tests/data/test_device_decode.py::test_precompute_through_the_device_path_end_to_end")),
    Mutation("device-crop-off-centre", "the device decode's centre crop is one row off",
             "pipeline/data/decode.py",
             "            img = TF.center_crop(img, [self.crop, self.crop])\n",
             "            img = TF.crop(img, (img.shape[1] - self.crop) // 2 + 1, (img.shape[2] - self.crop) // 2, "
             "self.crop, self.crop)\n",
             ("tests/data/test_device_decode.py::test_the_device_path_on_cpu_matches_pil_on_imagefolder",)),
    Mutation("wds-images-read-twice", "the PIL path decodes each image from its file opened again, beside the "
             "read whose bytes a wds store keeps (the stores' bytes stay the same: only the open counter sees it)",
             "pipeline/data/loader.py",
             "        return self.dataset.pixels_of(i, data)\n",
             "        return self.dataset._load(i)\n",
             ("tests/precompute/test_precompute_reads_once.py::test_each_image_file_is_read_once",)),
    Mutation("loader-carries-files-unasked", "every device-path loader's chunks carry the samples' files, "
             "which the process that drives the device rebuilds and holds (evaluate, validation, diagnose)",
             "pipeline/data/decode.py",
             "    return EncodedChunk(items, indices, files=kept if files else None)\n",
             "    return EncodedChunk(items, indices, files=kept)\n",
             ("tests/data/test_loader.py::test_only_a_loader_asked_for_files_carries_them",)),
    Mutation("sink-bytes-ignore-files", "the sink's queue limit counts a batch's tensors but not the source files "
             "riding with it (a wds store's JPEGs pile up unbounded behind a slow writer)",
             "pipeline/precompute/sink.py",
             "            + (0 if files_counted else sum(len(data) for _, data in msg.files or ())))\n",
             ")\n",
             ("tests/precompute/test_sink.py::test_a_slow_writer_stalls_the_producer_once_the_queued_bytes_pass_the_limit",)),
    Mutation("sink-shared-files-per-attack", "the sink's queue counts the source files once per attack: the K "
             "attacks' batches of one decoded batch share one list of files, so the bound stalls the compute K times early",
             "pipeline/precompute/sink.py",
             "files_counted=files is not None and files is self._last_files)",
             "files_counted=False)",
             ("tests/precompute/test_sink.py::test_files_shared_by_the_attacks_batches_count_once",)),
    Mutation("device-batch-channels-last", "a batch of the PIL path's pixels carried as files reaches the model in "
             "the channels-last strides of the stacked arrays (other kernels: a 2-worker store differs from the serial one)",
             "pipeline/data/decode.py",
             "        return rows.contiguous()\n",
             "        return rows\n",
             ("tests/precompute/test_precompute_parallel.py::test_parallel_decode_gives_the_serial_store",)),
    Mutation("pickled-jpeg-file-lost", "a JPEG's file carried through a loader worker (pickled) is rebuilt empty: "
             "a wds store written with loader workers on the device path keeps empty images",
             "pipeline/data/decode.py",
             "(items[k] if span is None else data[span[0]:span[0] + span[1]]).numpy().tobytes()",
             "(items[k][:0] if span is None else data[span[0]:span[0] + span[1]]).numpy().tobytes()",
             ("tests/precompute/test_precompute_reads_once.py::test_each_image_file_is_read_once",
              "tests/data/test_loader.py::test_only_a_loader_asked_for_files_carries_them")),
    Mutation("loader-forks-for-memory", "a source held in memory gets loader worker processes (precompute forked "
             "loader_workers to slice MNIST)",
             "pipeline/data/loader.py",
             "    if not decodes:\n        workers = 0\n    elif workers is None:\n",
             "    if workers is None:\n",
             ("tests/precompute/test_precompute_loader.py::test_an_in_memory_source_forks_no_loader_workers",)),
    Mutation("worker-loader-flag-requested", "a dask worker's kept loader is judged by what was asked of it, not by "
             "whether its chunks carry files: a loader that carries them is forked again",
             "pipeline/precompute/compute.py",
             "(files and not _WORKER_LOADER[key].files)",
             "(files and not False)",
             ("tests/precompute/test_precompute_loader.py::test_a_dask_workers_loader_is_kept_until_a_task_needs_files_it_does_not_carry",)),
    Mutation("precompute-decodes-per-attack", "with several attacks a shard is decoded once per attack (the "
             "jobs lacking a shard are grouped per attack, not per sample range; the stores stay the same)",
             "pipeline/precompute/compute.py",
             "groups.setdefault((*writers[0].shard_range(s), job.batch_size), [])",
             "groups.setdefault((*writers[0].shard_range(s), job.batch_size, job.attack), [])",
             ("tests/precompute/test_precompute_decodes_once.py::test_two_attacks_decode_each_image_once_into_the_one_attack_stores",
              "tests/precompute/test_precompute_decodes_once.py::test_the_device_path_decodes_each_batch_once_for_both_attacks",
              "tests/precompute/test_precompute_reads_once.py::test_two_attacks_read_each_file_once")),
    Mutation("attack-batches-one-part", "every attack's batches of a shard go to the first attack's open shard in "
             "the sink (the attacks' buffers mixed: one store gets the other's directions, the other garbage)",
             "pipeline/precompute/compute.py",
             "kept if m[4] else None, k) for k, m in enumerate(members)]",
             "kept if m[4] else None, 0) for k, m in enumerate(members)]",
             ("tests/precompute/test_precompute_decodes_once.py::test_two_attacks_decode_each_image_once_into_the_one_attack_stores",)),
    Mutation("shared-forward-one-label", "the attacks sharing a forward pass all take the first attack's labels "
             "(FGSM descends towards Step-LL's least-likely class)",
             "pipeline/attacks.py",
             "    for k, target in enumerate(targets):\n        labels = held.",
             "    for k, target in enumerate([targets[0]] * len(targets)):\n        labels = held.",
             ("tests/precompute/test_precompute_decodes_once.py::test_directions_share_a_forward_and_equal_one_direction_per_attack",
              "tests/precompute/test_precompute_decodes_once.py::test_two_attacks_decode_each_image_once_into_the_one_attack_stores")),
    Mutation("shared-forward-no-autocast", "the attacks sharing a forward pass run it in full precision "
             "whatever the store's precision (a bf16 store of two attacks differs from two one-attack ones)",
             "pipeline/attacks.py",
             "    with _attack_mode(x, autocast):\n        return [(_signed(grad, target)",
             "    with _attack_mode(x, None):\n        return [(_signed(grad, target)",
             ("tests/precompute/test_precompute_decodes_once.py::test_directions_share_a_forward_and_equal_one_direction_per_attack",)),
    Mutation("units-by-attack", "dask tasks are cut in the units' order as handed, attack by attack: a task holds "
             "one attack's shards, so each worker decodes a shard once per attack",
             "pipeline/precompute/dask_runner.py",
             "    by_shard = sorted(units, key=lambda unit: unit[1])",
             "    by_shard = list(units)",
             ("tests/precompute/test_precompute_decodes_once.py::test_dask_tasks_hold_every_attack_of_their_shards",
              "tests/precompute/test_precompute_decodes_once.py::test_two_attacks_decode_each_image_once_into_the_one_attack_stores"
              "[2 dask workers]")),
    Mutation("task-splits-a-shard", "dask tasks are cut anywhere in the units: one shard's attacks land in two "
             "tasks (two workers decode it)",
             "pipeline/precompute/dask_runner.py",
             "    runs = [list(run) for _, run in itertools.groupby(by_shard, key=lambda unit: unit[1])]\n",
             "    runs = [[unit] for unit in by_shard]\n",
             ("tests/precompute/test_precompute_decodes_once.py::test_dask_tasks_hold_every_attack_of_their_shards",
              "tests/precompute/test_precompute_decodes_once.py::test_two_attacks_decode_each_image_once_into_the_one_attack_stores"
              "[2 dask workers]")),
    Mutation("pickled-pixels-through-pipe", "a loader worker's PIL-path pixels (and the files beside them) go "
             "through the worker's pipe, pickled, not through shared memory",
             "pipeline/data/decode.py",
             "        shared = [k for k, it in enumerate(self.items) if _encoded(it) or it.dtype == np.uint8]\n",
             "        shared = [k for k, it in enumerate(self.items) if _encoded(it)]\n",
             ("tests/data/test_loader.py::test_a_pickled_chunk_sends_its_jpegs_pixels_and_files_through_shared_memory",)),
    Mutation("stored-step-ignores-label", "an attack without a function of its own attacks the predicted label "
             "whatever label it is given",
             "pipeline/attacks.py",
             "        d, _, _ = _direction(rec, model, x, y, label, None)\n",
             "        d, _, _ = _direction(rec, model, x, y, \"pred\", None)\n",
             ("tests/attacks/test_attacks.py::test_a_stored_step_is_its_direction_applied",)),
    Mutation("stored-step-prepares-twice", "an attack without a function of its own checks and copies x a second "
             "time to apply its direction",
             "pipeline/attacks.py",
             "        x_adv = apply_direction(x.detach(), d, eps)\n",
             "        x_adv = apply_direction(_prepare(x, None, \"ll\")[0], d, eps)\n",
             ("tests/attacks/test_stored_step_prepares_once.py::test_a_stored_step_prepares_x_once",)),
    Mutation("device-step-skips-augment", "the trainer's device decode drops the batch's crops and flips",
             "pipeline/train/device_batches.py",
             "    return augment_on_device(decode_batch([x], x.transform, x.shape, device), aug, crop_padding)\n",
             "    return decode_batch([x], x.transform, x.shape, device)\n",
             ("tests/train/test_device_decode_train.py::test_the_step_decodes_the_streams_batches_as_pil_would",)),
    Mutation("run-records-auto", "config.json records the decoder option (auto), not what it resolved to",
             "pipeline/train/__init__.py",
             '"device": str(device), "decoder": decoder, "decoders": decoders,',
             '"device": str(device), "decoder": cfg.decoder, "decoders": decoders,',
             ("tests/train/test_train_decoder_record.py::test_a_run_records_its_resolved_decoder",
              "tests/train/test_device_decode_train.py::test_train_with_the_device_decoder_runs_and_records_it")),
    Mutation("resume-compares-the-option", "a resume compares the decoder option, not the resolved decoders: auto "
             "switches nvjpeg and PIL silently on another kind of device",
             "pipeline/train/__init__.py",
             "    was = recorded[-1][\"decoder\"]\n    if decoder == was:\n",
             "    was = recorded[-1][\"decoder\"]\n    if cfg.decoder == \"auto\" or decoder == was:\n",
             ("tests/train/test_train_decoder_record.py::test_auto_switching_the_decoder_on_resume_is_refused_and_a_named_one_continues",)),
    Mutation("old-run-decoder-guessed", "a run saved before the decoder record is taken as decoded by the option's "
             "name on this device (an old CUDA run resumed on a CPU switches silently)",
             "pipeline/train/__init__.py",
             "        was = device_decoder(option, saved.get(\"device\", \"cpu\"), dataset)\n",
             "        was = device_decoder(option, \"cpu\", dataset)\n",
             ("tests/train/test_train_decoder_record.py::test_a_run_saved_before_the_record_resumes_as_it_was_decoded",)),
    Mutation("store-decoder-not-compared", "a store's decoder is read as the PIL path's whatever made it",
             "pipeline/data/decode.py",
             '    return str(attack_params.get("decoder", "cpu"))\n',
             '    return "cpu"\n',
             ("tests/train/test_train_decoder_record.py::test_a_store_of_another_decoder_is_one_informative_line",)),
    Mutation("step-decode-names-wrong-file", "a JPEG that fails in the training step is named by its neighbour's file",
             "pipeline/data/decode.py",
             '    return DataError(f"{describe(e.index, e.reason)} (sample {e.index})")\n',
             '    return DataError(f"{describe(e.index - 1, e.reason)} (sample {e.index})")\n',
             ("tests/train/test_train_decoder_record.py::test_a_jpeg_that_fails_in_the_step_is_named_by_file_and_sample",)),
    Mutation("device-size-group-misplaced", "a group of same-size images is written at its places among the JPEGs, "
             "not among the batch's rows (a batch with PIL-path pixels gets them shifted)",
             "pipeline/data/decode.py",
             "            places.extend(jpeg[k] for k in ks)\n",
             "            places.extend(ks)\n",
             ("tests/data/test_device_decode_batching.py::test_a_batch_of_repeated_sizes_is_each_image_decoded_alone_at_its_place",)),
    Mutation("device-augment-flip-shifted", "the batch-wide flip reads one column too far (w - cols, not w - 1 - cols)",
             "pipeline/data/decode.py",
             "    cols = torch.where(flip[:, None] != 0, w - 1 - cols, cols) + dx[:, None]",
             "    cols = torch.where(flip[:, None] != 0, w - cols, cols).clamp(max=w - 1) + dx[:, None]",
             ("tests/data/test_device_decode_batching.py::test_the_batch_augment_is_the_streams_at_every_edge",
              "tests/train/test_device_decode_train.py::test_augment_on_device_is_the_streams_augment")),
    Mutation("chunk-pickled-as-bytes", "a loader worker's chunk of JPEGs goes through its pipe as bytes (~25 MB a "
             "batch that the training process reads and copies), not as one shared-memory tensor",
             "pipeline/data/decode.py",
             "        if not parts:\n            return EncodedChunk, ",
             "        if True:\n            return EncodedChunk, ",
             ("tests/data/test_device_decode_batching.py::test_a_chunk_crosses_from_a_loader_worker_as_one_shared_tensor",)),
    Mutation("chunk-unpacked-at-one-offset", "a chunk's JPEGs are unpacked from the shared tensor all at its start",
             "pipeline/data/decode.py",
             "        items[k] = data[at:at + n] if pixels is None else",
             "        items[k] = data[0:n] if pixels is None else",
             ("tests/data/test_device_decode_batching.py::test_a_chunk_crosses_from_a_loader_worker_as_one_shared_tensor",
              "tests/data/test_device_decode.py::test_the_encoded_loader_feeds_the_same_batches_through_worker_processes")),
    Mutation("device-pixels-misplaced", "the PIL-path pixels of a device batch go over in one copy but land at "
             "each other's places", "pipeline/data/decode.py",
             "        places.extend(pixels)\n",
             "        places.extend(pixels[::-1])\n",
             ("tests/data/test_device_decode_batching.py::test_a_batch_of_repeated_sizes_is_each_image_decoded_alone_at_its_place",)),
    # --- The decode review (engineer fdecode): evaluate's decoder, the batch's copies, resume, validation ---
    Mutation("evaluate-decoder-auto", "evaluate's decoder defaults to auto: on CUDA it decodes with nvJPEG under the "
             "job key its PIL results were cached with", "pipeline/configs/evaluate.py",
             'errors.", default="cpu")', 'errors.")',
             ("tests/evaluate/test_evaluate_decoder.py::test_evaluate_decodes_with_pil_on_cuda_unless_asked",)),
    Mutation("evaluate-store-decoder-silent", "evaluate applies a store of another decoder's pixels without a word",
             "pipeline/evaluate.py",
             "        _log.warning(line)\n", "        pass\n",
             ("tests/evaluate/test_evaluate_decoder.py::test_a_store_of_another_decoder_is_one_line",)),
    Mutation("device-batch-index-pageable", "the rows of a device batch are put in place by an index made on the "
             "device from a Python list (a pageable copy: the training step waits for the GPU)", "pipeline/data/decode.py",
             "    return out.index_copy_(0, _to_device(torch.tensor(places, dtype=torch.long), device), rows)\n",
             "    out[torch.tensor(places, device=device)] = rows\n    return out\n",
             ("tests/data/test_device_decode_copies.py::test_a_mixed_batch_is_put_in_place_by_one_index_sent_like_the_pixels",)),
    Mutation("evaluate-cpu-workers-compete", "evaluate on a CPU device forks cores - 1 decoders beside the models' "
             "threads", "pipeline/evaluate.py",
             '    return default_workers(data, spare=1) if device.type == "cuda" else 0\n',
             '    return default_workers(data, spare=1)\n',
             ("tests/evaluate/test_evaluate_decoder.py::test_evaluate_decodes_in_its_own_process_on_a_cpu_device",)),
    Mutation("resume-decoder-dead-record", "a resume compares its decoder with a record of an epoch that died before "
             "its checkpoint", "pipeline/train/__init__.py",
             '    return [d for d in recorded if d["from_epoch"] <= last]\n', '    return recorded\n',
             ("tests/train/test_train_decoder_record.py::test_a_decoder_recorded_for_an_epoch_that_died_does_not_count_on_resume",)),
    Mutation("validation-option-decoder", "validation resolves the decoder option again instead of the run's recorded "
             "decoder", "pipeline/train/__init__.py",
             "                            decoder=r.decoder) if r.val is not None and rank == 0 else None\n",
             "                            decoder=cfg.decoder) if r.val is not None and rank == 0 else None\n",
             ("tests/train/test_validation_loader.py::test_a_run_validates_with_its_recorded_decoder",)),
    Mutation("validation-loader-not-opened", "a run's validation opens no loader when made (its images decoded in the "
             "training process)", "pipeline/train/kit.py",
             "        self._loader: Any = open_loader(data, device, workers=workers, decoder=decoder)\n",
             "        self._loader: Any = None\n",
             ("tests/train/test_validation_loader.py::test_validation_counts_a_plain_loop_and_forks_its_workers_once",)),
    Mutation("device-batch-undecodable-unnamed", "a JPEG that fails in precompute's / evaluate's device batch is "
             "named by its sample index only, not its file", "pipeline/data/loader.py",
             "        raise named(dataset, e) from None\n", "        raise\n",
             ("tests/data/test_device_decode.py::test_a_jpeg_that_does_not_decode_is_named_in_one_line",)),
    # --- A store URL at train start: checks without shard bytes, one owner of the record checks ---
    Mutation("start-check-downloads-store", "a train start's check of a store URL downloads and hashes every object",
             "pipeline/stores/verify.py",
             "    report = VerifyReport(True) if remote and reader.complete else verify_store(reader, deep=not remote)\n",
             "    report = verify_store(reader)\n",
             ("tests/stores/test_remote_start_check.py::test_a_train_start_on_a_store_url_lists_once_and_downloads_no_shard_payload",)),
    Mutation("start-check-keys-fetch-everything", "the keys check of a zarr store URL downloads every object of every shard",
             "pipeline/stores/verify.py",
             "        with reader.source.local(reader.records, sorted(reader.records), reader.records, only=reader._key_files):\n",
             "        with reader.source.local(reader.records, sorted(reader.records), reader.records):\n",
             ("tests/stores/test_remote_start_check.py::test_a_train_start_on_a_store_url_lists_once_and_downloads_no_shard_payload",)),
    Mutation("start-check-fetches-records", "the check of a complete store URL lists it again and fetches every "
             "record object, which open_remote checked and no read uses (1,250 GETs per rank and store)",
             "pipeline/stores/verify.py",
             "    report = VerifyReport(True) if remote and reader.complete else verify_store(reader, deep=not remote)\n",
             "    report = verify_store(reader, deep=not remote)\n",
             ("tests/stores/test_remote_start_check.py::test_a_train_start_on_a_store_url_lists_once_and_downloads_no_shard_payload",)),
    Mutation("start-check-skips-remote-keys", "the check of a zarr store URL does not compare its keys with the data",
             "pipeline/stores/verify.py",
             "            reader.check_keys(0, len(dataset), dataset.keys)  # type: ignore[attr-defined, arg-type]\n",
             "            pass\n",
             ("tests/stores/test_remote_start_check.py::test_a_zarr_shard_copied_over_another_with_its_records_is_refused_at_a_train_start_on_s3",)),
    Mutation("store-url-named-by-cache-folder", "a store URL's reader names its local cache folder in its messages "
             "(identity, keys, ranges, train's record of its stores) instead of the URL",
             "pipeline/stores/base.py",
             "        return self.source.url if self.source is not None else str(self.path)\n",
             "        return str(self.path)\n",
             ("tests/stores/test_remote_start_check.py::test_a_store_url_is_named_by_its_url_not_its_cache_folder",
              "tests/stores/test_remote_start_check.py::test_a_zarr_shard_copied_over_another_with_its_records_is_refused_at_a_train_start_on_s3")),
    Mutation("zarr-keys-not-apart", "zarr's reader does not declare its keys objects apart from its arrays: a store "
             "URL's start check skips the keys",
             "pipeline/stores/zarr_store.py",
             "    keys_apart = True  # one small keys object per shard, beside the arrays\n",
             "    keys_apart = False  # one small keys object per shard, beside the arrays\n",
             ("tests/stores/test_remote_start_check.py::test_a_zarr_shard_copied_over_another_with_its_records_is_refused_at_a_train_start_on_s3",)),
    Mutation("written-only-if-decodable", "verify counts a shard of an incomplete store as written only if it also "
             "decodes (the store URL copy's old rule: local and S3 gave different counts)",
             "pipeline/stores/manifest.py",
             "            written += intact\n",
             "            written += intact and not found\n",
             ("tests/stores/test_remote_start_check.py::test_an_incomplete_store_with_a_damaged_shard_verifies_alike_locally_and_on_s3",)),
    Mutation("remote-verify-opens-again", "a store URL's deep verify lists it, reads its manifest and fetches its "
             "records again to open the reader it downloads through",
             "pipeline/stores/remote_read.py",
             "        reader = _open_listed(url, manifest, records, sizes, allow_incomplete=True, cache_dir=None, cache_bytes=None,\n",
             "        reader = open_remote(url, allow_incomplete=True, check_objects=False) or _open_listed(url, manifest, "
             "records, sizes, allow_incomplete=True, cache_dir=None, cache_bytes=None,\n",
             ("tests/stores/test_remote_start_check.py::test_verify_of_an_incomplete_store_url_lists_it_once_and_fetches_each_object_once",)),
    Mutation("remote-fetch-not-shared", "processes of one cache fetching an object at once each download it (ranks "
             "of a node starting together: every keys object once per rank)",
             "pipeline/stores/remote_cache.py",
             "            if dest.is_file():  # another process fetched it while this one waited\n",
             "            if False:  # another process fetched it while this one waited\n",
             ("tests/stores/test_object_store_cache_lock.py::test_two_processes_fetching_one_object_at_once_download_it_once",)),
    Mutation("remote-fs-shared-across-fork", "a forked loader worker downloads through its parent's filesystem instance",
             "pipeline/stores/remote_cache.py",
             "        here = self._here()\n        with here.mutex:\n            if here.remote is None:\n"
             "                here.remote = Remote(self.url)\n            return here.remote\n",
             "        if getattr(self, \"_fs_\", None) is None:  # kept on the source: a forked child inherits it\n"
             "            self._fs_ = Remote(self.url)\n        return self._fs_\n",
             ("tests/stores/test_remote_start_check.py::test_loader_workers_download_what_the_check_left_on_the_server",)),
    Mutation("records-fetch-errors-ignored", "a record object that cannot be fetched is taken as absent (the concurrent fetch's errors dropped)",
             "pipeline/stores/remote.py",
             "                if isinstance(value, FileNotFoundError):\n",
             "                if isinstance(value, BaseException):\n",
             ("tests/stores/test_remote_start_check.py::test_a_record_object_that_cannot_be_read_is_one_line_naming_it",)),
    Mutation("record-size-unchecked", "a record's files are not checked against their recorded sizes",
             "pipeline/stores/manifest.py",
             "        elif size != meta[\"bytes\"]:\n",
             "        elif False:\n",
             ("tests/stores/test_remote_start_check.py::test_an_incomplete_store_reports_its_records_alike_locally_and_on_s3",)),
    Mutation("remote-verify-ignores-invalid-record", "a store URL's verify compares the manifest with its valid records only "
             "(an invalid record of a complete store goes unreported: the drift of issue 26's review)",
             "pipeline/stores/remote_read.py",
             "        stored = fetch_records(r, manifest, sizes)\n",
             "        stored = _records(r, {**manifest, \"complete\": False}, sizes)\n",
             ("tests/stores/test_remote_start_check.py::test_a_damaged_record_gives_the_same_lines_from_verify_locally_and_on_s3",)),
    # --- The suite's own scheduling (tests/xdist_order.py) ---
    Mutation("xdist-module-fixture-split", "pytest -n 2 splits a module with a module-scoped fixture over both "
             "workers (its fixture set up once per worker)",
             "tests/xdist_order.py",
             '        if fixturedef.scope == "module" or',
             '        if fixturedef.scope == "modul" or',
             ("tests/project/test_xdist_order.py::test_two_workers_set_up_a_module_fixture_once",)),
    Mutation("xdist-collection-order", "pytest -n 2 hands out the units in collection order, not longest first",
             "tests/xdist_order.py",
             "    order = sorted(units.values(), key=lambda unit: -sum(map(estimate, unit)))  # stable\n",
             "    order = list(units.values())\n",
             ("tests/project/test_xdist_order.py::test_units_run_longest_first_and_a_groups_tests_stay_together",)),
    # --- stores on a throttled S3 (tests/loopback.py ThrottleProxy) ---
    Mutation("remote-retries-off", "a store URL's calls are not tried again when S3 throttles them (the settings "
             "before: botocore's attempts and s3fs's SlowDown retries only)",
             "pipeline/stores/remote_retry.py",
             "RETRIES, RETRY_S, RETRY_MODE = 12, 60.0, ",
             "RETRIES, RETRY_S, RETRY_MODE = 1, 60.0, ",
             (f"{THROTTLE}::test_a_precompute_through_throttling_completes_with_the_bytes_of_an_unthrottled_one",
              f"{THROTTLE}::test_a_read_and_verify_through_throttling_feed_the_bytes_written")),
    Mutation("remote-slowdown-unnamed", "a call S3 keeps throttling fails as an unreachable endpoint would (not "
             "named as throttling, not tried again)",
             "pipeline/stores/remote_retry.py",
             '    if code == errno.EBUSY or any(t in text for t in _THROTTLED):\n',
             '    if False:\n',
             (f"{THROTTLE}::test_sustained_throttling_ends_in_one_line_naming_the_url_and_leaves_no_store_that_looks_complete",)),
    Mutation("remote-cut-off-not-retried", "a GET whose body arrived damaged (botocore's check of S3's checksum) is "
             "not tried again",
             "pipeline/stores/remote_retry.py",
             '    if type(e).__name__ == "FlexibleChecksumError":',
             '    if False:',
             (f"{THROTTLE}::test_a_shard_get_cut_off_mid_body_is_fetched_again_and_a_short_body_is_refused",)),
    Mutation("remote-read-stall-fatal", "a read that stalls past the timeout ends the run (s3fs no longer tries "
             "it again and remote_retry did not either)",
             "pipeline/stores/remote_retry.py",
             '    if type(e).__name__ == "ReadTimeoutError":',
             '    if False:',
             ("tests/stores/test_remote_retry_jitter.py::test_a_stalled_read_is_tried_again_and_a_connect_timeout_is_not",)),
    Mutation("remote-s3fs-retries-too", "s3fs's own SlowDown loop (5 tries, fixed waits, in lockstep across "
             "clients) runs inside each of remote_retry's tries: the tries multiply",
             "pipeline/stores/remote.py",
             "        fs.retries = 1\n",
             "        fs.retries = 5\n",
             (f"{THROTTLE}::test_sustained_throttling_ends_in_one_line_naming_the_url_and_leaves_no_store_that_looks_complete",)),
    Mutation("remote-root-denied-is-missing", "a bucket that denies its HEAD (it exists: S3 answers 403) is probed "
             "by exists(), which says False for any failure: \"does not exist; create it first\"",
             "pipeline/stores/remote.py",
             "                # False for any failure, a SlowDown or a denial too.\n                return True\n",
             "                # False for any failure, a SlowDown or a denial too.\n                pass\n",
             (f"{THROTTLE}::test_a_root_whose_bucket_denies_its_head_is_not_called_missing",)),
    Mutation("remote-outage-as-rate", "a gateway or node failing (500/502/504) after every try is reported as the "
             "user's request rate (\"run fewer ranks\"), not as the store's health",
             "pipeline/stores/remote_retry.py",
             "{_RATE if why == _THROTTLING else _HEALTH}",
             "{_RATE}",
             (f"{THROTTLE}::test_a_failing_gateway_is_reported_as_the_store_s_health_not_the_request_rate",)),
    Mutation("remote-timeout-unchecked", "a bad ENSPIPE_REMOTE_TIMEOUT is a bare ValueError (or a 0 s timeout), "
             "not one line naming it",
             "pipeline/stores/remote_retry.py",
             '    timeout = number("ENSPIPE_REMOTE_TIMEOUT", TIMEOUT_S, float, 1e-3, "a number of seconds above 0")\n',
             '    timeout = float(env.get("ENSPIPE_REMOTE_TIMEOUT", TIMEOUT_S))\n',
             (f"{THROTTLE}::test_a_bad_retry_setting_is_one_line_naming_it",)),
    Mutation("remote-jitter-shared-seed", "retry waits drawn from the global random (seeded alike on every rank: "
             "throttled ranks come back together, and a retry moves the training's stream)",
             "pipeline/stores/remote_retry.py",
             "    return _rng.uniform(0, min(",
             "    return random.uniform(0, min(",
             ("tests/stores/test_remote_retry_jitter.py::test_processes_seeded_alike_draw_different_waits_and_leave_random_alone",)),
]

# Not copied: at the root, version control, environments and outputs; anywhere, caches.
TOP_LEVEL_SKIP = {".git", ".venv", ".shim", "build", "dist", "runs", "out", "stores", ".enspipe-cache", ".benchmarks"}
ANYWHERE_SKIP = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info")


def _ignore(folder: str, names: list[str]) -> set[str]:
    skip = set(ANYWHERE_SKIP(folder, names))
    return skip | (TOP_LEVEL_SKIP & set(names)) if Path(folder) == REPO else skip


def problems(mutations: list[Mutation], repo: Path = REPO) -> list[str]:
    """Why a mutation cannot be applied to `repo` as written (empty when every one can)."""
    out = []
    names = [m.name for m in mutations]
    out += [f"{n}: listed twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutations:
        path = repo / m.file
        count = path.read_text("utf-8").count(m.old) if path.is_file() else -1
        if count != 1:
            out.append(f"{m.name}: {m.file} " + ("does not exist" if count < 0 else f"holds the old text {count} times"))
        for t in m.tests:
            file, _, func = t.partition("::")
            if not (repo / file).is_file() or f"def {func.split('[')[0]}(" not in (repo / file).read_text("utf-8"):
                out.append(f"{m.name}: test {t} not found")
    return out


def scratch_copy(dest: Path) -> Path:
    """The repository copied to `dest`, importable as enspipe through dest/.shim."""
    shutil.copytree(REPO, dest, ignore=_ignore, symlinks=True)
    (dest / ".shim").mkdir()
    (dest / ".shim" / "enspipe").symlink_to(Path("..") / "pipeline")
    return dest


def test_env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    env.update(PYTHONPATH=str(copy / ".shim"), ENSPIPE_PROGRESS="0")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def imports_from(copy: Path) -> list[str]:
    """enspipe's modules that the copy's environment imports from anywhere but the copy (the
    shared environment's editable install points elsewhere): must be none."""
    code = ("import pkgutil, importlib, enspipe\n"
            "for m in pkgutil.walk_packages(enspipe.__path__, 'enspipe.'):\n"
            "    print(m.name, importlib.util.find_spec(m.name).origin)")
    r = subprocess.run([sys.executable, "-c", code], cwd=copy, env=test_env(copy), capture_output=True, text=True,
                       timeout=120, check=True)
    root = str(copy.resolve())
    return [ln for ln in r.stdout.splitlines() if not ln.split(" ", 1)[1].startswith(root)]


def run_tests(copy: Path, tests: tuple[str, ...], *, exitfirst: bool, timeout: float) -> tuple[int, str, float]:
    env = test_env(copy)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(copy),
           *(["-x"] if exitfirst else []), *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
    return rc, out, time.perf_counter() - t0


def run_mutation(m: Mutation, work: Path, timeout: float) -> tuple[str, float, str]:
    """(killed | survived | error, seconds, pytest's last lines)."""
    copy = scratch_copy(work / m.name)
    try:
        path = copy / m.file
        path.write_text(path.read_text("utf-8").replace(m.old, m.new, 1), "utf-8")
        rc, out, seconds = run_tests(copy, m.tests, exitfirst=True, timeout=timeout)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    verdict = {1: "killed", 0: "survived"}.get(rc, "error")
    return verdict, seconds, "\n".join(out.strip().splitlines()[-15:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="run only these mutations (default: all)")
    ap.add_argument("--list", action="store_true", help="print the table and exit")
    ap.add_argument("--jobs", type=int, default=1, help="mutations run at once (default 1)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on an unmutated copy")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:<30} {m.file:<32} {m.bug}\n{'':<30} tests: {', '.join(m.tests)}")
        return 0
    bad = problems(chosen)
    if bad:
        print("cannot apply the mutations as listed:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 2

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="enspipe-mutations-") as tmp:
        work = Path(tmp)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            copy = scratch_copy(work / "baseline")
            elsewhere = imports_from(copy)
            if elsewhere:
                print("the scratch copy imports enspipe modules from elsewhere:\n  " + "\n  ".join(elsewhere),
                      file=sys.stderr)
                return 2
            rc, out, seconds = run_tests(copy, tests, exitfirst=False, timeout=args.timeout)
            shutil.rmtree(copy, ignore_errors=True)
            print(f"baseline: {len(tests)} tests on the unmutated copy {'pass' if rc == 0 else 'FAIL'} "
                  f"({seconds:.0f} s)", flush=True)
            if rc != 0:
                print(out[-5000:], file=sys.stderr)
                return 2
        results: dict[str, tuple[str, float, str]] = {}

        def one(m: Mutation) -> None:
            results[m.name] = run_mutation(m, work, args.timeout)
            verdict, seconds, _ = results[m.name]
            print(f"{m.name:<30} {verdict:<9} {seconds:6.1f} s  {m.bug}", flush=True)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(one, chosen))

    killed = [m for m in chosen if results[m.name][0] == "killed"]
    for m in chosen:
        verdict, _, tail = results[m.name]
        if verdict != "killed":
            print(f"\n--- {m.name}: {verdict} ({m.file}); pytest's last lines:\n{tail}", file=sys.stderr)
    print(f"\n{len(killed)} of {len(chosen)} mutations killed in {time.perf_counter() - start:.0f} s")
    return 0 if len(killed) == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
