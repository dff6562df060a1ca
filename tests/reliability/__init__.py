"""Reliability and security (issue #7): faults, corruption and hostile input, tested the way
a storage system is. Each test tries to break one promise, named in its docstring; the
promises, the tests and the counts of the last full sweep are listed in RELIABILITY.md.
One test module per promise:

  1. Crash consistency  test_crash.py: real `enspipe precompute` / `enspipe train` processes
                        are SIGKILLed at exact points (faults.py) and at seeded random
                        moments; a re-run then equals an uninterrupted run, and no kill leaves
                        a store that `verify` or the reader accepts while it is incomplete.
  2. Corruption         test_corruption.py: damaged and hostile stores: `verify` names each
                        problem, the trainer refuses them, nothing is unpickled, nothing is
                        written outside.
  3. Hostile input      test_hostile_input.py: a table of bad invocations of every command:
                        non-zero exit, one clear line on stderr, no traceback, nothing
                        half-written.
  4. Concurrent users   test_concurrency.py: two precomputes into one ROOT, readers of a store
                        being written, eight DataLoader workers and two trainers reading one
                        store.
  5. Workers dying      test_workers.py: a dask worker killed mid-shard (full sweep).
  6. Disk full          test_disk_full.py: a size-limited tmpfs (or a simulated ENOSPC): a
                        clear error, then resume.
  7. Hostile files      test_security.py: hostile model files, tars, image folders and output
                        paths: one line naming the file and the bound, peak RSS below 1 GiB,
                        nothing changed outside --out; symlink loops, name resolution, a full
                        disk naming the file, the umask's modes.
  8. Tampering          test_tampering.py: a zarr shard copied over another, records
                        re-hashed: the trainer's keys check refuses it, `verify --recompute`
                        names its samples (the threat model: checksums catch rot and accidents).
  9. Jobs, run folders  test_job_publish.py, test_run_folder.py, test_out_in_dataset.py,
                        test_loader_errors.py (issue 25): a kill inside publish, two trains on
                        one --out, SIGTERM to a process group, outputs inside an image folder.
 10. Bounded metadata   test_bounded_reads.py, test_job_includes.py, test_malformed_files.py
                        (issue 25): 10^9-shard manifests, forged sparse tars, include diamonds,
                        deep or truncated JSON/TOML.

The harness lives beside them: sweep.py (the CI subset / full sweep split and the counts),
processes.py (running enspipe as real processes, forked from zygote.py), faults.py (exact
kill points and ENOSPC, installed from outside the product), kills.py (killing runs and
re-running them), reference.py (the workload and its uninterrupted reference store and run),
forge.py (damaged stores, hostile tars and pickles, the files bad invocations point at),
disk.py (a size-limited tmpfs), sentinel.py (snapshots proving nothing else changed);
conftest.py holds the fixtures all modules share.

The default run is the CI subset (about a minute on two cores). The full sweep runs the
same tests with more kill points, trials and fuzzing, plus the cases marked `slow`:

    ENSPIPE_SWEEP=full python -m pytest tests/reliability      # everything
    python tests/reliability_sweep.py                           # same, and prints counts

Product bugs these tests find are marked `xfail(strict=True, reason="BUG: ...")` until fixed;
RELIABILITY.md lists the ones found so far.
"""
