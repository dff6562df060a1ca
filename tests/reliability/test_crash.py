"""Promise 1, crash consistency: a `precompute` or `train` killed (SIGKILL) at any point
re-runs to completion, and the result equals an uninterrupted run's; no kill leaves a store
that `verify` or the reader accepts while it is incomplete."""
from __future__ import annotations

from pathlib import Path

import pytest

from .kills import Kill, kill_chain, random_moments, run_killed, tally_kinds
from .processes import enspipe
from .reference import (EPOCHS, Ref, RefRun, assert_nothing_falsely_complete, assert_run_not_falsely_done,
                        assert_same_run, assert_same_store, precompute_args, precompute_started, train_args,
                        train_rerun, train_started)
from .sweep import TALLY, full_sweep, full_sweep_case

# --- precompute ----------------------------------------------------------------------------------

# Exact kill points of a `--format both` precompute (the zarr store is written before the wds
# one, shard by shard; each shard: zarr arrays, keys, record; then the wds tar and its record).
PRECOMPUTE_POINTS = [
    Kill("store creation: the layout built in a temp dir, not yet renamed into place",
         "kill-before-replace:*.zarr"),
    Kill("store creation: the empty store renamed into place", "kill-after-replace:*.wds"),
    Kill("during a shard write: a zarr shard file half written", "kill-mid-write:*.zarr/direction/c/*.partial#2"),
    Kill("during a shard write: a wds tar half written", "kill-mid-write:*.wds/.shard-*.tar.*.tmp#2"),
    Kill("inside a shard: its direction array written, its logits not", "kill-after-replace:*.zarr/direction/c/*#3"),
    Kill("inside a shard: every file written, the completion record not", "kill-before-replace:*.zarr/shards/*.json#2"),
    Kill("between shards: a completion record just written", "kill-after-replace:*.wds/shards/*.json#4"),
    Kill("during the manifest update: half of the new manifest written", "kill-mid-write:*.zarr/.manifest.json.*.tmp"),
    Kill("during the manifest update: the new manifest written, not renamed", "kill-before-replace:*.wds/manifest.json"),
    Kill("between the two stores' manifest updates", "kill-after-replace:*.zarr/manifest.json"),
]


def _precompute_crash_test(static: Path, ref: Ref, kills: list[Kill], work: Path, **kw) -> list[str]:
    root = work / "root"
    work.mkdir(parents=True, exist_ok=True)
    args = lambda: precompute_args(static, root)  # noqa: E731
    TALLY["kill points tried: precompute"] += len(kills)

    def check() -> None:
        TALLY["incomplete stores refused after a kill"] += assert_nothing_falsely_complete(root, ref)

    fired, final = kill_chain(args, kills, work, check, **kw)
    paths = [Path(p) for p in final.stdout.split()]
    assert [p.relative_to(root) for p in paths] == [ref.paths[p.suffix].relative_to(ref.root) for p in paths]
    for p in paths:
        assert_same_store(p, ref.paths[p.suffix], ref.arrays[p.suffix])
    TALLY["kill points fired, nothing lost: precompute"] += len(fired)
    tally_kinds("precompute", kills, fired)
    return fired


def test_precompute_killed_at_four_points_resumes_to_the_same_stores(digits_static, ref, tmp_path):
    """Promise 1 (CI subset): one precompute killed four times in a row -- at an unhooked
    moment (SIGKILL from outside as soon as a seeded number of shards is done), during a shard
    write, between shards, during the manifest update -- each time re-run; nothing on disk is
    accepted while incomplete, and the last re-run's stores equal an uninterrupted run's, bit
    for bit."""
    # An event, not seconds: a moment in seconds lands after the work's end when this run is
    # faster than the reference was (a loaded machine), and the exact points after it need
    # work left to hit. After 1-2 of 8 shards, at least 5 are left.
    done = 1 + int(random_moments(1.0, seed=0)[0] * 2)  # a seeded fraction in [0, 1) -> 1 or 2
    records = tmp_path / "root"
    kills = [
        Kill(f"a moment just after {done} zarr shard record(s) appeared",
             when=lambda: len(list(records.glob("*/*/*.zarr/shards/*.json"))) >= done),
        Kill("during a shard write (zarr)", "kill-mid-write:*.zarr/direction/c/*.partial"),
        Kill("between shards", "kill-after-replace:*.wds/shards/*.json"),
        Kill("during the manifest update", "kill-before-replace:*.zarr/manifest.json"),
    ]
    fired = _precompute_crash_test(digits_static, ref, kills, tmp_path, require_exact=True)
    assert [k.name for k in kills[1:]] == [f for f in fired if f != kills[0].name]


# In the CI subset too: the store's central invariant (a shard is done only once its record is).
CI_PRECOMPUTE_POINT = "inside a shard: every file written, the completion record not"


@pytest.mark.parametrize("kill", [full_sweep_case(k, ci=k.name == CI_PRECOMPUTE_POINT) for k in PRECOMPUTE_POINTS],
                         ids=lambda k: k.name)
def test_precompute_killed_at_a_named_point_resumes(digits_static, ref, tmp_path, kill):
    """Promise 1 (full sweep; the CI subset runs CI_PRECOMPUTE_POINT): killed at this exact
    point, precompute leaves nothing that is accepted while incomplete, and a re-run completes
    to the uninterrupted run's stores."""
    assert _precompute_crash_test(digits_static, ref, [kill], tmp_path) == [kill.name]


@full_sweep
@pytest.mark.parametrize("seed", range(16))
def test_precompute_killed_at_random_moments_resumes(digits_static, ref, tmp_path, seed):
    """Promise 1 (full sweep): killed at a seeded random moment, and its re-run killed again
    at another, precompute still completes to the uninterrupted run's stores."""
    first, second = random_moments(ref.work, seed)
    kills = [Kill(f"random moment {first:.2f} s", delay=first, started=precompute_started),
             Kill(f"random moment {second:.2f} s", delay=second, started=precompute_started)]
    _precompute_crash_test(digits_static, ref, kills, tmp_path, require_exact=False)


# --- train ---------------------------------------------------------------------------------------

TRAIN_POINTS = [
    Kill("before training: config.json written, not renamed", "kill-before-replace:*/run/config.json"),
    Kill("during a checkpoint write: the temp file complete, not renamed", "kill-before-replace:*/checkpoints/epoch-*.pt"),
    Kill("between an epoch's checkpoint and its model files", "kill-after-replace:*/checkpoints/epoch-0001.pt"),
    Kill("during the model write: model.safetensors temp written, not renamed",
         "kill-before-replace:*/model.safetensors#2"),
    Kill("between model.safetensors and model.json", "kill-after-replace:*/model.safetensors#1"),
    Kill("during the model.json write: half written", "kill-mid-write:*/.model.json.*.tmp#3"),
    Kill("during a later checkpoint write (epoch 3 of 4)", "kill-before-replace:*/checkpoints/epoch-0002.pt"),
]


def _train_crash_test(ref: Ref, ref_run: RefRun, kills: list[Kill], work: Path, **kw) -> list[str]:
    out = work / "run"
    TALLY["kill points tried: train"] += len(kills)
    fired, _ = kill_chain(lambda: train_rerun(ref, out), kills, work,
                          lambda: assert_run_not_falsely_done(out, ref_run), **kw)
    assert_same_run(out, ref_run)
    TALLY["kill points fired, nothing lost: train"] += len(fired)
    tally_kinds("train", kills, fired)
    return fired


def test_train_killed_at_four_points_resumes_to_the_same_weights(ref, ref_run, tmp_path):
    """Promise 1 (CI subset): one training run killed four times in a row -- in a checkpoint
    write, between a checkpoint and the model files, between model.safetensors and model.json,
    at a seeded random moment -- each time resumed; the final weights equal an uninterrupted
    run's bit for bit (CPU)."""
    moment = 0.4 * random_moments(ref_run.work, seed=0)[0]  # two of the four epochs are left by then
    kills = [
        Kill("during a checkpoint write", "kill-before-replace:*/checkpoints/epoch-*.pt"),
        Kill("between a checkpoint and the model files", "kill-after-replace:*/checkpoints/epoch-*.pt"),
        Kill("between model.safetensors and model.json", "kill-after-replace:*/model.safetensors"),
        Kill(f"a seeded random moment ({moment:.2f} s into the work)", delay=moment,
             started=train_started(tmp_path / "run")),
    ]
    fired = _train_crash_test(ref, ref_run, kills, tmp_path)
    assert fired[:3] == [k.name for k in kills[:3]]


@full_sweep
@pytest.mark.parametrize("kill", TRAIN_POINTS, ids=lambda k: k.name)
def test_train_killed_at_a_named_point_resumes(ref, ref_run, tmp_path, kill):
    """Promise 1 (full sweep): killed at this exact point and resumed, training ends with the
    uninterrupted run's weights."""
    assert _train_crash_test(ref, ref_run, [kill], tmp_path) == [kill.name]


@full_sweep
@pytest.mark.parametrize("seed", range(16))
def test_train_killed_at_random_moments_resumes(ref, ref_run, tmp_path, seed):
    """Promise 1 (full sweep): killed at a seeded random moment and its resumption killed
    again at another, training still ends with the uninterrupted run's weights."""
    first, second = random_moments(ref_run.work, seed)
    started = train_started(tmp_path / "run")
    kills = [Kill(f"random moment {first:.2f} s", delay=first, started=started),
             Kill(f"random moment {second:.2f} s", delay=second, started=started)]
    _train_crash_test(ref, ref_run, kills, tmp_path, require_exact=False)


def test_train_killed_after_its_last_checkpoint_resumes_to_the_final_weights(ref, ref_run, tmp_path):
    """Promise 1: the kill point between the last epoch's checkpoint and its model files."""
    kill = Kill("after the last checkpoint, before the final model files",
                f"kill-after-replace:*/checkpoints/epoch-{EPOCHS - 1:04d}.pt")
    _train_crash_test(ref, ref_run, [kill], tmp_path)


def test_train_resume_is_a_safe_rerun_even_before_the_run_started(ref, ref_run, tmp_path):
    """Promise 1: re-running the same command with --resume completes whatever the kill point,
    including one before config.json was written."""
    out = tmp_path / "run"
    did, _ = run_killed(train_args(ref, out), TRAIN_POINTS[0], tmp_path)
    assert did
    res = enspipe(*train_args(ref, out, "--resume"))
    assert res.returncode == 0, res.stderr
    assert_same_run(out, ref_run)
