"""precompute: stores that round-trip the attacks exactly, reuse, resume after kill -9, dask
workers (and a worker killed mid-run), bad input through the real CLI, verify and ls."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from enspipe import attacks
from enspipe.data import create_dataset
from enspipe.util.errors import ConfigError
from enspipe.models import load_model
from enspipe.precompute import PrecomputeConfig, _gpu_worker_specs, precompute
from enspipe.stores import list_stores, open_store, verify_store
from enspipe.stores.manifest import file_record
from cli_runner import outputs, run_cli, spawn
from cli_runner import CLI
from loopback import free_port


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real command line in its own process, forked from the suite's pre-imported zygote."""
    return run_cli(*map(str, args), timeout=timeout)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    r = open_store(path)
    return {**r.read(0, len(r)), "keys": np.array(r.keys(0, len(r)))}


def _assert_same_store(a: Path, b: Path) -> None:
    """Equal arrays and keys, and bit-identical shard files (equal per-shard sha256)."""
    x, y = _arrays(a), _arrays(b)
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    files = lambda p: {s: r["files"] for s, r in open_store(p).manifest["shards"].items()}  # noqa: E731
    assert files(a) == files(b)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def _direct(model, x: torch.Tensor, attack: str, eps: float, batch: int) -> torch.Tensor:
    """The attack computed directly on the static model, with precompute's batch boundaries."""
    out = []
    for b in range(0, len(x), batch):
        xb = x[b:b + batch]
        if attack == "fgsm":
            out.append(attacks.fgsm(model, xb, eps=eps, label="pred"))
        else:
            out.append(attacks.step_ll(model, xb, eps=eps))
    return torch.cat(out)


# --- Round trip, reuse, verify, ls -------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_stores(digits_static, tmp_path_factory) -> tuple[Path, list[Path]]:
    """Step-LL and FGSM stores of the static D model over digits, in zarr and wds."""
    root = tmp_path_factory.mktemp("stores")
    cfg = PrecomputeConfig(model=str(digits_static), out=str(root), attacks=("step_ll", "fgsm"), fmt="both",
                           shard_size=512, batch_size=128, device="cpu")
    return root, precompute(cfg)


def test_stores_round_trip_the_attacks_exactly(digits_static, digits_stores):
    root, paths = digits_stores
    assert [p.suffix for p in paths] == [".zarr", ".wds", ".zarr", ".wds"]
    assert [open_store(p).identity.attack for p in paths] == ["step_ll", "step_ll", "fgsm", "fgsm"]
    model = load_model(digits_static).eval()
    ds = create_dataset("digits")
    x = ds.images(slice(0, len(ds)))
    # The attacks directly on every sample (shard boundaries and several batches), so each
    # store is checked against them, not against its twin; the twins must agree too.
    n = len(ds)
    direct = {(a, eps): _direct(model, x[:n], a, eps, batch=128) for a in ("step_ll", "fgsm") for eps in (0.1, 0.3)}
    with torch.no_grad():
        logits = model(x)
    for path in paths:
        r = open_store(path)
        got = r.read(0, len(r))
        d = torch.from_numpy(got["direction"])
        assert set(np.unique(got["direction"])) <= {-1, 0, 1}
        assert r.keys(0, len(r)) == ds.keys
        for eps in (0.1, 0.3):
            x_adv = attacks.apply_direction(x[:n], d[:n], eps)
            assert torch.equal(x_adv, direct[r.identity.attack, eps]), (path, eps)
        if r.fmt == "wds":
            zarr_twin = paths[paths.index(path) - 1]
            np.testing.assert_array_equal(got["direction"], open_store(zarr_twin).read(0, len(r))["direction"])
        np.testing.assert_array_equal(got["logits"], logits.numpy().astype(np.float16))
        want_label = logits.argmin(1) if r.identity.attack == "step_ll" else logits.argmax(1)
        np.testing.assert_array_equal(got["label"], want_label.numpy())
        extra = r.manifest["extra"]
        assert extra["model"]["spec"] == str(Path(digits_static).resolve())
        assert extra["config"]["batch_size"] == 128 and "torch" in extra["versions"]
        if r.fmt == "wds":  # the wds store carries the clean image beside the direction
            np.testing.assert_array_equal(r.read_images(0, len(r)), ds.images_uint8(slice(0, len(ds))))


def test_second_run_reuses_and_writes_nothing(digits_static, digits_stores):
    root, paths = digits_stores
    before = _snapshot(root)
    res = _cli("precompute", "--model", digits_static, "--out", root, "--attacks", "step_ll,fgsm",
               "--format", "both", "--shard-size", 512, "--batch-size", 128, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(p) for p in paths]
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("reused ")] == [f"reused {p}" for p in paths]
    # Step-LL ignores --label, so --label true finds the same Step-LL store.
    again = precompute(PrecomputeConfig(model=str(digits_static), out=str(root), attacks=("step_ll",),
                                        label="true", shard_size=512, batch_size=128, device="cpu"))
    assert again == [paths[0]]
    assert _snapshot(root) == before


def test_verify_cli(digits_stores, capsys):
    from enspipe.cli import main

    root, paths = digits_stores
    for path in (paths[0], paths[3]):
        main(["verify", str(path)])
        main(["verify", str(path), "--recompute", "8", "--device", "cpu"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"OK {path}") and out[1].startswith(f"OK {path}") and "8 samples" in out[1]


def test_ls_cli_lists_the_stores(digits_stores, capsys):
    from enspipe.cli import main

    root, paths = digits_stores
    main(["ls", str(root)])
    listing = capsys.readouterr().out
    for p in paths:
        assert str(p) in listing


def test_recompute_check_finds_a_tampered_direction(digits_static, digits_stores, tmp_path):
    import shutil

    import zarr
    from enspipe.precompute import recompute_check

    root, paths = digits_stores
    copy = tmp_path / paths[0].name
    shutil.copytree(paths[0], copy)
    arr = zarr.open_array(str(copy / "direction"), mode="r+")
    arr[0:512] = -np.asarray(arr[0:512])  # flip a whole shard (a whole zarr shard: safe to rewrite)
    # ...and re-hash its records, as whoever rewrote the store would: the checksums then hold,
    # and only recomputing directions can tell.
    manifest = json.loads((copy / "manifest.json").read_text())
    rec = manifest["shards"]["000000"]
    rec["files"]["direction/c/0/0/0/0"] = file_record(copy, "direction/c/0/0/0/0")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "shards" / "000000.json").write_text(json.dumps(rec))
    assert verify_store(copy).ok
    problems = recompute_check(copy, k=100, model=None, data_root=None, device="cpu", seed=0)
    picked = np.sort(np.random.default_rng(0).choice(1500, size=100, replace=False))
    flagged = [int(p.split()[1]) for p in problems]
    assert flagged == [int(i) for i in picked if i < 512]  # exactly the tampered samples
    assert all("direction differs" in p for p in problems)


# --- Resume after kill -9 (a real subprocess) --------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_mid_run_then_rerun_equals_uninterrupted(digits_static, mnist_root, tmp_path, precision):
    """Resume is bit-identical for a given precision (bf16 stores are stores of their own)."""
    if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no native bf16")
    args = ["--model", digits_static, "--dataset", "mnist", "--data-root", mnist_root, "--limit", 1024,
            "--shard-size", 64, "--batch-size", 64, "--device", "cpu", "--precision", precision]
    killed_root, ref_root = tmp_path / "killed", tmp_path / "ref"
    proc = subprocess.Popen([*CLI, "precompute", *map(str, args), "--out", str(killed_root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # an event wait: the cap is only for a hang
    done = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = len(list(killed_root.glob("*/*/*.zarr/shards/*.json")))
            if done >= 1:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()}"
    (info,) = list_stores(killed_root)
    assert not info.complete and 1 <= info.shards_done < info.num_shards == 16

    res = _cli("precompute", *args, "--out", killed_root)
    assert res.returncode == 0, res.stderr
    (resumed,) = map(Path, res.stdout.split())
    (ref,) = precompute(PrecomputeConfig(model=str(digits_static), out=str(ref_root), dataset="mnist",
                                         data_root=str(mnist_root), limit=1024, shard_size=64, batch_size=64,
                                         device="cpu", precision=precision))
    assert resumed.relative_to(killed_root) == ref.relative_to(ref_root)
    _assert_same_store(resumed, ref)


# --- dask workers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_store(digits_static, tmp_path_factory) -> Path:
    """In-process Step-LL store of D over digits: what every distributed run must equal."""
    root = tmp_path_factory.mktemp("ref")
    (path,) = precompute(PrecomputeConfig(model=str(digits_static), out=str(root), shard_size=64, batch_size=64,
                                          device="cpu"))
    return path


def test_two_local_workers_equal_in_process(digits_static, reference_store, tmp_path):
    (path,) = precompute(PrecomputeConfig(model=str(digits_static), out=str(tmp_path), shard_size=64, batch_size=64,
                                          device="cpu", workers=2))
    _assert_same_store(path, reference_store)


def test_worker_killed_mid_run_still_completes(digits_static, reference_store, tmp_path, capfd):
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1", silence_logs=40) as cluster, Client(cluster) as client:
        cfg = PrecomputeConfig(model=str(digits_static), out=str(tmp_path), shard_size=64, batch_size=64,
                               device="cpu", scheduler=cluster.scheduler_address)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(paths=_catch(precompute, cfg)))
        runner.start()
        deadline = time.monotonic() + 600  # an event wait: the cap is only for a hang
        while time.monotonic() < deadline and not list(tmp_path.glob("*/*/*.zarr/shards/*.json")):
            time.sleep(0.01)
        # The victim is a worker holding shards now (an event, not a moment): under load the
        # first worker listed was sometimes between its tasks, and its death cost nothing.
        pids = client.run(os.getpid)
        while time.monotonic() < deadline and not (busy := [w for w, t in client.processing().items() if t]):
            time.sleep(0.01)
        victim = pids[busy[0]] if busy else next(iter(pids.values()))
        os.kill(victim, signal.SIGKILL)  # the nanny restarts it; dask reruns its task elsewhere
        killed_at = len(list(tmp_path.glob("*/*/*.zarr/shards/*.json")))
        runner.join(timeout=180)
    assert not runner.is_alive()
    assert killed_at < 24, "the run finished before a worker could be killed"
    (path,) = result["paths"]
    _assert_same_store(path, reference_store)
    assert "died while holding step_ll shard" in capfd.readouterr().err  # the rerun is visible


def _catch(fn, *args):
    try:
        return fn(*args)
    except BaseException as e:  # surfaced by the assertion on result["paths"]
        return e


# --- Bad input through the real CLI ------------------------------------------------------------


def test_bad_input_is_one_line_and_no_complete_store(digits_static, tmp_path):
    from enspipe.models import create_model, save_model

    other = save_model(create_model("A"), tmp_path / "model-A")  # a checkpoint of another architecture
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    root = tmp_path / "root"
    base = ["precompute", "--model", digits_static, "--shard-size", 512, "--device", "cpu"]
    cases = {
        "unknown attack": [*base, "--out", root, "--attacks", "step_ll,pgd"],
        "root under a file": [*base, "--out", afile / "stores"],
        "weights of another architecture": ["precompute", "--model", "D", "--weights", other, "--out", root],
        "no workers": [*base, "--out", root, "--dask-workers", 0],
        "unreachable scheduler": [*base, "--out", root, "--scheduler", f"tcp://127.0.0.1:{free_port()}"],
    }
    env = {**os.environ, "ENSPIPE_PROGRESS": "0"}
    # In parallel (the scheduler's case waits for its connect timeout), each forked from the zygote.
    procs = {name: spawn(*a, log=tmp_path / f"case{i}", env=env, cwd=tmp_path)
             for i, (name, a) in enumerate(cases.items())}
    expected = {"unknown attack": "pgd", "root under a file": "afile", "weights of another architecture": "for A",
                "no workers": "--dask-workers", "unreachable scheduler": "scheduler"}
    for name, p in procs.items():
        p.wait(timeout=120)
        out, err = outputs(p)
        lines = err.splitlines()
        assert p.returncode != 0, name
        # "enspipe precompute: error:" for a usage error (a value outside a field's declared choices)
        assert len(lines) == 1 and lines[0].startswith(("enspipe: error: ", "enspipe precompute: error: ")), (name, err)
        assert expected[name] in lines[0], (name, err)
        assert "Traceback" not in err and out == "", name
    assert not [i for i in (list_stores(root) if root.exists() else []) if i.complete]


@pytest.mark.parametrize("kw, word", [
    ({"attacks": ()}, "attacks"), ({"attacks": ("fgsm", "fgsm")}, "twice"), ({"label": "ll"}, "label"),
    ({"format": "hdf5"}, "format"), ({"shard_size": 0}, "shard_size"), ({"dask_workers": -1}, "dask_workers"),
    ({"dask_workers": 2, "scheduler": "tcp://x:1"}, "only one"), ({"weights": "w", "pretrained": True}, "exclude"),
])
def test_config_errors_are_one_sentence(kw, word):
    with pytest.raises(ConfigError, match=word):
        PrecomputeConfig(model="D", out="stores", **kw)


def test_gpu_workers_each_see_one_gpu():
    """The GPU cluster cannot start here (no GPU); the per-worker device choice can be checked."""
    specs = _gpu_worker_specs(3, ["2", "3"])
    assert [w["options"]["env"]["CUDA_VISIBLE_DEVICES"] for w in specs.values()] == ["2", "3", "2"]
    assert all(w["options"]["nthreads"] == 1 for w in specs.values())
