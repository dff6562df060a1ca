"""Precompute with several attacks decodes each image once: a shard's batches are decoded once and
each is attacked by every attack that still lacks the shard, into that attack's own open shard in
the sink (one buffer per attack, `ShardBegin.part`). Before, every attack decoded (and read) every
shard again: with K attacks K decodes per image, where JPEG decode is what limits a GPU host.

The oracles: the decodes counted at the decoder itself (the PIL path's `pixels_of`, in this process
and in forked loader workers alike, each appending its sample to a log with os.write; the device
path's `decode_batch`); the stores of one two-attack run compared file by file with those of two
one-attack runs (each attack alone: nothing to group, so the bytes cannot depend on the grouping),
in-process with 0 and 2 loader workers and on a 2-worker local dask cluster; and the sink's shard
buffers against rows computed here.
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from jpeg_folders import make_jpeg_folder

from enspipe.precompute import PrecomputeConfig, precompute
from enspipe.precompute.sink import BatchDone, ShardBegin, ShardEnd, ShardSink

SIZE = 32
ATTACKS = ("step_ll", "fgsm")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(an ImageFolder of 24 JPEGs in 4 classes, a static model C for 3x32x32 images)."""
    from enspipe.models import create_model, save_model

    root = tmp_path_factory.mktemp("decodes")
    jpegs = make_jpeg_folder(root / "jpegs", images=24, size=40, classes=4, workers=1)
    torch.manual_seed(5)
    return jpegs, save_model(create_model("C", num_classes=4, input_size=(3, SIZE, SIZE)), root / "C")


def _cfg(inputs, out: Path, **kw) -> PrecomputeConfig:
    jpegs, model = inputs
    # label "true": FGSM takes the true labels, Step-LL its least-likely class: both label paths.
    base = dict(model=str(model), dataset=f"imagefolder:{jpegs}", image_size=SIZE, shard_size=8, batch_size=4,
                device="cpu", attacks=ATTACKS, label="true", format="both", loader_workers=0, out=str(out))
    return PrecomputeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def one_attack_runs(inputs, tmp_path_factory) -> Path:
    """The reference: each attack precomputed alone (zarr + wds), into one root."""
    root = tmp_path_factory.mktemp("alone")
    for attack in ATTACKS:
        precompute(_cfg(inputs, root, attacks=(attack,)))
    return root


def _store_files(root: Path) -> dict[str, bytes]:
    """Every file of every store under root, by path relative to root; a manifest as its shard
    records (the rest of it carries timestamps), a shard's completion record as its file records."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.endswith(".lock"):
            continue
        rel = str(p.relative_to(root))
        if p.name == "manifest.json":
            out[rel] = json.dumps(json.loads(p.read_text())["shards"], sort_keys=True).encode()
        elif p.parent.name == "shards" and p.suffix == ".json":
            out[rel] = json.dumps(json.loads(p.read_text())["files"], sort_keys=True).encode()
        else:
            out[rel] = p.read_bytes()
    return out


def _count_decodes(monkeypatch, log: Path):
    """Every PIL-path decode (`ImageFolderSource.pixels_of`) appends its sample to `log`, in this
    process and in forked loader workers; returns a function giving {sample: decodes} so far."""
    from enspipe.data.imagefolder import ImageFolderSource

    real = ImageFolderSource.pixels_of

    def counting(self, i, data):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{i}\n".encode())
        finally:
            os.close(fd)
        return real(self, i, data)

    monkeypatch.setattr(ImageFolderSource, "pixels_of", counting)
    return lambda: collections.Counter(int(i) for i in log.read_text().split()) if log.exists() else {}


@pytest.mark.parametrize("where", ["in-process, 0 loader workers", "in-process, 2 loader workers",
                                   "2 dask workers"])
def test_two_attacks_decode_each_image_once_into_the_one_attack_stores(inputs, one_attack_runs, tmp_path,
                                                                       monkeypatch, where):
    decodes = _count_decodes(monkeypatch, tmp_path / "decodes.log")
    kw = {"in-process, 0 loader workers": {}, "in-process, 2 loader workers": {"loader_workers": 2},
          "2 dask workers": {"dask_workers": 2}}[where]
    out = tmp_path / "both"
    open_buffers, real_handle = [], ShardSink._handle

    def handle(sink, msg):  # how many shards the sink holds open, after each message
        real_handle(sink, msg)
        open_buffers.append(len(sink._bufs))

    monkeypatch.setattr(ShardSink, "_handle", handle)
    from enspipe.precompute import dask_runner

    tasks, real_groups = [], dask_runner.task_groups

    def task_groups(units, workers):  # the dask tasks precompute hands out
        groups = real_groups(units, workers)
        tasks.extend(groups)
        return groups

    monkeypatch.setattr(dask_runner, "task_groups", task_groups)
    stores = precompute(_cfg(inputs, out, **kw))
    assert len(stores) == 4
    got, want = _store_files(out), _store_files(one_attack_runs)
    assert sorted(got) == sorted(want)  # the same stores (paths from their identities), the same files
    for rel in want:
        assert got[rel] == want[rel], rel
    if "dask" in where:  # its workers are not forked from this one (no decode count there): each shard and
        # both its attacks in exactly one task, so one worker decodes it once
        assert len(tasks) == 2
        assert sorted(s for task in tasks for s in {s for _, s in task}) == [0, 1, 2]
        assert all(sorted(job.attack for job, t in task if t == s) == sorted(ATTACKS) for task in tasks for _, s in task)
    else:
        assert decodes() == collections.Counter(range(24))  # each image once, for both attacks (was 2)
        assert max(open_buffers) == 2  # one open shard per attack, K = 2: the sink's memory beyond its queue


def test_a_shard_decodes_once_for_whichever_attacks_still_lack_it(inputs, one_attack_runs, tmp_path, monkeypatch):
    """Pending shards differ per attack: the Step-LL zarr store lacks shard 2, the FGSM zarr store
    shards 1 and 2. Only those shards' images are decoded, once each, and the resumed stores are the
    uninterrupted ones."""
    from enspipe.stores.manifest import record_path

    out = tmp_path / "resumed"
    stores = dict(zip(("step_ll zarr", "step_ll wds", "fgsm zarr", "fgsm wds"), precompute(_cfg(inputs, out))))
    for name, shards in (("step_ll zarr", (2,)), ("fgsm zarr", (1, 2))):
        store = stores[name]
        manifest = json.loads((store / "manifest.json").read_text())
        manifest.update(complete=False, shards={}, finalized_at=None)  # as before its finalize
        (store / "manifest.json").write_text(json.dumps(manifest))
        for s in shards:
            record_path(store, s).unlink()  # as if killed before these shards were written
    decodes = _count_decodes(monkeypatch, tmp_path / "decodes.log")
    import enspipe.precompute as stage

    handed, real = [], stage.run_in_process
    monkeypatch.setattr(stage, "run_in_process", lambda units, **kw: (handed.extend(units), real(units, **kw)))
    precompute(_cfg(inputs, out))
    assert decodes() == collections.Counter(range(8, 24))  # shards 1 and 2 (8 samples each), once
    assert sorted((job.attack, s) for job, s in handed) == [("fgsm", 1), ("fgsm", 2), ("step_ll", 2)]
    got, want = _store_files(out), _store_files(one_attack_runs)
    assert {rel: got[rel] for rel in want} == want


def test_the_device_path_decodes_each_batch_once_for_both_attacks(inputs, tmp_path, monkeypatch):
    """As `auto` resolves on CUDA: the loader hands over JPEG bytes and the process that drives the
    device decodes them (`decode_batch`); with two attacks each sample is in one decoded batch."""
    from enspipe.data import decode as decode_mod

    real_resolve, real_decode = decode_mod.resolve_decoder, decode_mod.decode_batch
    decoded: list[int] = []

    def counting(chunks, *args, **kwargs):
        decoded.extend(i for c in chunks for i in c.indices)
        return real_decode(chunks, *args, **kwargs)

    monkeypatch.setattr(decode_mod, "resolve_decoder", lambda name, device, decodes=True: real_resolve(name, "cuda",
                                                                                                       decodes))
    monkeypatch.setattr(decode_mod, "decode_batch", counting)
    precompute(_cfg(inputs, tmp_path, format="zarr"))
    assert collections.Counter(decoded) == collections.Counter(range(24))


# --- One forward pass for the attacks of a batch --------------------------------------------------

@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("label", ["pred", "true"])
def test_directions_share_a_forward_and_equal_one_direction_per_attack(inputs, label, autocast, monkeypatch):
    """attacks.directions (what precompute runs per batch) gives what one attacks.direction call
    per attack gives, bit for bit, from one forward pass of the model instead of one per attack."""
    from enspipe import attacks
    from enspipe.models import load_model
    from enspipe.precompute.compute import _deterministic

    model = load_model(str(inputs[1])).eval().requires_grad_(False)
    x, y = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 0, 1])
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    with _deterministic():
        want = [attacks.direction(model, x, y, attack=a, label=label, autocast=autocast)
                for a in ("fgsm", "step_ll", "fgsm")]
        forwards.clear()
        got = attacks.directions(model, x, y, attacks=("fgsm", "step_ll", "fgsm"), label=label, autocast=autocast)
    assert len(forwards) == 1
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert not torch.equal(got[0][0], got[1][0])  # FGSM and Step-LL differ: each got its own labels


# --- The sink: one open shard per attack (part) --------------------------------------------------

class _Writer:
    """Records what the sink writes (the stores themselves are tested above and in tests/stores/)."""

    geometry, num_classes, keeps_clean_images = (1, 1, 1), 3, False

    def __init__(self) -> None:
        self.shards: dict[int, np.ndarray] = {}

    def write_shard(self, s: int, *, direction, **_) -> None:
        self.shards[s] = direction[:, 0, 0, 0].copy()


def _batch(offset: int, values: list[int], part: int) -> BatchDone:
    d = torch.tensor(values, dtype=torch.int8).reshape(-1, 1, 1, 1)
    return BatchDone(offset, d, torch.zeros(len(values), 3), torch.zeros(len(values), dtype=torch.int64), part=part)


@pytest.mark.parametrize("background", [False, True])
def test_the_sink_keeps_one_shard_buffer_per_part(background):
    """Two parts' shards (the same samples, two attacks) interleaved batch by batch go each to its
    own writers with its own rows; a part's shard ends alone; a second start inside a part's open
    shard is refused."""
    a, b = _Writer(), _Writer()
    with ShardSink(background=background) as sink:
        for s in (3, 4):
            for part, w in ((0, a), (1, b)):
                sink.put(ShardBegin(s, 0, 4, (w,), keys=list("wxyz"), images=None, true_label=None, part=part))
            for offset in (0, 2):
                sink.put(_batch(offset, [s + offset, s + offset + 1], part=0))
                sink.put(_batch(offset, [-s - offset, -s - offset - 1], part=1))
            sink.put(ShardEnd(s, part=0))
            sink.put(ShardEnd(s, part=1))
    assert {s: v.tolist() for s, v in a.shards.items()} == {3: [3, 4, 5, 6], 4: [4, 5, 6, 7]}
    assert {s: v.tolist() for s, v in b.shards.items()} == {3: [-3, -4, -5, -6], 4: [-4, -5, -6, -7]}
    sink = ShardSink(background=False)
    sink.put(ShardBegin(0, 0, 4, (a,), keys=list("wxyz"), images=None, true_label=None, part=1))
    with pytest.raises(RuntimeError, match="inside shard 0"):
        sink.put(ShardBegin(1, 4, 8, (a,), keys=list("wxyz"), images=None, true_label=None, part=1))


def test_dask_tasks_hold_every_attack_of_their_shards():
    """Units handed attack by attack (as precompute lists them): a task never splits a shard's attacks
    (its shard is then decoded once, in one worker); tasks cover the units in shard order, at most
    TASK_SHARDS shards each, at least one per worker; describe and the progress count see every unit."""
    from enspipe.precompute.dask_runner import TASK_SHARDS, describe, task_groups

    class Job:  # only .attack is read
        def __init__(self, attack):
            self.attack = attack

    a, b = Job("step_ll"), Job("fgsm")
    # Step-LL lacks shards 0-39, FGSM only 4-7 and 30-39 (pending shards differ per attack).
    units = [(a, s) for s in range(40)] + [(b, s) for s in [*range(4, 8), *range(30, 40)]]
    for workers in (1, 2, 3, 7):
        groups = task_groups(units, workers=workers)
        assert [u for g in groups for u in g] == sorted(units, key=lambda u: u[1])  # a shard's attacks in order
        assert len(groups) >= min(workers, 40)
        shards = [{s for _, s in g} for g in groups]
        assert all(len(s) <= TASK_SHARDS for s in shards)
        assert all(not (x & y) for i, x in enumerate(shards) for y in shards[i + 1:])  # no shard in two tasks
    assert describe([(a, 4), (b, 4), (a, 5), (b, 5), (a, 6)]) == "step_ll shard 4-6, fgsm shard 4-5"
