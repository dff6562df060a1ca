"""Job specs: a TOML file of experiments, run as a graph of cached steps.

A spec names models to train, stores to precompute from them, evaluations, diagnostics
and a report:

    [job]       name, description, include = ["other.toml"]   (included tables merge first)
    [data]      dataset, data_root, train_limit, test_limit
    [budget]    limit, test_limit, epochs | epoch_scale        (reduced scale for a CPU)
    [defaults]  any training option applied to every model
    [models.NAME]    arch, mode (clean|adv|ens-adv), stores = [...], seed, epochs, ...
    [stores.NAME]    model, attack, label, format, shard_size
    [evaluate.NAME]  targets, sources, attacks, eps, ensemble_source, limit, binarized,
                     binarized_masked;  [evaluate.NAME.options] rand_fgsm = { alpha = 0.05 }
    [diagnose.NAME]  models, other, eps, limit
    [report]         paper (a key of enspipe.report's paper tables)

Every step's key hashes its own resolved options and the keys of the steps it uses, so
a step whose inputs did not change is reused from the cache (a second run, or another
job sharing a static model and dataset), and one whose inputs changed runs again. The
cache lives under `--cache` (default $ENSPIPE_CACHE or ~/.cache/enspipe) and is shared
between jobs; each job's own outputs (results, report) go under `--out`.

Parsing is strict: unknown keys, wrong types and dangling references are errors naming
the file and line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from enspipe.errors import ConfigError

STEP_KINDS = ("models", "stores", "evaluate", "diagnose")

# Allowed keys per table, with their types: strict parsing.
_STR, _INT, _FLOAT, _BOOL, _LIST = str, int, (int, float), bool, list
SCHEMA: dict[str, dict[str, Any]] = {
    "job": {"name": _STR, "description": _STR, "include": _LIST},
    "data": {"dataset": _STR, "data_root": _STR, "train_limit": _INT, "test_limit": _INT, "image_size": _INT},
    "budget": {"limit": _INT, "test_limit": _INT, "epochs": _INT, "epoch_scale": _FLOAT, "note": _STR},
    "report": {"paper": _STR, "title": _STR},
}
TRAIN_KEYS: dict[str, Any] = {
    "arch": _STR, "mode": _STR, "stores": _LIST, "seed": _INT, "epochs": _INT, "batch_size": _INT,
    "optimizer": _STR, "lr": _FLOAT, "lr_decay": _FLOAT, "lr_decay_every": _INT, "eps": (str, int, float),
    "eps_dist": _STR, "adv_fraction": _FLOAT, "attack": _STR, "augment": _STR, "weights": _STR,
    "description": _STR, "workers": _INT, "pretrained": _BOOL,
    "adv_loss": _STR, "adv_weight": _FLOAT,
}
STEP_SCHEMA: dict[str, dict[str, Any]] = {
    "models": TRAIN_KEYS,
    "stores": {"model": _STR, "attack": _STR, "label": _STR, "format": _STR, "shard_size": _INT,
               "batch_size": _INT, "description": _STR},
    "evaluate": {"targets": _LIST, "sources": _LIST, "attacks": _LIST, "eps": (str, int, float),
                 "ensemble_source": _BOOL, "limit": _INT, "batch_size": _INT, "binarized": _LIST,
                 "description": _STR, "binarized_masked": _LIST, "options": dict},
    "diagnose": {"models": _LIST, "other": _STR, "eps": (str, int, float), "limit": _INT,
                 "steps": _INT, "subspace_points": _INT, "description": _STR},
}
DEFAULTS_KEYS = {k: v for k, v in TRAIN_KEYS.items() if k not in ("arch", "stores", "description", "pretrained")}


@dataclass
class Step:
    kind: str                      # models | stores | evaluate | diagnose
    name: str
    options: dict[str, Any]
    deps: list[tuple[str, str]] = field(default_factory=list)   # (kind, name)
    key: str = ""

    @property
    def id(self) -> str:
        return f"{self.kind}.{self.name}"


@dataclass
class Job:
    path: Path
    name: str
    description: str
    data: dict[str, Any]
    budget: dict[str, Any]
    report: dict[str, Any]
    steps: list[Step]              # topological order


# --- Parsing ------------------------------------------------------------------------------

def _line_of(text: str, table: str, key: str | None = None) -> int | None:
    """The line where `[table]` (or `key` inside it) is written, for error messages."""
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*" + re.escape(table).replace(r"\.", r"\s*\.\s*") + r"\s*\]\s*(#.*)?$")
    for i, line in enumerate(lines):
        if header.match(line):
            if key is None:
                return i + 1
            for j in range(i + 1, len(lines)):
                if lines[j].lstrip().startswith("["):
                    break
                if re.match(r"^\s*" + re.escape(key) + r"\s*=", lines[j]):
                    return j + 1
            return i + 1
    return None


class _Spec:
    """The merged TOML of a spec and its includes, with the text kept for line numbers."""

    def __init__(self, path: Path, stack: tuple[Path, ...] = ()):
        path = path.resolve()
        if path in stack:
            chain = " -> ".join(p.name for p in (*stack, path))
            raise ConfigError(f"{stack[-1]}: include loop: {chain}")
        if not path.is_file():
            where = f"{stack[-1]}: " if stack else ""
            raise ConfigError(f"{where}job spec {path} does not exist")
        self.path = path
        self.text = path.read_text()
        try:
            raw = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
        self.sources: dict[str, Path] = {}   # table -> the file that defines it
        merged: dict[str, Any] = {}
        includes = raw.get("job", {}).get("include", [])
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            raise ConfigError(self.where("job", "include") + "include must be a list of paths")
        self.children = [_Spec(path.parent / inc, (*stack, path)) for inc in includes]
        for child in self.children:
            _merge(merged, child.raw)
            self.sources.update(child.sources)
        _merge(merged, raw)
        for table, value in raw.items():
            if isinstance(value, dict) and table in STEP_KINDS:
                for name in value:
                    self.sources[f"{table}.{name}"] = path
            self.sources[table] = path
        self.raw = merged

    def where(self, table: str, key: str | None = None) -> str:
        path = self.sources.get(table, self.path)
        text = self.text if path == self.path else path.read_text()
        line = _line_of(text, table, key)
        return f"{path}:{line}: " if line else f"{path}: "


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _check_table(spec: _Spec, table: str, values: Any, schema: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(spec.where(table) + f"[{table}] must be a table")
    for k, v in values.items():
        if k not in schema:
            raise ConfigError(spec.where(table, k) + f"unknown key {k!r} in [{table}] "
                              f"(allowed: {', '.join(sorted(schema))})")
        want = schema[k]
        if isinstance(v, bool) and want is not _BOOL and (want is _INT or want == _FLOAT):
            raise ConfigError(spec.where(table, k) + f"{table}.{k} must be a number, not a boolean")
        if not isinstance(v, want):
            names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ConfigError(spec.where(table, k) + f"{table}.{k} must be {names}, not {type(v).__name__}")
        if want is _LIST and not all(isinstance(i, str) for i in v):
            raise ConfigError(spec.where(table, k) + f"{table}.{k} must be a list of strings")
    return dict(values)


def load_job(path: str | os.PathLike) -> Job:
    """Parse and validate a job spec (and its includes); resolve the step graph."""
    spec = _Spec(Path(path))
    raw = dict(spec.raw)
    tables: dict[str, dict[str, Any]] = {}
    for table in raw:
        if table not in SCHEMA and table not in STEP_KINDS and table != "defaults":
            raise ConfigError(spec.where(table) + f"unknown table [{table}] (allowed: "
                              f"{', '.join([*SCHEMA, 'defaults', *STEP_KINDS])})")
    for table, schema in SCHEMA.items():
        tables[table] = _check_table(spec, table, raw.get(table, {}), schema)
    defaults = _check_table(spec, "defaults", raw.get("defaults", {}), DEFAULTS_KEYS)
    job_name = tables["job"].get("name") or Path(path).stem
    if "dataset" not in tables["data"]:
        raise ConfigError(spec.where("data") + "[data] needs a dataset (e.g. dataset = \"digits\")")

    steps: dict[str, Step] = {}
    for kind in STEP_KINDS:
        entries = raw.get(kind, {})
        if not isinstance(entries, dict):
            raise ConfigError(spec.where(kind) + f"[{kind}] must hold named tables like [{kind}.NAME]")
        for name, options in entries.items():
            table = f"{kind}.{name}"
            opts = _check_table(spec, table, options, STEP_SCHEMA[kind])
            if kind == "models":
                opts = {**defaults, **opts}
                if "arch" not in opts:
                    raise ConfigError(spec.where(table) + f"[{table}] needs arch (e.g. arch = \"A\")")
            steps[table] = Step(kind, name, opts)

    def ref(step: Step, key: str, kind: str, value: str) -> None:
        if f"{kind}.{value}" not in steps:
            raise ConfigError(spec.where(step.id, key) + f"{step.id}.{key} names {value!r}, "
                              f"but there is no [{kind}.{value}]")
        step.deps.append((kind, value))

    for step in steps.values():
        o = step.options
        if step.kind == "models":
            for s in o.get("stores", []):
                ref(step, "stores", "stores", s)
            if o.get("mode", "clean") == "ens-adv" and not o.get("stores"):
                raise ConfigError(spec.where(step.id, "mode") + f"{step.id} is ens-adv but lists no stores")
        elif step.kind == "stores":
            if "model" not in o:
                raise ConfigError(spec.where(step.id) + f"[{step.id}] needs model = \"NAME\"")
            ref(step, "model", "models", o["model"])
        elif step.kind == "evaluate":
            if not o.get("targets"):
                raise ConfigError(spec.where(step.id) + f"[{step.id}] needs targets = [...]")
            for key in ("targets", "sources", "binarized", "binarized_masked"):
                for m in o.get(key, []):
                    ref(step, key, "models", m)
        elif step.kind == "diagnose":
            if not o.get("models"):
                raise ConfigError(spec.where(step.id) + f"[{step.id}] needs models = [...]")
            for m in o["models"]:
                ref(step, "models", "models", m)
            if "other" in o:
                ref(step, "other", "models", o["other"])
        _validate_values(spec, step)
    order = _toposort(spec, steps)
    return Job(Path(path), job_name, tables["job"].get("description", ""), tables["data"],
               tables["budget"], tables["report"], order)


def _validate_values(spec: _Spec, step: Step) -> None:
    """Check option values early (names, ranges) so a bad spec fails before any work."""
    from enspipe.attacks import ATTACKS, attack_option_strings, parse_attack_options, parse_eps
    from enspipe.errors import EnspipeError

    o = step.options
    key = None  # the option being checked, so the error names its line
    try:
        if "eps" in o:
            key = "eps"
            o["eps"] = parse_eps(o["eps"])
        key = "attacks"
        for a in o.get("attacks", []):
            if a not in ATTACKS:
                raise ConfigError(f"unknown attack {a!r} (use {', '.join(ATTACKS)})")
        if "options" in o:
            key = "options"
            parse_attack_options(attack_option_strings(o["options"]), eps=o.get("eps", 0.3),
                                 attacks=o.get("attacks", ["fgsm"]))
        if step.kind == "models":
            from enspipe.models import check_model_name
            from enspipe.train import TrainConfig

            key = "arch"
            check_model_name(o["arch"])
            key = None
            TrainConfig(model=o["arch"], **_train_fields(o, shards=("x",) if o.get("mode") == "ens-adv" else ()))
        if step.kind == "stores":
            key = "attack"
            if o.get("attack", "fgsm") not in ("fgsm", "step_ll"):
                raise ConfigError(f"attack must be fgsm or step_ll, not {o['attack']!r}")
            key = "format"
            if o.get("format", "zarr") not in ("zarr", "wds"):
                raise ConfigError(f"format must be zarr or wds, not {o['format']!r}")
    except EnspipeError as e:
        raise ConfigError(spec.where(step.id, key if key in o else None) + f"[{step.id}]: {e}") from None


def _train_fields(o: dict[str, Any], **extra: Any) -> dict[str, Any]:
    skip = {"arch", "stores", "description", "pretrained"}
    return {**{k: v for k, v in o.items() if k not in skip}, **extra}


def _toposort(spec: _Spec, steps: dict[str, Step]) -> list[Step]:
    order: list[Step] = []
    state: dict[str, int] = {}

    def visit(sid: str, chain: tuple[str, ...]) -> None:
        if state.get(sid) == 2:
            return
        if state.get(sid) == 1:
            raise ConfigError(spec.where(sid) + "dependency cycle: " + " -> ".join((*chain, sid)))
        state[sid] = 1
        for kind, name in steps[sid].deps:
            visit(f"{kind}.{name}", (*chain, sid))
        state[sid] = 2
        order.append(steps[sid])

    for sid in steps:
        visit(sid, ())
    return order


# --- Keys and the cache -------------------------------------------------------------------

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def resolve_keys(job: Job) -> None:
    """Give each step a key from its resolved options, the data and its dependencies' keys."""
    keys: dict[str, str] = {}
    for step in job.steps:
        step.key = _hash({"kind": step.kind, "options": _resolved(job, step),
                          "deps": sorted(keys[f"{k}.{n}"] for k, n in set(step.deps)),
                          "schema": 1})
        keys[step.id] = step.key


def _resolved(job: Job, step: Step) -> dict[str, Any]:
    """The options that determine a step's output, after [data] and [budget] are applied."""
    data, budget = job.data, job.budget
    o = dict(step.options)
    o.pop("description", None)
    if data.get("image_size"):
        o["image_size"] = data["image_size"]
    if step.kind in ("models", "stores"):
        o["dataset"] = data["dataset"]
        o["data_root"] = data.get("data_root")
        o["limit"] = budget.get("limit", data.get("train_limit"))
        if step.kind == "models" and "epochs" in budget:
            o["epochs"] = budget["epochs"]
        elif step.kind == "models" and "epoch_scale" in budget:
            o["epochs"] = max(1, math.ceil(o.get("epochs", 6) * budget["epoch_scale"]))
        o.pop("workers", None)  # speed only
    else:
        o["dataset"] = data["dataset"]
        o["data_root"] = data.get("data_root")
        o["limit"] = o.get("limit", budget.get("test_limit", data.get("test_limit")))
    return o


def default_cache() -> Path:
    return Path(os.environ.get("ENSPIPE_CACHE", Path.home() / ".cache" / "enspipe"))


def _record_path(cache: Path, step: Step) -> Path:
    return cache / "steps" / f"{step.kind}-{step.name}-{step.key[:16]}.json"


def plan(job: Job, cache: Path) -> list[tuple[Step, str]]:
    """Each step with 'reuse' (its cached output exists) or 'run'."""
    resolve_keys(job)
    out = []
    for step in job.steps:
        rec = _record_path(cache, step)
        out.append((step, "reuse" if rec.exists() and _outputs_exist(json.loads(rec.read_text())) else "run"))
    return out


def _outputs_exist(record: dict[str, Any]) -> bool:
    return all(Path(p).exists() for p in record.get("outputs", {}).values())


# --- Running ------------------------------------------------------------------------------

def run_job(path: str | os.PathLike, *, out: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
            dry_run: bool = False, device: str = "auto", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or with dry_run only plan) a job spec; return {step id: status/outputs}."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    job = load_job(path)
    cache = Path(cache) if cache else default_cache()
    out_dir = Path(out) if out else Path("runs") / job.name
    steps = plan(job, cache)
    log(f"job {job.name}: {len(steps)} steps (cache {cache}, out {out_dir})")
    width = max(len(s.id) for s, _ in steps) if steps else 0
    for step, status in steps:
        deps = ", ".join(dict.fromkeys(f"{k}.{n}" for k, n in step.deps))
        log(f"  {status:<6} {step.id:<{width}} key {step.key[:12]}" + (f"  <- {deps}" if deps else ""))
    if dry_run:
        return {s.id: {"status": st, "key": s.key} for s, st in steps}

    from enspipe.runtime import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    pending = [step for step, _ in steps]
    waiting_since: float | None = None
    while pending:
        # The first step whose inputs are ready and that no other process is running: two
        # jobs sharing a cache never build the same step twice; the second waits or moves on.
        for step in pending:
            if any(f"{k}.{n}" not in done for k, n in step.deps):
                continue
            with _step_lock(cache, step) as locked:
                if not locked:
                    continue
                done[step.id] = _run_or_reuse(job, step, done, cache, out_dir, device, log)
            _publish(step, done[step.id], out_dir)
            pending.remove(step)
            waiting_since = None
            break
        else:
            if waiting_since is None:
                waiting_since = time.monotonic()
                log(f"waiting for another process running {', '.join(s.id for s in pending[:3])} ...")
            time.sleep(1.0)
    from enspipe.report import write_report

    report = write_report(out_dir, paper=job.report.get("paper"), title=job.report.get("title"))
    log(f"report: {report}")
    summary = {"job": job.name, "out": str(out_dir), "report": str(report),
               "steps": {sid: {"key": r["key"], "outputs": r["outputs"], "seconds": r.get("seconds")}
                         for sid, r in done.items()}}
    write_json(out_dir / "job.json", summary)
    return summary


@contextlib.contextmanager
def _step_lock(cache: Path, step: Step) -> Iterator[bool]:
    """A non-blocking advisory lock on one step of the shared cache (released on exit or
    when the process dies, so a killed job never leaves a stale lock)."""
    import fcntl

    path = _record_path(cache, step).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_or_reuse(job: Job, step: Step, done: dict[str, dict], cache: Path, out_dir: Path, device: str,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Reuse the step's cached record (re-read under the lock: another job may just have
    written it) or run the step and record its outputs."""
    from enspipe.runtime import write_json

    rec_path = _record_path(cache, step)
    if rec_path.exists():
        record = json.loads(rec_path.read_text())
        if _outputs_exist(record):
            log(f"reused {step.id} ({step.key[:12]})")
            return record
    log(f"running {step.id} ...")
    t0 = time.perf_counter()
    outputs = _RUNNERS[step.kind](job, step, done, cache, out_dir, device)
    seconds = time.perf_counter() - t0
    record = {"step": step.id, "key": step.key, "options": _resolved(job, step), "outputs": outputs,
              "seconds": round(seconds, 2)}
    write_json(rec_path, record)
    log(f"done {step.id} in {seconds:.1f} s")
    return record


def _publish(step: Step, record: dict[str, Any], out_dir: Path) -> None:
    """Show a step's cached output in the job's output folder: models and stores as links
    (they are large), results and diagnostics as copies (small; the report reads them)."""
    import shutil

    target = Path(next(iter(record["outputs"].values())))
    dest = out_dir / step.kind / step.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if step.kind in ("evaluate", "diagnose"):
        if target.parent.resolve() != dest.resolve():
            shutil.copytree(target.parent, dest, dirs_exist_ok=True)
        return
    if dest.is_symlink() or dest.exists():
        if dest.is_symlink() and Path(os.readlink(dest)) == target:
            return
        dest.unlink()
    dest.symlink_to(target, target_is_directory=True)


def _run_model(job: Job, step: Step, done: dict[str, dict], cache: Path, out_dir: Path, device: str) -> dict:
    from enspipe.train import TrainConfig, train

    o = _resolved(job, step)
    run_dir = cache / "runs" / f"{step.name}-{step.key[:16]}"
    if o.get("pretrained"):
        # A static model used as published (hub weights): saved once as a checkpoint.
        from enspipe.models import save_model

        save_model(published_model(o), run_dir, provenance={"pretrained": True})
        return {"run": str(run_dir)}
    shards = tuple(done[f"stores.{s}"]["outputs"]["store"] for s in step.options.get("stores", []))
    fields_ = _train_fields(o, shards=shards)
    fields_.setdefault("workers", step.options.get("workers", 0))
    cfg = TrainConfig(model=o["arch"], device=device, **fields_)
    resume = (run_dir / "config.json").exists()
    train(cfg, run_dir, resume=resume)
    return {"run": str(run_dir)}


def published_model(o: dict[str, Any], *, pretrained: bool = True) -> Any:
    """The model a `pretrained = true` step stands for (resolved options `o`): its arch with
    the hub's ImageNet weights, built for the job's image size so that later steps' geometry
    checks pass (a ResNet's own 224 px is not the 299 px of an Inception job). Tests build it
    with pretrained=False: the same construction offline, with random weights."""
    from enspipe.models import create_model

    size = o.get("image_size")
    return create_model(o["arch"], num_classes=1000, pretrained=pretrained,
                        input_size=(3, size, size) if size else None)


def _run_store(job: Job, step: Step, done: dict[str, dict], cache: Path, out_dir: Path, device: str) -> dict:
    from enspipe.precompute import PrecomputeConfig, precompute

    o = _resolved(job, step)
    model_run = done[f"models.{o['model']}"]["outputs"]["run"]
    cfg = PrecomputeConfig(model=model_run, dataset=o["dataset"], data_root=o["data_root"], limit=o["limit"],
                           attacks=(o.get("attack", "fgsm"),), label=o.get("label", "pred"),
                           out=str(cache / "stores"), fmt=o.get("format", "zarr"),
                           shard_size=o.get("shard_size", 1024), batch_size=o.get("batch_size", 256),
                           image_size=o.get("image_size"), device=device)
    (path,) = precompute(cfg)
    return {"store": str(path)}


def _run_evaluate(job: Job, step: Step, done: dict[str, dict], cache: Path, out_dir: Path, device: str) -> dict:
    from enspipe.attacks import attack_option_strings
    from enspipe.evaluate import EvalConfig, evaluate

    o = _resolved(job, step)
    run = lambda n: done[f"models.{n}"]["outputs"]["run"]  # noqa: E731
    targets = ([run(t) for t in o["targets"]] + [f"binarized:{run(t)}" for t in o.get("binarized", [])]
               + [f"binarized-masked:{run(t)}" for t in o.get("binarized_masked", [])])
    cfg = EvalConfig(models=tuple(targets), sources=tuple(run(s) for s in o.get("sources", [])),
                     dataset=o["dataset"], data_root=o["data_root"], limit=o["limit"], split="test",
                     attacks=tuple(o.get("attacks", ["fgsm"])), eps=o.get("eps", 0.3),
                     ensemble_source=o.get("ensemble_source", False), batch_size=o.get("batch_size", 256),
                     image_size=o.get("image_size"),
                     device=device, names=_names(done, o),
                     attack_options=attack_option_strings(o.get("options", {})))
    dest = cache / "evaluate" / f"{step.name}-{step.key[:16]}"
    res = evaluate(cfg, dest)
    return {"results": res["path"]}


def _names(done: dict[str, dict], o: dict[str, Any]) -> dict[str, str]:
    """Readable model names in tables: the spec's model names instead of cache paths."""
    names = {}
    for key in ("targets", "sources", "binarized", "binarized_masked"):
        for n in o.get(key, []):
            path = done[f"models.{n}"]["outputs"]["run"]
            names[path] = n
            names[f"binarized:{path}"] = f"{n}+binarized"
            names[f"binarized-masked:{path}"] = f"{n}+binarized-masked"
    return names


def _run_diagnose(job: Job, step: Step, done: dict[str, dict], cache: Path, out_dir: Path, device: str) -> dict:
    from enspipe.diagnostics import run_diagnose

    o = _resolved(job, step)
    run = lambda n: done[f"models.{n}"]["outputs"]["run"]  # noqa: E731
    dest = cache / "diagnose" / f"{step.name}-{step.key[:16]}"
    path = run_diagnose({m: run(m) for m in o["models"]}, other=run(o["other"]) if "other" in o else None,
                        dataset=o["dataset"], data_root=o["data_root"], limit=o["limit"] or 500,
                        eps=o.get("eps", 0.3), out_dir=dest, device=device, image_size=o.get("image_size"),
                        **{k: o[k] for k in ("steps", "subspace_points") if k in o})
    return {"diagnostics": str(path)}


_RUNNERS = {"models": _run_model, "stores": _run_store, "evaluate": _run_evaluate, "diagnose": _run_diagnose}
