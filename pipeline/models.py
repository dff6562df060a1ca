"""Model registry: the paper's MNIST architectures, torchvision and timm models.

(Over 400 lines on purpose: every way a name becomes a model -- registry, [0, 1] wrapper,
checkpoints, `load_model_for` -- shares one ModelConfig and one set of checks.)

Every model enspipe hands out is an `EnsModel`: it takes images in [0, 1] (the threat
model of DESIGN §2: eps = 16/256 means pixels) and normalizes them inside with its own
mean/std, so attacks never need to know how a network was trained. It also records its
input geometry and the config needed to rebuild it from a checkpoint.

Names:
  A, B, B*, C, C-code, D     the MNIST architectures of Table 5 (see `_mnist_net`)
  resnet50, inception_v3 ... any torchvision classification model
  timm:NAME                  any timm model, e.g. timm:inception_resnet_v2.tf_ens_adv_in1k

Checkpoints are `model.safetensors` + `model.json`; nothing is ever unpickled (a bare
`.pth` state dict is read with `torch.load(weights_only=True)`, which refuses code).

Stages load their models with `load_model_for(spec, dataset, device)`: a run dir,
checkpoint or name (optionally "binarized:SPEC" or "binarized-masked:SPEC"), checked against the data's geometry and
number of classes, on the device, in eval mode. A spec is a path when it looks like one
(contains '/' or starts with '.'), an architecture when it is a registry name; a registry
name that is also a file or folder in the working directory is refused as ambiguous
(`is_model_path`).

Every number a checkpoint's files give (model.json's classes and input size, the parameters
they imply, the safetensors header's tensor shapes) is checked against `enspipe.util.limits`
before anything is built or read from it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enspipe.util.errors import ConfigError, ModelError
from enspipe.util.fileio import atomic_target, atomic_write_json, parse_json
from enspipe.util.limits import Limits, current_limits, env_name
from enspipe.util.netcheck import network_available as _network_reachable

CHECKPOINT_FORMAT = "enspipe-model/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's graph (weights live in safetensors)."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W) the wrapper accepts
    mean: tuple[float, ...]
    std: tuple[float, ...]
    family: str  # "mnist" | "torchvision" | "timm"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        try:
            return cls(
                name=str(d["name"]),
                num_classes=int(d["num_classes"]),
                input_size=tuple(int(v) for v in d["input_size"]),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                family=str(d["family"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ModelError(f"model config is malformed ({e!r})") from None

    def problem(self, limits: Limits | None = None) -> str | None:
        """Why this config (read from a file) must not be built, or None: every number
        against its cap (`enspipe.util.limits`), before anything is allocated for it."""
        lim = limits or current_limits()
        if len(self.input_size) != 3:
            return f"input_size must be [C, H, W], not {list(self.input_size)}"
        c, h, w = self.input_size
        checks = [("num_classes", self.num_classes, "max_classes"), ("input channels", c, "max_input_channels"),
                  ("input height", h, "max_input_side"), ("input width", w, "max_input_side")]
        for what, value, cap in checks:
            if value < 1:
                return f"{what} must be at least 1, not {value}"
            if (above := lim.above(cap, value)) is not None:
                return f"{what} {above}"
        for what, values in (("mean", self.mean), ("std", self.std)):
            if not 1 <= len(values) <= lim.max_input_channels or not all(math.isfinite(v) for v in values):
                return f"{what} must be 1 to {lim.max_input_channels} finite numbers, not {list(values)[:8]}"
        if min(self.std) <= 0:
            return f"std must be positive, not {list(self.std)}"
        return None


class EnsModel(nn.Module):
    """A classifier on [0, 1] input: normalizes with its own mean/std, returns logits."""

    def __init__(self, net: nn.Module, config: ModelConfig, *, provenance: dict | None = None):
        super().__init__()
        self.net = net
        self.config = config
        self.provenance: dict[str, Any] = dict(provenance or {})
        c = config.input_size[0]
        # Buffers (not parameters) so they travel with .to(device) and the checkpoint.
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1))
        # A 1-channel dataset fed to a 3-channel backbone is repeated across channels.
        self._expand = len(config.mean) if len(config.mean) != c else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._expand:
            x = x.expand(-1, self._expand, -1, -1)
        out = self.net((x - self.mean) / self.std)
        # torchvision's Inception returns a namedtuple in train mode when aux logits are on.
        return out.logits if hasattr(out, "logits") else out


# --- The paper's MNIST architectures (Table 5 and the authors' Keras code) -----------------

def _same_pad(k: int, s: int, size: int) -> tuple[int, int, int, int]:
    """Keras 'same' padding for one square conv: (left, right, top, bottom)."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return (total // 2, total - total // 2, total // 2, total - total // 2)


def _mnist_net(name: str, in_chans: int, size: int, num_classes: int) -> nn.Module:
    """Build architecture `name` of Table 5 for a `in_chans x size x size` input.

    Keras "valid" padding throughout unless stated, as in the reference code.
    - A: Conv(64,5x5)+ReLU, Conv(64,5x5)+ReLU, Dropout(0.25), FC(128)+ReLU, Dropout(0.5), FC.
    - B: Dropout(0.2) on the input, Conv(64,8x8,stride 2,"same")+ReLU,
         Conv(128,6x6,stride 2)+ReLU, Conv(128,5x5)+ReLU, Dropout(0.5), FC.
    - B*: B without the input dropout (Appendix C.2).
    - C: Table 5's version: Conv(128,3x3)+Tanh, MaxPool(2,2), Conv(64,3x3)+Tanh,
         MaxPool(2,2), FC(128)+ReLU, FC.
    - C-code: the authors' code's version of C, which differs from Table 5: ReLU and no
         pooling, i.e. Conv(128,3x3)+ReLU, Conv(64,3x3)+ReLU, Dropout(0.25),
         FC(128)+ReLU, Dropout(0.5), FC.
    - D: 4 x [FC(300)+ReLU+Dropout(0.5)], FC.
    """
    if name == "A":
        body = [nn.Conv2d(in_chans, 64, 5), nn.ReLU(), nn.Conv2d(64, 64, 5), nn.ReLU(), nn.Dropout(0.25)]
        head_hidden = 128
    elif name in ("B", "B*"):
        body = [nn.Dropout(0.2)] if name == "B" else []
        body += [
            nn.ZeroPad2d(_same_pad(8, 2, size)), nn.Conv2d(in_chans, 64, 8, stride=2), nn.ReLU(),
            nn.Conv2d(64, 128, 6, stride=2), nn.ReLU(),
            nn.Conv2d(128, 128, 5), nn.ReLU(), nn.Dropout(0.5),
        ]
        head_hidden = 0
    elif name == "C":
        body = [nn.Conv2d(in_chans, 128, 3), nn.Tanh(), nn.MaxPool2d(2),
                nn.Conv2d(128, 64, 3), nn.Tanh(), nn.MaxPool2d(2)]
        head_hidden = 128
    elif name == "C-code":
        body = [nn.Conv2d(in_chans, 128, 3), nn.ReLU(), nn.Conv2d(128, 64, 3), nn.ReLU(), nn.Dropout(0.25)]
        head_hidden = 128
    elif name == "D":
        body = []
        head_hidden = -1
    else:  # pragma: no cover - guarded by MNIST_ARCHS
        raise ModelError(f"unknown MNIST architecture {name!r}")

    layers: list[nn.Module] = [*body, nn.Flatten()]
    # The shape probe runs in eval mode and hands the layers back in train mode: a new module
    # trains (torch's convention), so a plain loop's dropout is on without a train() call.
    probe = nn.Sequential(*layers).eval()
    with torch.no_grad():
        flat = probe(torch.zeros(1, in_chans, size, size)).shape[1]
    probe.train()
    if head_hidden == -1:  # D: fully connected only
        width = flat
        for _ in range(4):
            layers += [nn.Linear(width, 300), nn.ReLU(), nn.Dropout(0.5)]
            width = 300
        layers.append(nn.Linear(width, num_classes))
    elif head_hidden:
        dropout = [] if name == "C" else [nn.Dropout(0.5)]
        layers += [nn.Linear(flat, head_hidden), nn.ReLU(), *dropout, nn.Linear(head_hidden, num_classes)]
    else:
        layers.append(nn.Linear(flat, num_classes))
    net = nn.Sequential(*layers)
    # Keras initialisation (glorot-uniform weights, zero biases; he-normal for D's
    # hidden layers as in the reference code) so training dynamics match the paper's.
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if name == "D" and isinstance(m, nn.Linear) and m.out_features == 300:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


MNIST_ARCHS = ("A", "B", "B*", "C", "C-code", "D")


# --- Registry ---------------------------------------------------------------------------

# torchvision's Inception v3 and GoogLeNet weights were ported from TensorFlow and expect
# input in [-1, 1]: with hub weights torchvision turns on `transform_input`, which maps
# ImageNet-normalized input to (x - 0.5) / 0.5. enspipe normalizes with mean = std = 0.5
# itself and keeps `transform_input` off: the same arithmetic for hub weights and for a
# local file of them. Their auxiliary heads are dropped (enspipe trains and attacks the
# main logits only); tensors of an aux head in a weight file are ignored on load.
_TF_PORTED = {"inception_v3": ("AuxLogits.",), "googlenet": ("aux1.", "aux2.")}
_TF_MEAN_STD = (0.5, 0.5, 0.5)


def _drop_aux_heads(net: nn.Module, name: str) -> None:
    net.aux_logits = False
    net.transform_input = False
    for prefix in _TF_PORTED[name]:
        setattr(net, prefix.rstrip("."), None)


def _torchvision_net(name: str, num_classes: int, pretrained: bool) -> tuple[nn.Module, tuple[int, int, int]]:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"unknown model {name!r}: use one of {', '.join(MNIST_ARCHS)}, a torchvision "
            "classification model (e.g. resnet50), or timm:NAME"
        )
    if pretrained:
        # Offline, torchvision loads the weights from its hub cache (TORCH_HOME) if they are there.
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not cached.exists() and not _network_reachable("download.pytorch.org"):
            raise ModelError(
                f"`pretrained`: torchvision weights for {name} are not in the torch hub cache {cached.parent} "
                "and there is no network; set TORCH_HOME to a cache that holds them, or pass `weights` FILE"
            )
        if num_classes != 1000:
            raise HeadMismatch(f"pretrained {name} has 1000 classes, not {num_classes}", weights="",
                               model_classes=num_classes, file_classes=1000)
        # No aux/init kwargs here: torchvision refuses them beside hub weights.
        net = torchvision.models.get_model(name, weights="DEFAULT")
    else:
        kwargs: dict[str, Any] = {}
        if name in _TF_PORTED:
            kwargs = {"aux_logits": False, "init_weights": True, "transform_input": False}
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if name in _TF_PORTED:
        _drop_aux_heads(net, name)
    size = 299 if name.startswith("inception") else 224
    return net, (3, size, size)


def _hub_offline() -> None:
    """No network: the Hugging Face hub must answer from its cache at once instead of retrying
    for ~40 s (NOTES.md). It reads HF_HUB_OFFLINE when it is imported, so the variable is set
    before timm imports it; if it is imported already, its constant is set too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def _timm_net(name: str, num_classes: int, in_chans: int, pretrained: bool):
    told = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    offline = pretrained and not told and not _network_reachable("huggingface.co")
    if offline:
        _hub_offline()
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        raise ModelError(f"unknown timm model {name!r} (see timm.list_models())")
    try:
        net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
    except Exception as e:  # hub errors come in many types; all mean "no weights here"
        if pretrained:
            from huggingface_hub import constants

            why = ("and there is no network" if offline else "and HF_HUB_OFFLINE is set" if told
                   else f"({type(e).__name__})")
            raise ModelError(
                f"`pretrained`: timm weights for {name!r} are not in the hub cache {constants.HF_HUB_CACHE} {why}; "
                "set HF_HOME (or HF_HUB_CACHE) to a cache that holds them, or pass `weights` FILE"
            ) from None
        raise
    cfg = net.pretrained_cfg
    return net, tuple(cfg.get("input_size", (3, 224, 224))), tuple(cfg["mean"]), tuple(cfg["std"])


def is_registered(name: str) -> bool:
    """Whether `name` is an architecture enspipe can build (a registry name; builds nothing)."""
    try:
        check_model_name(name)
    except ModelError:
        return False
    return True


def is_model_path(spec: str, *, weights_given: bool = False) -> bool:
    """Whether `--model SPEC` names a file or folder (a run dir, a checkpoint) rather than an
    architecture. A spec that looks like a path (contains '/' or starts with '.') is one; a
    registry name is an architecture; any other existing file or folder is a path. A registry
    name that is also a file or folder here is ambiguous -- a run dir named like an
    architecture would silently turn a fresh run into fine-tuning -- and a ModelError naming
    both readings, unless `weights_given` (only an architecture takes --weights/--pretrained)."""
    spec = os.fspath(spec)
    if "/" in spec or os.sep in spec or spec.startswith("."):
        return True
    if not os.path.lexists(spec):
        return False
    if not is_registered(spec):
        return True
    if weights_given:
        return False
    kind = "folder" if os.path.isdir(spec) else "file"
    raise ModelError(f"`model` {spec} is ambiguous: the architecture {spec}, or the {kind} ./{spec} in "
                     f"{os.getcwd()}; write ./{spec} for the {kind}, or run elsewhere for the architecture")


def check_model_name(name: str) -> None:
    """Raise ModelError unless `name` is a registered architecture (builds nothing)."""
    if name in MNIST_ARCHS:
        return
    if name.startswith("timm:"):
        import timm

        if not timm.is_model(name[5:].split(".")[0]):
            raise ModelError(f"unknown timm model {name[5:]!r} (see timm.list_models())")
        return
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"unknown model {name!r}: use one of {', '.join(MNIST_ARCHS)}, a torchvision "
                         "classification model (e.g. resnet50), or timm:NAME")


def is_architecture(spec: str | os.PathLike, *, weights_given: bool = False) -> bool:
    """Does `spec` (or "binarized:SPEC") name a registry architecture, whose weights must
    come from elsewhere, rather than a run dir or checkpoint? A path is written like one
    (a '/', a leading '.', a .json / .safetensors name) or is no registered name; a registry
    name that is also a file or folder here is ambiguous (`is_model_path` raises) unless
    weights are given, which only an architecture takes."""
    spec = os.fspath(spec).removeprefix(BINARIZED_MASKED_PREFIX).removeprefix(BINARIZED_PREFIX)
    if spec.endswith((".json", ".safetensors")) or is_model_path(spec, weights_given=weights_given):
        return False
    try:
        check_model_name(spec)
    except ModelError:
        return False
    return True


def check_weights(specs: dict[str, tuple[str, ...]], *, weights: str | None, pretrained: bool) -> set[str]:
    """The models of `specs` ({config field: specs}) named as bare architectures, which
    `weights` (one of them) or `pretrained` (all) must give weights: evaluating or diagnosing
    an architecture's random initial weights would print meaningless numbers with exit 0."""
    from enspipe.config import OptionError

    given = weights is not None or pretrained
    bare = {field: [s for s in group if is_architecture(s, weights_given=given)] for field, group in specs.items()}
    names = list(dict.fromkeys(s.removeprefix(BINARIZED_MASKED_PREFIX).removeprefix(BINARIZED_PREFIX)
                               for group in bare.values() for s in group))
    if names and weights is None and not pretrained:
        field = next(f for f, group in bare.items() if group)
        raise OptionError(field, f"{names[0]} is an architecture name, whose weights would be random: pass "
                          "`weights` FILE or `pretrained`, or name a run dir or checkpoint")
    if weights is not None and len(names) != 1:
        raise OptionError("weights", "gives the weights of the one model named as an architecture, but "
                          + (f"{len(names)} are: {', '.join(names)}" if names else "every model is a run dir "
                             "or checkpoint"))
    return set(names)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    input_size: tuple[int, int, int] | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    new_head: bool = False,
) -> EnsModel:
    """Build model `name` taking [0, 1] input; optionally load `weights` (a checkpoint).

    `input_size` is the (C, H, W) of the data it will see (default: the model's own);
    the MNIST architectures adapt their FC layer to it, torchvision/timm models keep
    their graph and 1-channel data is repeated to 3 channels. `new_head` loads `weights`
    except the classifier head, which keeps its fresh initialisation (fine-tuning to
    another number of classes).
    """
    if name in MNIST_ARCHS:
        c, h, w = input_size or (1, 28, 28)
        if h != w:
            raise ModelError(f"architecture {name} needs square input, got {h}x{w}")
        net: nn.Module = _mnist_net(name, c, h, num_classes)
        config = ModelConfig(name, num_classes, (c, h, w), (0.0,) * c, (1.0,) * c, "mnist")
        if pretrained:
            raise ModelError(f"architecture {name} has no hub weights; train it with `enspipe train`")
    elif name.startswith("timm:"):
        in_chans = input_size[0] if input_size else 3
        net, size, mean, std = _timm_net(name[5:], num_classes, in_chans, pretrained)
        if in_chans != size[0]:
            mean, std = mean[:1] * in_chans, std[:1] * in_chans
        size = (in_chans, *(input_size[1:] if input_size else size[1:]))
        config = ModelConfig(name, num_classes, size, tuple(mean)[:in_chans], tuple(std)[:in_chans], "timm")
    else:
        net, size = _torchvision_net(name, num_classes, pretrained)
        c = input_size[0] if input_size else 3
        size = (c, *(input_size[1:] if input_size else size[1:]))
        mean, std = (_TF_MEAN_STD, _TF_MEAN_STD) if name in _TF_PORTED else (IMAGENET_MEAN, IMAGENET_STD)
        config = ModelConfig(name, num_classes, size, mean, std, "torchvision")
    model = EnsModel(net, config, provenance={"pretrained": pretrained})
    if weights is not None:
        load_weights(model, weights, new_head=new_head)
    return model


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


class HeadMismatch(ModelError):
    """Weights that fit the architecture except its classifier head (another number of classes).
    A stage that cannot take a fresh head (precompute, evaluate) says what to do instead."""

    def __init__(self, message: str, *, weights: str, model_classes: int, file_classes: int):
        super().__init__(message)
        self.weights, self.model_classes, self.file_classes = weights, model_classes, file_classes


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


def resolve_model(spec: str, *, weights: str | None = None, pretrained: bool = False,
                  num_classes: int = 10, input_size: tuple[int, int, int] | None = None,
                  new_head: bool = False) -> EnsModel:
    """The CLI's `--model`: a run dir / checkpoint path, or a registry name (+ --weights);
    which of the two is `is_model_path`'s rule."""
    p = Path(spec)
    given = weights is not None or pretrained
    if not given and is_model_path(spec):
        return load_model(p)
    return create_model(spec, num_classes=num_classes, input_size=input_size,
                        pretrained=pretrained, weights=weights, new_head=new_head)


BINARIZED_PREFIX = "binarized:"  # a spec prefix: the model behind input binarization (Appendix C.1)
BINARIZED_MASKED_PREFIX = "binarized-masked:"  # the same with its true, zero input gradient


def load_model_for(spec: str | os.PathLike, dataset: Any, device: torch.device | str, *,
                   weights: str | os.PathLike | None = None, pretrained: bool = False,
                   new_head: bool = False) -> nn.Module:
    """The model `spec` names, fitted to `dataset`, on `device`, in eval mode.

    `spec` is a run dir / checkpoint path or a registry name (built for the dataset's
    classes and geometry; `weights`, `pretrained` and `new_head` as in `create_model`);
    "binarized:SPEC" wraps that model in `Binarized` with a straight-through (BPDA) gradient,
    how white-box attacks are evaluated on it; "binarized-masked:SPEC" with its true, zero
    gradient (the gradient-masking diagnostic). `dataset` is anything with
    `num_classes` and `geometry.shape` (a `SampleSource`). A model that takes another
    input geometry or predicts another number of classes than the data has is refused
    with a ConfigError. Callers that train switch the model to train mode themselves.
    """
    spec = os.fspath(spec)
    for prefix, gradient in ((BINARIZED_PREFIX, "bpda"), (BINARIZED_MASKED_PREFIX, "zero")):
        if spec.startswith(prefix):
            from enspipe.binarize import Binarized

            inner = load_model_for(spec[len(prefix):], dataset, device, weights=weights,
                                   pretrained=pretrained, new_head=new_head)
            return Binarized(inner, gradient=gradient).eval()
    shape = tuple(dataset.geometry.shape)
    model = resolve_model(spec, weights=None if weights is None else os.fspath(weights), pretrained=pretrained,
                          num_classes=dataset.num_classes, input_size=shape, new_head=new_head)
    if tuple(model.config.input_size) != shape:
        size = lambda s: "x".join(map(str, s))  # noqa: E731
        raise ConfigError(f"model {spec} takes {size(model.config.input_size)} input but the data is {size(shape)}")
    if model.config.num_classes != dataset.num_classes:
        raise ConfigError(f"model {spec} predicts {model.config.num_classes} classes but the data has "
                          f"{dataset.num_classes}")
    return model.to(device).eval()
