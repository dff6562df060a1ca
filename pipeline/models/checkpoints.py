"""Checkpoints: `model.safetensors` + `model.json` written and read; plain state dicts read with
`torch.load(weights_only=True)`; every number the files give checked against `enspipe.util.limits`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enspipe.util.errors import ModelError
from enspipe.util.fileio import atomic_target, atomic_write_json, parse_json
from enspipe.util.limits import current_limits, env_name
from enspipe.models.core import CHECKPOINT_FORMAT, EnsModel, HeadMismatch, ModelConfig
from enspipe.models.hub import _TF_PORTED
from enspipe.models.registry import create_model


__all__ = ["load_model", "load_weights", "save_model", "weights_sha256"]

# --- Checkpoints --------------------------------------------------------------------------

def weights_sha256(model: nn.Module) -> str:
    """A content hash of the weights (names, dtypes, shapes, bytes), independent of file format."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1) first: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be
        # viewed as bytes directly. For every other tensor the bytes are the same as
        # before, so the hashes of existing stores' models (MNIST nets) do not change.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model(model: EnsModel, directory: str | os.PathLike, *, classes: list[str] | None = None,
               provenance: dict | None = None, stem: str = "model") -> Path:
    """Write `{stem}.safetensors` + `{stem}.json` into `directory` atomically; return the json path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "classes": list(classes) if classes is not None else None,
        "weights_sha256": weights_sha256(model),
        "provenance": {**model.provenance, **(provenance or {})},
    }
    st, js = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    from safetensors import SafetensorError

    try:
        with atomic_target(st) as tmp:  # removes the temporary whatever happens
            save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    except SafetensorError as e:
        # safetensors writes from Rust and reports I/O failures (a full disk) as its own
        # error type with a Rust debug string: one line naming the file instead.
        text = str(e)
        if code := re.search(r"os error (\d+)|code: (\d+)", text):  # e.g. "(os error 28)": ENOSPC
            n = int(code.group(1) or code.group(2))
            raise OSError(n, os.strerror(n), str(st)) from None
        raise ModelError(f"could not write {st} ({text.splitlines()[0] if text else type(e).__name__})") from None
    return atomic_write_json(js, meta)


def _checkpoint_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """Resolve a run dir / .safetensors / .json / .pth path to (weights, json-or-None)."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"checkpoint {p} does not exist")
    if p.is_dir():
        st = p / "model.safetensors"
        if not st.exists():
            raise ModelError(f"{p} holds no model.safetensors (is it a run directory?)")
        return st, p / "model.json" if (p / "model.json").exists() else None
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    js = p.with_suffix(".json")
    return p, js if js.exists() and p.suffix == ".safetensors" else None


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    if not weights.exists():
        raise ModelError(f"checkpoint weights {weights} do not exist")
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{weights} is not a readable safetensors file ({e})") from None
    try:
        # weights_only refuses anything but tensors and plain containers: no code runs.
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{weights} is not a safetensors file nor a plain state dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{weights} does not hold a state dict of tensors")
    return state


def _classifier_keys(model: EnsModel) -> set[str]:
    """State-dict keys (of `model.net`) of the classifier head: timm's `get_classifier()`,
    else the last Linear layer (torchvision's fc / classifier[-1] / heads.head, MNIST nets)."""
    net = model.net
    head: nn.Module | None = None
    if hasattr(net, "get_classifier"):
        with contextlib.suppress(Exception):
            head = net.get_classifier()
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        return set()
    prefix = next((n for n, m in net.named_modules() if m is head), None)
    if prefix is None:
        return set()
    return {f"{prefix}.{k}" if prefix else k for k in head.state_dict()}


def _shape(t: torch.Tensor | tuple[int, ...]) -> str:
    return "x".join(map(str, getattr(t, "shape", t))) or "scalar"


def _safetensors_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header alone (no tensor data is read)."""
    limits = current_limits()
    try:
        with open(weights, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8:
                raise ModelError(f"{weights} is not a readable safetensors file (shorter than its header)")
            if (above := limits.above("max_metadata_bytes", n, " bytes")) is not None:
                raise ModelError(f"{weights} is not a readable safetensors file (its header claims {above})")
            header = json.loads(f.read(n))
        return {k: tuple(int(x) for x in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except RecursionError:  # json's parser on a header of thousands of nested brackets
        raise ModelError(f"{weights} is not a readable safetensors file (its header is nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ModelError(f"{weights} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _some(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_weights(model: EnsModel, path: str | os.PathLike, *, new_head: bool = False) -> EnsModel:
    """Load a checkpoint into `model`; a checkpoint of another architecture is a ModelError.

    Accepts enspipe checkpoints and plain state dicts of the bare network (torchvision or
    timm `state_dict()` saved with safetensors, or a `.pth` read with weights_only).
    Tensors of an auxiliary head the model does not have (Inception v3's AuxLogits) are
    ignored. With `new_head`, the classifier head may differ in shape (another number of
    classes): those tensors keep the model's fresh initialisation.
    """
    weights, meta_path = _checkpoint_files(path)
    if meta_path is not None and not new_head:
        meta = _read_meta(meta_path)
        other = ModelConfig.from_dict(meta["config"])
        if other.name != model.config.name or other.num_classes != model.config.num_classes:
            raise ModelError(
                f"checkpoint {path} is for {other.name} with {other.num_classes} classes, "
                f"not {model.config.name} with {model.config.num_classes}"
                + ("; to fine-tune it with a fresh head pass `new_head`" if other.name == model.config.name else "")
            )
    # A safetensors file's tensor shapes come from its header: they are checked against the
    # model before a byte of tensor data is read (a hostile header may claim terabytes).
    state = None if weights.suffix == ".safetensors" and weights.exists() else _read_state(weights)
    shapes = _safetensors_shapes(weights) if state is None else {k: tuple(v.shape) for k, v in state.items()}
    wrapped = any(k.startswith("net.") for k in shapes)
    target = model if wrapped else model.net
    own = target.state_dict()
    aux = _TF_PORTED.get(model.config.name, ())
    if aux:
        drop = tuple(("net." if wrapped else "") + p for p in aux)
        shapes = {k: v for k, v in shapes.items() if not k.startswith(drop)}
    missing = sorted(own.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & shapes.keys() if tuple(own[k].shape) != shapes[k])
    head = {("net." if wrapped else "") + k for k in _classifier_keys(model)}
    if new_head:
        # The head keeps its fresh initialisation; everything else must fit exactly.
        shapes = {k: v for k, v in shapes.items() if k not in head or k not in reshaped}
        reshaped = [k for k in reshaped if k not in head]
        missing = [k for k in missing if k not in head]
    if missing or unexpected or reshaped:
        parts = [f"{k} is {_shape(shapes[k])} in the file but {_shape(own[k])} in the model" for k in reshaped[:3]]
        if len(reshaped) > 3:
            parts.append(f"{len(reshaped) - 3} more reshaped")
        if missing:
            parts.append(f"missing from the file: {_some(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_some(unexpected)}")
        hint = ""
        if reshaped and not missing and not unexpected and set(reshaped) <= head:
            hint = (f"; only the classifier head differs: to fine-tune these weights on "
                    f"{model.config.num_classes} classes with a fresh head pass `new_head`")
            raise HeadMismatch(f"weights in {weights} do not fit {model.config.name} with "
                               f"{model.config.num_classes} classes: {'; '.join(parts)}{hint}",
                               weights=str(weights), model_classes=model.config.num_classes,
                               file_classes=max(shapes[k][0] for k in reshaped if shapes[k]))
        elif not new_head:
            hint = "; the file is for another architecture, number of classes or input size"
        raise ModelError(f"weights in {weights} do not fit {model.config.name} with "
                         f"{model.config.num_classes} classes: {'; '.join(parts)}{hint}")
    state = _read_state(weights) if state is None else state
    state = {k: v for k, v in state.items() if k in shapes}  # without aux heads / a reshaped head
    target.load_state_dict(state, strict=not new_head)
    model.provenance["weights_file"] = str(weights)
    if new_head:
        model.provenance["new_head"] = True
    return model


def _read_meta(meta_path: Path) -> dict[str, Any]:
    """model.json, with its config's numbers within their caps (ModelError naming the file)."""
    limits = current_limits()
    try:
        if (above := limits.above("max_metadata_bytes", meta_path.stat().st_size, " bytes")) is not None:
            raise ModelError(f"{meta_path} is too large for a model description: {above}")
        text = meta_path.read_bytes()
    except OSError as e:
        raise ModelError(f"{meta_path} is not readable ({e.strerror or e})") from None
    meta = parse_json(text, meta_path, ModelError)  # malformed, truncated or nested too deeply: one line
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or "config" not in meta:
        raise ModelError(f"{meta_path} is not an enspipe model description ({CHECKPOINT_FORMAT})")
    try:
        problem = ModelConfig.from_dict(meta["config"]).problem(limits)
    except ModelError as e:
        problem = str(e)
    if problem:
        raise ModelError(f"{meta_path}: {problem}")
    return meta


def _parameter_count(cfg: ModelConfig) -> int | None:
    """How many parameters `cfg` builds, counted on the meta device (nothing is allocated);
    None if the architecture cannot be built there."""
    try:
        with torch.device("meta"):
            net = create_model(cfg.name, num_classes=cfg.num_classes, input_size=cfg.input_size)
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 -- an architecture that needs real tensors to build it
        return None
    return sum(p.numel() for p in net.parameters())


def load_model(path: str | os.PathLike) -> EnsModel:
    """Rebuild a model from `model.json` + `model.safetensors` (a run dir or either file)."""
    weights, meta_path = _checkpoint_files(path)
    if meta_path is None:
        raise ModelError(f"{path} has no model.json beside it; name the architecture as `model` and pass "
                         f"`weights` {path}")
    meta = _read_meta(meta_path)
    cfg = ModelConfig.from_dict(meta["config"])
    # An MNIST net's parameters grow with its input size: count them before building it.
    cap = current_limits().max_parameters
    if (n := _parameter_count(cfg)) is not None and n > cap:
        raise ModelError(f"{meta_path}: {cfg.name} with {cfg.num_classes} classes on {'x'.join(map(str, cfg.input_size))} "
                         f"input would have {n} parameters, above the limit of {cap} (raise it with "
                         f"{env_name('max_parameters')})")
    model = create_model(cfg.name, num_classes=cfg.num_classes, input_size=cfg.input_size)
    model.provenance = dict(meta.get("provenance") or {})
    load_weights(model, weights)
    model.classes = meta.get("classes")  # type: ignore[attr-defined]
    return model
