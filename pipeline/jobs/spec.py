"""Job specs: parsing a TOML file of experiments into a graph of steps, each with its config.
(Over 400 lines: parsing, strict checks and the step configs of a spec decide together what a
spec means.)

`load_job` merges a spec and its includes, checks every table strictly (unknown keys, wrong
types, dangling references, names that are not safe as paths: errors naming FILE:LINE and
the key) and builds each step's stage config with placeholders for the outputs of the steps it
uses, so a bad value fails before any work. `step_config` builds the same config for the run.
The format is described in `enspipe.jobs`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from enspipe.config import Option, OptionError, config_defaults, job_keys, parse_config, speak, toml_line
from enspipe.util.errors import ConfigError, EnspipeError
from enspipe.util.fileio import read_text_file
from enspipe.jobs.params import substitute
from enspipe.util.naming import check_name

__all__ = ["ALIASES", "STEP_KINDS", "STRUCTURE", "Job", "Step", "defaults_keys", "is_static", "load_job", "resolved",
           "step_config", "step_configs", "step_keys"]

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
                 # the stores' keys are their fields' names (one name per concept; the old ones: DEPRECATED)
                 "source_stores": ("source_stores", list, "stores"),
                 "whitebox_stores": ("whitebox_stores", list, "stores"),
                 "binarized": ("binarized", list, "models"),
                 "binarized_masked": ("binarized_masked", list, "models"),
                 # [evaluate.NAME.options] rand_fgsm = { alpha = 0.05 }: `attack_options` as a table
                 "options": ("attack_options", dict, None), "description": (None, str, None)},
    "diagnose": {"models": ("models", list, "models"), "other": ("other", str, "models"),
                 "description": (None, str, None)},
}
ALIASES: dict[str, dict[str, str]] = {"models": {"stores": "shards", "workers": "loader_workers"},
                                      "stores": {"attack": "attacks"},
                                      # the field's own name (diagnose's key is `models` too)
                                      "evaluate": {"models": "targets"}, "diagnose": {}}
# Old keys that still work but say so (one line each, `Job.notes`, printed by `enspipe run`).
DEPRECATED: dict[str, dict[str, str]] = {"evaluate": {"stores": "source_stores", "own_stores": "whitebox_stores"}}


def step_configs() -> dict[str, type]:
    """The config class of each step kind."""
    # The torch-free config modules: reading a job's options imports no stage.
    from enspipe.configs.diagnose import DiagnoseConfig
    from enspipe.configs.evaluate import EvalConfig
    from enspipe.configs.train import TrainConfig
    from enspipe.precompute.config import PrecomputeConfig

    return {"models": TrainConfig, "stores": PrecomputeConfig, "evaluate": EvalConfig, "diagnose": DiagnoseConfig}


def step_keys(kind: str) -> set[str]:
    """Every key a `[KIND.NAME]` table accepts (aliases not included)."""
    return set(STRUCTURE[kind]) | job_keys(step_configs()[kind])


def _default(kind: str, name: str) -> Any:
    """The default of field `name` of a `kind` step's config: a key a step leaves out means it."""
    return config_defaults(step_configs()[kind])[name]


def is_static(options: dict[str, Any]) -> bool:
    """Whether a models step (its options) is a static model used as given, not trained:
    `train = false`, which a `pretrained = true` step defaults to."""
    return not options.get("train", not options.get("pretrained", _default("models", "pretrained")))


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
    notes: list[str] = field(default_factory=list)  # deprecation lines, each naming FILE:LINE


# --- Parsing ------------------------------------------------------------------------------

MAX_INCLUDES = 256  # files one spec may include: far above real layering, a bound on hostile graphs


class _Spec:
    """The merged TOML of a spec and its includes, with the text kept for line numbers. Each
    file is parsed once (`parsed`, by path): linear in files, not in include paths (a diamond)."""

    def __init__(self, path: Path, stack: tuple[Path, ...] = (), parsed: dict[Path, _Spec | None] | None = None):
        path = path.resolve()
        parsed = {} if parsed is None else parsed
        if path in stack:
            chain = " -> ".join(p.name for p in (*stack, path))
            raise ConfigError(f"{stack[-1]}: include loop: {chain}")
        if len(parsed) > MAX_INCLUDES:
            raise ConfigError(f"{stack[0]}: includes more than {MAX_INCLUDES} files")
        parsed[path] = None  # started (counted by the cap); the parse itself once it is done
        if not path.is_file():
            where = f"{stack[-1]}: " if stack else ""
            raise ConfigError(f"{where}job spec {path} does not exist")
        self.path = path
        self.text = read_text_file(path)
        try:
            raw = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to parse") from None
        if not isinstance(raw.get("job", {}), dict):
            raise ConfigError(f"{path}: [job] must be a table")
        self.sources: dict[tuple[str, ...], Path] = {}   # table -> the file that defines it
        merged: dict[str, Any] = {}
        includes = raw.get("job", {}).get("include", [])
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            raise ConfigError(self.where(("job",), "include") + "include must be a list of paths")
        # A file parsed already has no loop in its own includes (one through this stack would
        # have been found while parsing it); one still being parsed is on the stack: a loop.
        self.children = [parsed.get((path.parent / inc).resolve()) or _Spec(path.parent / inc, (*stack, path), parsed)
                         for inc in includes]
        parsed[path] = self
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
            into[k] = copy.deepcopy(v)  # a file parsed once is merged into many includers


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
               allowed: set[str], notes: list[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """A step table's options under their canonical keys, and each key as it was written.
    Unknown keys and structure keys of the wrong type are errors naming FILE:LINE; a
    deprecated key adds a line to `notes`."""
    name = ".".join(table)
    if not isinstance(values, dict):
        raise ConfigError(spec.where(table) + f"[{name}] must be a table")
    out: dict[str, Any] = {}
    written: dict[str, str] = {}
    for k, v in values.items():
        key = ALIASES[kind].get(k, k)
        if k in DEPRECATED.get(kind, {}):
            key = DEPRECATED[kind][k]
            if notes is not None:
                notes.append(spec.where(table, k) + f"{name}.{k} is deprecated: use {key} (the same list)")
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


def load_job(path: str | os.PathLike, params: dict[str, Any] | None = None) -> Job:
    """Parse and validate a job spec (and its includes, its `[params]` set by `params`); resolve the step graph."""
    spec = _Spec(Path(path))
    raw = substitute(spec.raw, params, spec.where)
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
    notes: list[str] = []
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
            opts, written = _canonical(spec, table, kind, options, allowed, notes)
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
        if step.kind == "models" and o.get("mode", _default("models", "mode")) == "ens-adv" and not o.get("shards"):
            raise ConfigError(spec.where((step.kind, step.name), step.written.get("mode", "mode"))
                              + f"{step.id} is ens-adv but lists no shards")
        for needed in {"stores": ("model",), "evaluate": ("targets",), "diagnose": ("models",)}.get(step.kind, ()):
            if not o.get(needed):
                raise ConfigError(spec.where((step.kind, step.name)) + f"[{step.id}] needs {needed} = "
                                  + ('"NAME"' if needed == "model" else "[...]"))
    job = Job(Path(path), job_name, tables["job"].get("description", ""), tables["data"],
              tables["budget"], tables["report"], _toposort(spec, steps), notes)
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
            if is_static(o) and not (o.get("pretrained") or o.get("weights")):
                raise OptionError("train", "= false uses a model as given: needs pretrained = true or weights = FILE")
        if step.kind == "stores":
            if o.get("format", _default("stores", "format")) == "both":
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


# --- Step configs ------------------------------------------------------------------------

def resolved(job: Job, step: Step) -> dict[str, Any]:
    """The options that determine a step's output, after [data] and [budget] are applied."""
    data, budget = job.data, job.budget
    o = dict(step.options)
    o.pop("description", None)
    if data.get("image_size"):
        o["image_size"] = data["image_size"]
    o["dataset"] = data["dataset"]
    o["data_root"] = data.get("data_root")
    if step.kind == "stores" and o.get("split", _default("stores", "split")) != "train":
        o["limit"] = budget.get("test_limit", data.get("test_limit"))
    elif step.kind in ("models", "stores"):
        o["limit"] = budget.get("limit", data.get("train_limit"))
        if step.kind == "models" and "epochs" in budget:
            o["epochs"] = budget["epochs"]
        elif step.kind == "models" and "epoch_scale" in budget:
            o["epochs"] = max(1, math.ceil(o.get("epochs", _default("models", "epochs")) * budget["epoch_scale"]))
    else:
        o["limit"] = o.get("limit", budget.get("test_limit", data.get("test_limit")))
    return o


def step_config(job: Job, step: Step, *, outputs: Callable[[str, str], str] | None = None,
                out: str | None = None, device: str = "auto") -> Any:
    """The stage config of a step: its options, the job's data, and the outputs of the steps
    it uses (`outputs(kind, name)`; placeholders when only validating)."""
    o = resolved(job, step)
    ref = outputs or (lambda kind, name: f"<{kind}.{name}>")
    table: dict[str, Any] = {}
    for key, value in o.items():
        if key in STRUCTURE[step.kind]:
            fld, want, target = STRUCTURE[step.kind][key]
            if key == "options":
                from enspipe.attacks import attack_option_strings

                table[fld] = (*table.get(fld, ()), *attack_option_strings(value))
            elif fld is not None:
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
        table["names"] = _names(job, step, ref)  # the spec's model names in tables, not cache paths
    return parse_config(step_configs()[step.kind], table)


def _names(job: Job, step: Step, ref: Callable[[str, str], str]) -> dict[str, str]:
    """Readable model names in tables: the spec's model names instead of cache paths (a store: its model's)."""
    names = {}
    stores = [*step.options.get("source_stores", []), *step.options.get("whitebox_stores", [])]
    for n in stores if step.kind == "evaluate" else []:
        names[ref("stores", n)] = next(s.options["model"] for s in job.steps if s.id == f"stores.{n}")
    for key in ("targets", "sources", "binarized", "binarized_masked", "models", "other"):
        value = step.options.get(key, [])
        for n in [value] if isinstance(value, str) else value:
            path = ref("models", n)
            names[path] = n
            names[f"binarized:{path}"] = f"{n}+binarized"
            names[f"binarized-masked:{path}"] = f"{n}+binarized-masked"
    return names
