"""Job specs: a TOML file of experiments, run as a graph of cached steps.

A spec names models to train, stores to precompute from them, evaluations, diagnostics
and a report:

    [job]       name, description, include = ["other.toml"]   (included tables merge first)
    [data]      dataset, data_root, train_limit, test_limit, image_size
    [budget]    limit, test_limit, epochs | epoch_scale        (reduced scale for a CPU)
    [defaults]  any training option applied to every model
    [models.NAME]    arch, shards = [STORE STEPS], train, + any TrainConfig field
    [stores.NAME]    model = MODEL STEP, attack, + any PrecomputeConfig field
    [evaluate.NAME]  targets, sources, binarized, binarized_masked = [MODEL STEPS], + any EvalConfig
                     field;  [evaluate.NAME.options] rand_fgsm = { alpha = 0.05 }  (attack_options)
    [diagnose.NAME]  models, other = MODEL STEPS, + any DiagnoseConfig field
    [report]         paper (a key of enspipe.report's paper tables), title
    [params]         NAME = default; "${NAME}" in any value; `enspipe run --set NAME=VALUE`
                     (`enspipe.jobs.params`: local paths such as a dataset folder or weight files)
    [models.NAME] train = false, weights = FILE: a static model used as given (a local state dict)
    [stores.NAME] split = "test": directions of the evaluation images; [evaluate.NAME]
                     source_stores = [STORE STEPS]: those directions as black-box sources
                     (Table 1's reuse); whitebox_stores = [STORE STEPS]: a target's own
                     white-box attack only (Table 2's)

A step's keys are its stage's config fields (`enspipe.config`): the same names, types and
defaults as the command line's flags (`adv_fraction` is `--adv-fraction`), except where the
job supplies a field itself: the data ([data] / [budget]), the device and the output
location (`enspipe run --device / --out / --cache`), and the models and stores a step uses,
which are other steps' names. Old names are accepted as aliases: `stores` for `shards`,
`workers` for `loader_workers`, `attack` for a store step's one attack; an evaluate step's
`stores` / `own_stores` still work with a deprecation line (`source_stores` / `whitebox_stores`).

Every step's key hashes its own resolved options and the keys of the steps it uses, so
a step whose inputs did not change is reused from the cache (a second run, or another
job sharing a static model and dataset), and one whose inputs changed runs again. The
cache lives under `--cache` (default $ENSPIPE_CACHE or ~/.cache/enspipe) and is shared
between jobs; each job's outputs are published under `--out` as real files.

Parsing is strict: unknown keys, wrong types, dangling references and names that are not
safe as paths are errors naming the file and line.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from enspipe.config import config_defaults, runtime_fields
from enspipe.util.errors import ConfigError
from enspipe.jobs.cache import default_cache, is_cache_link, publish, register_job
from enspipe.util.fileio import file_lock
from enspipe.jobs.spec import (
    STEP_KINDS,
    STRUCTURE,
    Job,
    Step,
    is_static,
    load_job,
    resolved,
    step_config,
    step_configs,
    step_keys,
)

__all__ = ["STEP_KINDS", "STRUCTURE", "Job", "Step", "default_cache", "load_job", "plan", "resolve_keys", "run_job",
           "step_config", "step_configs", "step_keys"]



# --- Keys and the cache --------------------------------------------------------------

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _key_options(job: Job, step: Step) -> dict[str, Any]:
    """What a step's key hashes: its resolved options, runtime ones left out, in the names
    the keys were first computed with (so caches made before the one vocabulary stay valid)."""
    runtime = runtime_fields(step_configs()[step.kind])  # declared on the fields: option(..., runtime=True)
    o = {k: v for k, v in resolved(job, step).items() if k not in runtime}
    if step.kind == "models" and "shards" in o:
        o["stores"] = o.pop("shards")
    if step.kind == "evaluate":  # the stores' job keys before they took their fields' names
        for old, new in (("stores", "source_stores"), ("own_stores", "whitebox_stores")):
            if new in o:
                o[old] = o.pop(new)
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
        out.append((step, "reuse" if rec.exists() and _outputs_exist(_read_record(rec)) else "run"))
    return out


def _read_record(path: Path) -> dict[str, Any]:
    """A cached step's record; a damaged one (truncated, nested too deeply, not an object) is
    one line naming it, to delete so the step runs again."""
    from enspipe.util.fileio import parse_json

    record = parse_json(path.read_bytes(), path)
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: not a step record (a JSON object); delete it to run the step again")
    return record


def _outputs_exist(record: dict[str, Any]) -> bool:
    return all(Path(p).exists() for p in record.get("outputs", {}).values())


# --- Running ------------------------------------------------------------------------------

def run_job(path: str | os.PathLike, *, out: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
            dry_run: bool = False, device: str = "auto", log: Callable[[str], None] | None = None,
            params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or with dry_run only plan) a job spec; return {step id: status/outputs}.
    `params` overrides the spec's `[params]` (`enspipe run --set`)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    job = load_job(path, params)
    for note in job.notes:
        log(note)
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

    from enspipe.util.runtime import write_json

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
                with file_lock(_record_path(cache, step).with_suffix(".lock")) as locked:
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
    from enspipe.util.runtime import write_json

    rec_path = _record_path(cache, step)
    if rec_path.exists():
        record = _read_record(rec_path)
        if _outputs_exist(record):
            log(f"reused {step.id} ({step.key[:12]})")
            return record
    log(f"running {step.id} ...")
    t0 = time.perf_counter()
    outputs = _RUNNERS[step.kind](job, step, done, cache, device)
    seconds = time.perf_counter() - t0
    record = {"step": step.id, "key": step.key, "options": resolved(job, step), "outputs": outputs,
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
    o = resolved(job, step)
    run_dir = cache / "runs" / f"{step.name}-{step.key[:16]}"
    if is_static(o):
        # A static model used as published (hub weights, or a local `weights` file): saved once as a checkpoint.
        from enspipe.models import save_model

        save_model(published_model(o), run_dir,
                   provenance={"weights": o["weights"]} if o.get("weights") else {"pretrained": True})
        return {"run": str(run_dir)}
    from enspipe.train import train

    train(step_config(job, step, outputs=_step_outputs(done), out=str(run_dir), device=device))
    return {"run": str(run_dir)}


def published_model(o: dict[str, Any], *, pretrained: bool = True) -> Any:
    """The model a `pretrained = true` step stands for (resolved options `o`): its arch with
    the hub's ImageNet weights, built for the job's image size so that later steps' geometry
    checks pass (a ResNet's own 224 px is not the 299 px of an Inception job). Tests build it
    with pretrained=False: the same construction offline, with random weights."""
    from enspipe.models import create_model

    size = o.get("image_size")
    weights = o.get("weights")  # a local state dict (timm / torchvision layout) instead of the hub's
    return create_model(o["arch"], num_classes=1000, pretrained=pretrained and not weights, weights=weights,
                        input_size=(3, size, size) if size else None)


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


def _run_diagnose(job: Job, step: Step, done: dict[str, dict], cache: Path, device: str) -> dict:
    from enspipe.diagnostics import run_diagnose

    dest = cache / "diagnose" / f"{step.name}-{step.key[:16]}"
    res = run_diagnose(step_config(job, step, outputs=_step_outputs(done), out=str(dest), device=device))
    return {"diagnostics": res["path"]}


_RUNNERS = {"models": _run_model, "stores": _run_store, "evaluate": _run_evaluate, "diagnose": _run_diagnose}
