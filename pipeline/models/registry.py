"""The registry: which names are architectures, which specs are paths, and `create_model`.
"""
from __future__ import annotations

import os

from torch import nn

from enspipe.util.errors import ModelError
from enspipe.models.core import IMAGENET_MEAN, IMAGENET_STD, EnsModel, ModelConfig
from enspipe.models.hub import _TF_MEAN_STD, _TF_PORTED, _timm_net, _torchvision_net
from enspipe.models.mnist import MNIST_ARCHS, _mnist_net


__all__ = ["BINARIZED_MASKED_PREFIX", "BINARIZED_PREFIX", "check_model_name", "check_weights", "create_model", "is_architecture", "is_model_path", "is_registered"]

BINARIZED_PREFIX = "binarized:"  # a spec prefix: the model behind input binarization (Appendix C.1)
BINARIZED_MASKED_PREFIX = "binarized-masked:"  # the same with its true, zero input gradient

# --- Registry ---------------------------------------------------------------------------

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
        from enspipe.models.checkpoints import load_weights  # it imports this module

        load_weights(model, weights, new_head=new_head)
    return model
