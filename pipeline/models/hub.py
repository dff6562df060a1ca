"""torchvision and timm networks: built by name, their hub weights found offline or refused in one line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enspipe.util.errors import ModelError
from enspipe.models.core import HeadMismatch
from enspipe.models.mnist import MNIST_ARCHS
from enspipe.util.netcheck import network_available as _network_reachable


__all__: list[str] = []  # the registry's builders, not a public face

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
