"""Child-process tasks of benchmarks/bench_peers.py (one fresh process per measurement).

Each configuration runs in its own interpreter so that its peak resident memory
(`ru_maxrss` of RUSAGE_SELF, the kernel's high-water mark, not a sampled value) belongs to
that configuration alone, and so that one trainer's allocator state cannot flatter or
penalise the next. The parent calls

    python benchmarks/peers_tasks.py TASK ARGS.json RESULT.json

and reads RESULT.json. The peers (ART, torchattacks) are imported here, inside the task
functions, never by the enspipe package.
"""
from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from _common import LoopClock, precompute_fgsm, sync, train_clean


def rss_peak_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Read from VmHWM in /proc/self/status: the high-water mark of this program's own
    address space. Not `ru_maxrss`: Linux carries the pre-exec maximum across exec, so a
    child forked from a parent that holds 800 MiB reports at least 800 MiB however little
    it uses itself (the same holds for RUSAGE_CHILDREN in the parent).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux: the best there is


def _import_store_backends() -> None:
    """Import the store backends (zarr, numcodecs) before the baseline RSS is read: the
    trainer imports them lazily, and their code is not memory that grows with the data."""
    import enspipe.stores.wds.store  # noqa: F401
    import enspipe.stores.zarr_store  # noqa: F401


def _warm_torch(arch: str, device: torch.device, batch_size: int) -> None:
    """Two training steps and one input gradient of a throwaway model on random data of
    the training shapes, before the baseline RSS is read.

    The first steps page in oneDNN/MKL code and grow the allocator's per-thread arenas and
    the kernels' scratch buffers (~150-250 MiB here). That is the same for every contender
    and does not depend on N, so it belongs in the baseline, not in the growth a trainer is
    charged with.
    """
    from enspipe import attacks
    from enspipe.models import create_model

    model = create_model(arch, num_classes=10, input_size=(1, 28, 28)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    attacks.direction(model, x[: batch_size // 2], attack="fgsm", label="pred")
    del model, opt, x, y
    gc.collect()


def _mnist_first(data_root: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n MNIST training images as float32 [n,1,28,28] in [0,1], and their labels.

    ART's API takes the training set as one in-memory array, so its contender holds exactly
    that: the IDX files are streamed and only n samples are kept (the values equal
    enspipe's `images()`: uint8 / 255 in float32, correctly rounded either way).
    """
    import gzip

    raw = Path(data_root) / "MNIST" / "raw"

    def read(stem: str, header: int, item: int) -> np.ndarray:
        path = raw / stem
        opener = open if path.exists() else gzip.open
        with opener(path if path.exists() else raw / f"{stem}.gz", "rb") as f:
            f.read(header)
            return np.frombuffer(f.read(n * item), dtype=np.uint8)

    x = read("train-images-idx3-ubyte", 16, 784).reshape(n, 1, 28, 28).astype(np.float32) / np.float32(255)
    y = read("train-labels-idx1-ubyte", 8, 1).astype(np.int64)
    return x, y


class _StopAfter(Exception):
    """Raised from inside a trainer to end it after `max_steps` steps (memory runs)."""


# --- setup: the pre-trained static models and the holdout ---------------------------------

def task_setup(a: dict[str, Any]) -> dict[str, Any]:
    """Train the static models and the holdout with enspipe's own clean trainer."""
    out: dict[str, Any] = {"models": {}}
    for role, spec in a["models"].items():
        run_dir = Path(spec["run_dir"])
        if (run_dir / "model.safetensors").exists():
            out["models"][role] = {"run_dir": str(run_dir), "reused": True, "seconds": 0.0}
            continue
        seconds = train_clean(run_dir, spec["arch"], data_root=a["data_root"], limit=a["limit"], epochs=a["epochs"],
                              seed=spec["seed"], batch_size=a["batch_size"], device=a["device"])
        out["models"][role] = {"run_dir": str(run_dir), "reused": False, "seconds": seconds}
    return out


# --- precompute -----------------------------------------------------------------------------

def task_precompute(a: dict[str, Any]) -> dict[str, Any]:
    """enspipe precompute of every static model's FGSM directions (one zarr store each)."""
    from enspipe.data import create_dataset

    _import_store_backends()
    rss_imports = rss_peak_mb()
    # The dataset is decoded once here so that the timed part is the precompute itself,
    # as it would be for a store built by a job after the data is in the page cache.
    create_dataset("mnist", data_root=a["data_root"], limit=a["limit"])
    paths: list[str] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for static in a["statics"]:
        paths += [str(p) for p in precompute_fgsm(static, a["out"], data_root=a["data_root"], limit=a["limit"],
                                                  format=a.get("fmt", "zarr"), batch_size=a["batch_size"],
                                                  device=a["device"])]
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "stores": paths, "rss_imports_mb": rss_imports,
            "rss_peak_mb": rss_peak_mb()}


# --- enspipe's trainer ----------------------------------------------------------------------

def task_enspipe_train(a: dict[str, Any]) -> dict[str, Any]:
    """enspipe.train.train() in mode clean / adv / ens-adv, exactly as the CLI runs it."""
    from enspipe.data import create_dataset
    from enspipe.train import TrainConfig, adversarial_inputs, train

    _import_store_backends()
    _warm_torch(a["arch"], torch.device(a["device"]), a["batch_size"])
    rss_imports = rss_peak_mb()
    create_dataset("mnist", data_root=a["data_root"], limit=a["limit"])  # decode outside the timer
    cfg = TrainConfig(model=a["arch"], dataset="mnist", data_root=a["data_root"], limit=a["limit"],
                      mode=a["mode"], shards=tuple(a.get("shards", ())), attack="fgsm", eps=a["eps"],
                      epochs=a["epochs"], batch_size=a["batch_size"], seed=a["seed"], device=a["device"],
                      log_every=10_000)
    steps = [0]
    max_steps = a.get("max_steps")

    def counted(*args: Any, **kwargs: Any):
        # train() calls its `adversarial` seam once per batch, so counting here counts steps.
        if max_steps is not None and steps[0] >= max_steps:
            raise _StopAfter
        steps[0] += 1
        return adversarial_inputs(*args, **kwargs)

    # With log_every above the batches of an epoch, the loop's one metrics record per epoch
    # covers the epoch loop alone (comparable with the peers' loops), beside train()'s
    # end-to-end time.
    clock = LoopClock()
    device = torch.device(a["device"])
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        train(cfg, a["run_dir"], stream_factory=clock.stream_factory, on_metrics=clock.on_metrics,
              adversarial=counted)
    except _StopAfter:
        pass
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    epochs = clock.records
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "steps": steps[0],
            "loop_seconds": sum(e["seconds"] for e in epochs), "loop_cpu_seconds": sum(e["cpu_s"] for e in epochs),
            "online_passes": sum(e["online_passes"] for e in epochs), "batches": sum(e["batches"] for e in epochs),
            "rss_imports_mb": rss_imports, "rss_peak_mb": rss_peak_mb(), "run_dir": a["run_dir"]}


# --- the reference code's pattern ---------------------------------------------------------

def task_reference_train(a: dict[str, Any]) -> dict[str, Any]:
    """Ensemble adversarial training as the reference code ran it: on every batch, the
    adversarial direction of *every* source (each static model and the trained model) is
    computed online; then the batch's source is drawn and only its direction is used.

    Built from enspipe's own pieces (the same BatchStream, attacks.direction, apply_direction,
    optimizer and model) so that the only difference from `ens-adv` is the online work.
    """
    from enspipe import attacks
    from enspipe.data import create_dataset
    from enspipe.models import create_model, load_model, save_model
    from enspipe.util.runtime import seed_everything
    from enspipe.train import BatchStream, TrainConfig

    device = torch.device(a["device"])
    _warm_torch(a["arch"], device, a["batch_size"])
    rss_imports = rss_peak_mb()
    ds = create_dataset("mnist", data_root=a["data_root"], limit=a["limit"])
    statics = [load_model(p).eval().requires_grad_(False).to(device) for p in a["statics"]]
    # mode "adv" makes the stream yield every batch with its n_adv and eps and no stored
    # directions: the sources are all computed below.
    cfg = TrainConfig(model=a["arch"], dataset="mnist", data_root=a["data_root"], limit=a["limit"], mode="adv",
                      attack="fgsm", eps=a["eps"], epochs=a["epochs"], batch_size=a["batch_size"], seed=a["seed"],
                      device=a["device"])
    seed_everything(cfg.seed)  # the same initial weights as enspipe's trainer
    model = create_model(a["arch"], num_classes=ds.num_classes, input_size=ds.geometry.shape).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    rng = np.random.default_rng(cfg.seed)
    max_steps, steps = a.get("max_steps"), 0
    t0, c0 = time.perf_counter(), time.process_time()
    for epoch in range(cfg.epochs):
        stream = BatchStream(ds, (), cfg, epoch=epoch)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
        model.train()
        for batch in loader:
            if max_steps is not None and steps >= max_steps:
                break
            x = batch["x"].to(device).float().div_(255.0)
            y = batch["y"].to(device)
            n = batch["n_adv"]
            # Every source, every batch: the static models in eval mode, the trained model in
            # training mode with its predicted label (as enspipe's online pass).
            dirs = [attacks.direction(s, x[:n], attack="fgsm", label="pred")[0] for s in statics]
            dirs.append(attacks.direction(model, x[:n], attack="fgsm", label="pred")[0])
            source = int(rng.integers(0, len(dirs)))
            x_adv = attacks.apply_direction(x[:n], dirs[source], batch["eps"].to(device))
            loss = F.cross_entropy(model(torch.cat([x_adv, x[n:]])), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    save_model(model, a["run_dir"], classes=list(ds.classes), provenance={"trained_by": "bench_peers reference"})
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "loop_seconds": seconds, "loop_cpu_seconds": cpu_seconds,
            "steps": steps, "rss_imports_mb": rss_imports, "rss_peak_mb": rss_peak_mb(), "run_dir": a["run_dir"]}


# --- ART's AdversarialTrainer -------------------------------------------------------------

def task_art_train(a: dict[str, Any]) -> dict[str, Any]:
    """ART's AdversarialTrainer: FGSM on the trained classifier + FGSM on each static one
    (which it precomputes over the whole training set, in memory), ratio 0.5."""
    from art.attacks.evasion import FastGradientMethod
    from art.defences.trainer import AdversarialTrainer
    from art.estimators.classification import PyTorchClassifier

    from enspipe.models import create_model, load_model, save_model
    from enspipe.util.runtime import seed_everything

    device = torch.device(a["device"])
    device_type = "gpu" if device.type == "cuda" else "cpu"
    shape = (1, 28, 28)
    seed_everything(a["seed"])  # the same initial weights as enspipe's trainer
    model = create_model(a["arch"], num_classes=10, input_size=shape).to(device)
    ce = torch.nn.CrossEntropyLoss()
    clf = PyTorchClassifier(model=model, loss=ce, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                            input_shape=shape, nb_classes=10, clip_values=(0.0, 1.0), device_type=device_type)
    statics = [PyTorchClassifier(model=load_model(p).eval().to(device), loss=ce, input_shape=shape, nb_classes=10,
                                 clip_values=(0.0, 1.0), device_type=device_type) for p in a["statics"]]
    _warm_torch(a["arch"], device, a["batch_size"])
    rss_imports = rss_peak_mb()

    # ART takes the training set as one in-memory float array (its API: fit(x, y)).
    x, y = _mnist_first(a["data_root"], a["limit"])
    classes = [str(k) for k in range(10)]

    attacks_ = [FastGradientMethod(clf, eps=a["eps"], batch_size=a["batch_size"])]
    attacks_ += [FastGradientMethod(s, eps=a["eps"], batch_size=a["precompute_batch_size"]) for s in statics]
    precompute_s = [0.0, 0.0]  # wall, CPU
    for atk in attacks_[1:]:
        # AdversarialTrainer calls a static attack's generate() only in its precompute phase,
        # so timing those calls splits fit() into precompute + epochs.
        atk.generate = _timed(atk.generate, precompute_s)

    steps, max_steps = [0], a.get("max_steps")
    fit = clf.fit

    def counted_fit(*args: Any, **kwargs: Any):
        if max_steps is not None and steps[0] >= max_steps:
            raise _StopAfter
        steps[0] += 1
        return fit(*args, **kwargs)

    clf.fit = counted_fit  # AdversarialTrainer calls classifier.fit once per batch
    trainer = AdversarialTrainer(clf, attacks_, ratio=0.5)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        trainer.fit(x, y, batch_size=a["batch_size"], nb_epochs=a["epochs"])
    except _StopAfter:
        pass
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if a.get("run_dir"):
        save_model(model, a["run_dir"], classes=classes, provenance={"trained_by": "bench_peers ART"})
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "precompute_seconds": precompute_s[0],
            "precompute_cpu_seconds": precompute_s[1], "loop_seconds": seconds - precompute_s[0],
            "loop_cpu_seconds": cpu_seconds - precompute_s[1], "steps": steps[0],
            "rss_imports_mb": rss_imports, "rss_peak_mb": rss_peak_mb(), "run_dir": a.get("run_dir")}


def _timed(fn: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    """fn, adding its wall time to acc[0] and its CPU time to acc[1]."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t0
            acc[1] += time.process_time() - c0
    return wrapper


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "setup": task_setup,
    "precompute": task_precompute,
    "enspipe_train": task_enspipe_train,
    "reference_train": task_reference_train,
    "art_train": task_art_train,
}


def main(argv: list[str]) -> int:
    task, args_path, result_path = argv
    args = json.loads(Path(args_path).read_text())
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    result = TASKS[task](args)
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
