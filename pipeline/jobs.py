"""Job specs: a TOML file of experiments, run as a graph of cached steps.

(Over 400 lines on purpose: parsing, keys and the four step runners read one spec format;
the cache and publishing live in `enspipe.jobcache`.)

A spec names models to train, stores to precompute from them, evaluations, diagnostics
and a report:

    [job]       name, description, include = ["other.toml"]   (included tables merge first)
    [data]      dataset, data_root, train_limit, test_limit, image_size
    [budget]    limit, test_limit, epochs | epoch_scale        (reduced scale for a CPU)
    [defaults]  any training option applied to every model
    [models.NAME]    arch, shards = [STORE STEPS], train, + any TrainConfig field
    [stores.NAME]    model = MODEL STEP, attack, + any PrecomputeConfig field
    [evaluate.NAME]  targets, sources, binarized = [MODEL STEPS], + any EvalConfig field
    [diagnose.NAME]  models, other = MODEL STEPS, + any DiagnoseConfig field
    [report]         paper (a key of enspipe.report's paper tables), title

A step's keys are its stage's config fields (`enspipe.config`): the same names, types and
defaults as the command line's flags (`adv_fraction` is `--adv-fraction`), except where the
job supplies a field itself: the data ([data] / [budget]), the device and the output
location (`enspipe run --device / --out / --cache`), and the models and stores a step uses,
which are other steps' names. Old names are accepted as aliases: `stores` for `shards`,
`workers` for `loader_workers`, `attack` for a store step's one attack.

Every step's key hashes its own resolved options and the keys of the steps it uses, so
a step whose inputs did not change is reused from the cache (a second run, or another
job sharing a static model and dataset), and one whose inputs changed runs again. The
cache lives under `--cache` (default $ENSPIPE_CACHE or ~/.cache/enspipe) and is shared
between jobs; each job's outputs are published under `--out` as real files.

Parsing is strict: unknown keys, wrong types, dangling references and names that are not
safe as paths are errors naming the file and line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from enspipe.config import Option, OptionError, config_defaults, job_keys, parse_config, speak, toml_line
from enspipe.errors import ConfigError, EnspipeError
from enspipe.jobcache import default_cache, is_cache_link, publish, register_job, step_lock
from enspipe.naming import check_name

__all__ = ["Job", "Step", "default_cache", "load_job", "plan", "run_job"]

STEP_KINDS = ("models", "stores", "evaluate", "diagnose")

# The job-level tables, with their types: strict parsing.
_STR, _INT, _FLOAT, _BOOL, _LIST = str, int, (int, float), bool, list
SCHEMA: dict[str, dict[str, Any]] = {
    "job": {"name": _STR, "description": _STR, "include": _LIST},
    "data": {"dataset": _STR, "data_root": _STR, "train_limit": _INT, "test_limit": _INT, "image_size": _INT},
    "budget": {"limit": _INT, "test_limit": _INT, "epochs": _INT, "epoch_scale": _FLOAT, "note": _STR},
    "report": {"paper": _STR, "title": _STR},
}

# Job-only keys of each step kind: key -> (the config field it fills or None, its type, the
# kind of step its values name or None).
STRUCTURE: dict[str, dict[str, tuple[str | None, type, str | None]]] = {
    "models": {"arch": ("model", str, None), "shards": ("shards", list, "stores"), "train": (None, bool, None),
               "description": (None, str, None)},
    "stores": {"model": ("model", str, "models"), "description": (None, str, None)},
    "evaluate": {"targets": ("models", list, "models"), "sources": ("sources", list, "models"),
                 "binarized": ("binarized", list, "models"), "description": (None, str, None)},
    "diagnose": {"models": ("models", list, "models"), "other": ("other", str, "models"),
                 "description": (None, str, None)},
}
ALIASES: dict[str, dict[str, str]] = {"models": {"stores": "shards", "workers": "loader_workers"},
                                      "stores": {"attack": "attacks"}, "evaluate": {}, "diagnose": {}}
SPEED_ONLY = {"loader_workers", "dask_workers", "scheduler"}  # never part of a step's key


def step_configs() -> dict[str, type]:
    """The config class of each step kind."""
    from enspipe.diagnostics.stage import DiagnoseConfig
    from enspipe.evaluate import EvalConfig
    from enspipe.precompute.config import PrecomputeConfig
    from enspipe.train import TrainConfig

    return {"models": TrainConfig, "stores": PrecomputeConfig, "evaluate": EvalConfig, "diagnose": DiagnoseConfig}


def step_keys(kind: str) -> set[str]:
    """Every key a `[KIND.NAME]` table accepts (aliases not included)."""
    return set(STRUCTURE[kind]) | job_keys(step_configs()[kind])


def defaults_keys() -> set[str]:
    """What `[defaults]` may set for every model."""
    return job_keys(step_configs()["models"]) - {"shards", "pretrained"}


@dataclass
class Step:
    kind: str                      # models | stores | evaluate | diagnose
    name: str
    options: dict[str, Any]        # canonical keys
    deps: list[tuple[str, str]] = field(default_factory=list)   # (kind, name)
    key: str = ""
    written: dict[str, str] = field(default_factory=dict)       # canonical key -> the key as written
    origin: dict[str, str] = field(default_factory=dict)        # key -> "defaults" when it came from there

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
        self.sources: dict[tuple[str, ...], Path] = {}   # table -> the file that defines it
        merged: dict[str, Any] = {}
        includes = raw.get("job", {}).get("include", [])
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            raise ConfigError(self.where(("job",), "include") + "include must be a list of paths")
        self.children = [_Spec(path.parent / inc, (*stack, path)) for inc in includes]
        for child in self.children:
            _merge(merged, child.raw)
            self.sources.update(child.sources)
        _merge(merged, raw)
        for table, value in raw.items():
            if isinstance(value, dict) and table in STEP_KINDS:
                for name in value:
                    self.sources[(table, name)] = path
            self.sources[(table,)] = path
        self.raw = merged

    def where(self, table: tuple[str, ...], key: str | None = None) -> str:
        """'FILE:LINE: ' of `[table]` (or its `key`), for messages."""
        path = self.sources.get(table, self.path)
        text = self.text if path == self.path else path.read_text()
        line = toml_line(text, table, key)
        return f"{path}:{line}: " if line else f"{path}: "


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _check_table(spec: _Spec, table: tuple[str, ...], values: Any, schema: dict[str, Any]) -> dict[str, Any]:
    name = ".".join(table)
    if not isinstance(values, dict):
        raise ConfigError(spec.where(table) + f"[{name}] must be a table")
    for k, v in values.items():
        if k not in schema:
            raise ConfigError(spec.where(table, k) + f"unknown key {k!r} in [{name}] "
                              f"(allowed: {', '.join(sorted(schema))})")
        want = schema[k]
        if isinstance(v, bool) and want is not _BOOL and (want is _INT or want == _FLOAT):
            raise ConfigError(spec.where(table, k) + f"{name}.{k} must be a number, not a boolean")
        if not isinstance(v, want):
            names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ConfigError(spec.where(table, k) + f"{name}.{k} must be {names}, not {type(v).__name__}")
        if want is _LIST and not all(isinstance(i, str) for i in v):
            raise ConfigError(spec.where(table, k) + f"{name}.{k} must be a list of strings")
    return dict(values)


def _canonical(spec: _Spec, table: tuple[str, ...], kind: str, values: Any,
               allowed: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """A step table's options under their canonical keys, and each key as it was written.
    Unknown keys and structure keys of the wrong type are errors naming FILE:LINE."""
    name = ".".join(table)
    if not isinstance(values, dict):
        raise ConfigError(spec.where(table) + f"[{name}] must be a table")
    out: dict[str, Any] = {}
    written: dict[str, str] = {}
    for k, v in values.items():
        key = ALIASES[kind].get(k, k)
        if key not in allowed:
            raise ConfigError(spec.where(table, k) + f"unknown key {k!r} in [{name}] "
                              f"(allowed: {', '.join(sorted(allowed))})")
        if key in written:
            raise ConfigError(spec.where(table, k) + f"{name}: {k} and {written[key]} are one option; keep one")
        if kind == "stores" and key == "attacks" and isinstance(v, str):
            v = [v]  # `attack = "fgsm"`: a store step's one attack
        if key in STRUCTURE[kind]:
            want = STRUCTURE[kind][key][1]
            if not isinstance(v, want) or want is list and not all(isinstance(i, str) for i in v):
                what = "a list of step names" if want is list else want.__name__
                raise ConfigError(spec.where(table, k) + f"{name}.{k} must be {what}, not {type(v).__name__}")
        out[key], written[key] = v, k
    return out, written


def load_job(path: str | os.PathLike) -> Job:
    """Parse and validate a job spec (and its includes); resolve the step graph."""
    spec = _Spec(Path(path))
    raw = dict(spec.raw)
    tables: dict[str, dict[str, Any]] = {}
    for table in raw:
        if table not in SCHEMA and table not in STEP_KINDS and table != "defaults":
            raise ConfigError(spec.where((table,)) + f"unknown table [{table}] (allowed: "
                              f"{', '.join([*SCHEMA, 'defaults', *STEP_KINDS])})")
    for table, schema in SCHEMA.items():
        tables[table] = _check_table(spec, (table,), raw.get(table, {}), schema)
    defaults, defaults_written = _canonical(spec, ("defaults",), "models", raw.get("defaults", {}), defaults_keys())
    job_name = tables["job"].get("name") or Path(path).stem
    try:
        check_name(job_name, "job name")  # it names the default output folder runs/NAME
    except ConfigError as e:
        raise ConfigError(spec.where(("job",), "name") + str(e)) from None
    if "dataset" not in tables["data"]:
        raise ConfigError(spec.where(("data",)) + "[data] needs a dataset (e.g. dataset = \"digits\")")

    steps: dict[str, Step] = {}
    for kind in STEP_KINDS:
        entries = raw.get(kind, {})
        if not isinstance(entries, dict):
            raise ConfigError(spec.where((kind,)) + f"[{kind}] must hold named tables like [{kind}.NAME]")
        allowed = step_keys(kind)
        for name, options in entries.items():
            try:
                check_name(name, "step name")  # it becomes a folder under --out and --cache
            except ConfigError as e:
                raise ConfigError(spec.where((kind, name)) + f"[{kind}.{name!r}]: {e}") from None
            table = (kind, name)
            opts, written = _canonical(spec, table, kind, options, allowed)
            step = Step(kind, name, opts, written=written)
            if kind == "models":
                step.origin = {k: "defaults" for k in defaults if k not in opts}
                step.written = {**defaults_written, **written}
                step.options = {**defaults, **opts}
                if "arch" not in step.options:
                    raise ConfigError(spec.where(table) + f"[{kind}.{name}] needs arch (e.g. arch = \"A\")")
            steps[step.id] = step

    def ref(step: Step, key: str, kind: str, value: str) -> None:
        if f"{kind}.{value}" not in steps:
            raise ConfigError(spec.where((step.kind, step.name), step.written.get(key, key))
                              + f"{step.id}.{step.written.get(key, key)} names {value!r}, "
                              f"but there is no [{kind}.{value}]")
        step.deps.append((kind, value))

    for step in steps.values():
        o = step.options
        for key, (_, want, target) in STRUCTURE[step.kind].items():
            if target is not None and key in o:
                for value in (o[key] if want is list else [o[key]]):
                    ref(step, key, target, value)
        if step.kind == "models" and o.get("mode", "clean") == "ens-adv" and not o.get("shards"):
            raise ConfigError(spec.where((step.kind, step.name), step.written.get("mode", "mode"))
                              + f"{step.id} is ens-adv but lists no shards")
        for needed in {"stores": ("model",), "evaluate": ("targets",), "diagnose": ("models",)}.get(step.kind, ()):
            if not o.get(needed):
                raise ConfigError(spec.where((step.kind, step.name)) + f"[{step.id}] needs {needed} = "
                                  + ('"NAME"' if needed == "model" else "[...]"))
    job = Job(Path(path), job_name, tables["job"].get("description", ""), tables["data"],
              tables["budget"], tables["report"], _toposort(spec, steps))
    for step in job.steps:
        _validate(spec, job, step)
    return job


def _validate(spec: _Spec, job: Job, step: Step) -> None:
    """Build the step's config (with placeholders for other steps' outputs), so a bad value
    fails before any work, with the file, line and key."""
    o = step.options
    try:
        if step.kind == "models":
            from enspipe.models import check_model_name

            try:
                check_model_name(o["arch"])
            except EnspipeError as e:
                raise OptionError("model", f"is no architecture: {e}") from None
            if not o.get("train", not o.get("pretrained", False)) and not o.get("pretrained", False):
                raise OptionError("train", "= false uses a model as published: it needs pretrained = true")
        if step.kind == "stores":
            if o.get("format", "zarr") == "both":
                raise OptionError("format", "must be zarr or wds: a store step makes one store")
            if len(o.get("attacks", ())) > 1:
                raise OptionError("attacks", "must name one attack: a store step makes one store "
                                  "(write one [stores.NAME] per attack)")
        cfg = step_config(job, step)
        # Values written as text and parsed by their field ("16/256") are kept as parsed, so a
        # step's key does not depend on how a number was written.
        for f in dataclasses.fields(cfg):
            if isinstance(o.get(f.name), str) and f.metadata.get("option", Option()).parse is not None:
                o[f.name] = getattr(cfg, f.name)
    except OptionError as e:
        table, key = _key_of(step, e.field)
        shown = f"{'.'.join(table)}.{key}" if table != (step.kind, step.name) else f"{step.id}.{key}"
        raise ConfigError(spec.where(table, key) + e.render(shown, lambda f: _key_of(step, f)[1])) from None
    except EnspipeError as e:
        raise ConfigError(spec.where((step.kind, step.name)) + f"[{step.id}]: "
                          + speak(str(e), lambda f: _key_of(step, f)[1])) from None


def _key_of(step: Step, field_name: str) -> tuple[tuple[str, ...], str]:
    """The table and key (as written) that fill config field `field_name` of this step."""
    for key, (fld, _, _) in STRUCTURE[step.kind].items():
        if fld == field_name:
            return (step.kind, step.name), step.written.get(key, key)
    if field_name in ("dataset", "data_root", "image_size"):
        return ("data",), field_name
    key = step.written.get(field_name, field_name)
    return (("defaults",) if step.origin.get(field_name) == "defaults" else (step.kind, step.name)), key


def _toposort(spec: _Spec, steps: dict[str, Step]) -> list[Step]:
    order: list[Step] = []
    state: dict[str, int] = {}

    def visit(sid: str, chain: tuple[str, ...]) -> None:
        if state.get(sid) == 2:
            return
        if state.get(sid) == 1:
            kind, name = sid.split(".", 1)
            raise ConfigError(spec.where((kind, name)) + "dependency cycle: " + " -> ".join((*chain, sid)))
        state[sid] = 1
        for kind, name in steps[sid].deps:
            visit(f"{kind}.{name}", (*chain, sid))
        state[sid] = 2
        order.append(steps[sid])

    for sid in steps:
        visit(sid, ())
    return order


# --- Configs, keys and the cache --------------------------------------------------------------

def _resolved(job: Job, step: Step) -> dict[str, Any]:
    """The options that determine a step's output, after [data] and [budget] are applied."""
    data, budget = job.data, job.budget
    o = dict(step.options)
    o.pop("description", None)
    if data.get("image_size"):
        o["image_size"] = data["image_size"]
    o["dataset"] = data["dataset"]
    o["data_root"] = data.get("data_root")
    if step.kind in ("models", "stores"):
        o["limit"] = budget.get("limit", data.get("train_limit"))
        if step.kind == "models" and "epochs" in budget:
            o["epochs"] = budget["epochs"]
        elif step.kind == "models" and "epoch_scale" in budget:
            o["epochs"] = max(1, math.ceil(o.get("epochs", 6) * budget["epoch_scale"]))
    else:
        o["limit"] = o.get("limit", budget.get("test_limit", data.get("test_limit")))
    return o


def step_config(job: Job, step: Step, *, outputs: Callable[[str, str], str] | None = None,
                out: str | None = None, device: str = "auto") -> Any:
    """The stage config of a step: its options, the job's data, and the outputs of the steps
    it uses (`outputs(kind, name)`; placeholders when only validating)."""
    o = _resolved(job, step)
    ref = outputs or (lambda kind, name: f"<{kind}.{name}>")
    table: dict[str, Any] = {}
    for key, value in o.items():
        if key in STRUCTURE[step.kind]:
            fld, want, target = STRUCTURE[step.kind][key]
            if fld is not None:
                table[fld] = (tuple(ref(target, v) for v in value) if want is list
                              else ref(target, value) if target else value)
        elif key not in ("limit",) or o.get("limit") is not None:
            table[key] = value
    table.update(device=device, out=out)
    if step.kind == "models":
        table["resume"] = out is not None and (Path(out) / "config.json").exists()
    if step.kind == "evaluate":
        table["split"] = "test"
    if step.kind == "stores":
        table["out"] = out or "<cache>/stores"
    if step.kind in ("evaluate", "diagnose") and outputs is not None:
        table["names"] = _names(step, ref)  # the spec's model names in tables, not cache paths
    return parse_config(step_configs()[step.kind], table)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _key_options(job: Job, step: Step) -> dict[str, Any]:
    """What a step's key hashes: its resolved options, speed-only ones left out, in the names
    the keys were first computed with (so caches made before the one vocabulary stay valid)."""
    o = {k: v for k, v in _resolved(job, step).items() if k not in SPEED_ONLY}
    if step.kind == "models" and "shards" in o:
        o["stores"] = o.pop("shards")
    if step.kind == "stores":
        # Always hashed: a store step's default attack was fgsm before it became the stages' step_ll.
        o["attack"] = o.pop("attacks", config_defaults(step_configs()["stores"])["attacks"])[0]
    return o


def resolve_keys(job: Job) -> None:
    """Give each step a key from its resolved options, the data and its dependencies' keys."""
    keys: dict[str, str] = {}
    for step in job.steps:
        step.key = _hash({"kind": step.kind, "options": _key_options(job, step),
                          "deps": sorted(keys[f"{k}.{n}"] for k, n in set(step.deps)),
                          "schema": 1})
        keys[step.id] = step.key


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
    published: dict[str, str] = {}
    pending = [step for step, _ in steps]
    waiting_since: float | None = None
    with register_job(cache, out_dir, name=job.name, spec=job.path, keys={s.id: s.key for s, _ in steps}):
        while pending:
            # The first step whose inputs are ready and that no other process is running: two
            # jobs sharing a cache never build the same step twice; the second waits or moves on.
            for step in pending:
                if any(f"{k}.{n}" not in done for k, n in step.deps):
                    continue
                with step_lock(_record_path(cache, step).with_suffix(".lock")) as locked:
                    if not locked:
                        continue
                    done[step.id] = _run_or_reuse(job, step, done, cache, device, log)
                published[step.id] = str(_publish(step, done[step.id], out_dir, cache))
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
               "steps": {sid: {"key": r["key"], "outputs": r["outputs"], "seconds": r.get("seconds"),
                               "published": published[sid]}
                         for sid, r in done.items()}}
    write_json(out_dir / "job.json", summary)
    return summary


def _run_or_reuse(job: Job, step: Step, done: dict[str, dict], cache: Path, device: str,
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
    outputs = _RUNNERS[step.kind](job, step, done, cache, device)
    seconds = time.perf_counter() - t0
    record = {"step": step.id, "key": step.key, "options": _resolved(job, step), "outputs": outputs,
              "seconds": round(seconds, 2)}
    write_json(rec_path, record)
    log(f"done {step.id} in {seconds:.1f} s")
    return record


def _publish(step: Step, record: dict[str, Any], out_dir: Path, cache: Path) -> Path:
    """Put a step's cached output into the job's output folder as real files: models and
    stores as hard links (they are large), results and diagnostics as copies (small)."""
    target = Path(next(iter(record["outputs"].values())))
    if step.kind in ("evaluate", "diagnose"):
        return publish(target.parent, out_dir, f"{step.kind}/{step.name}", key=step.key, link=False, cache=cache)
    if step.kind == "stores":
        old = out_dir / "stores" / step.name  # where earlier versions put a symlink
        if is_cache_link(old, cache):
            old.unlink()
        return publish(target, out_dir, f"stores/{step.name}{target.suffix}", key=step.key, link=True, cache=cache)
    return publish(target, out_dir, f"models/{step.name}", key=step.key, link=True, cache=cache)


def _step_outputs(done: dict[str, dict]) -> Callable[[str, str], str]:
    keys = {"models": "run", "stores": "store"}
    return lambda kind, name: done[f"{kind}.{name}"]["outputs"][keys[kind]]


def _run_model(job: Job, step: Step, done: dict[str, dict], cache: Path, device: str) -> dict:
    o = _resolved(job, step)
    run_dir = cache / "runs" / f"{step.name}-{step.key[:16]}"
    if not o.get("train", not o.get("pretrained", False)):
        # A static model used as published (hub weights): saved once as a checkpoint.
        from enspipe.models import create_model, save_model

        model = create_model(o["arch"], num_classes=1000, pretrained=True)
        save_model(model, run_dir, provenance={"pretrained": True})
        return {"run": str(run_dir)}
    from enspipe.train import train

    train(step_config(job, step, outputs=_step_outputs(done), out=str(run_dir), device=device))
    return {"run": str(run_dir)}


def _run_store(job: Job, step: Step, done: dict[str, dict], cache: Path, device: str) -> dict:
    from enspipe.precompute import precompute

    (path,) = precompute(step_config(job, step, outputs=_step_outputs(done), out=str(cache / "stores"),
                                     device=device))
    return {"store": str(path)}


def _run_evaluate(job: Job, step: Step, done: dict[str, dict], cache: Path, device: str) -> dict:
    from enspipe.evaluate import evaluate

    dest = cache / "evaluate" / f"{step.name}-{step.key[:16]}"
    res = evaluate(step_config(job, step, outputs=_step_outputs(done), out=str(dest), device=device))
    return {"results": res["path"]}


def _names(step: Step, ref: Callable[[str, str], str]) -> dict[str, str]:
    """Readable model names in tables: the spec's model names instead of cache paths."""
    names = {}
    for key in ("targets", "sources", "binarized", "models", "other"):
        value = step.options.get(key, [])
        for n in [value] if isinstance(value, str) else value:
            path = ref("models", n)
            names[path] = n
            names[f"binarized:{path}"] = f"{n}+binarized"
    return names


def _run_diagnose(job: Job, step: Step, done: dict[str, dict], cache: Path, device: str) -> dict:
    from enspipe.diagnostics import run_diagnose

    dest = cache / "diagnose" / f"{step.name}-{step.key[:16]}"
    res = run_diagnose(step_config(job, step, outputs=_step_outputs(done), out=str(dest), device=device))
    return {"diagnostics": res["path"]}


_RUNNERS = {"models": _run_model, "stores": _run_store, "evaluate": _run_evaluate, "diagnose": _run_diagnose}
