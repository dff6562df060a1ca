"""Model registry: the paper's MNIST architectures, torchvision and timm models.

The rooms: `core` (ModelConfig, EnsModel), `registry` (names -> architectures, `create_model`),
`mnist` (Table 5's networks), `hub` (torchvision and timm networks, their hub weights offline),
`checkpoints` (save and load, every number checked), `binarize` (input binarization); this face
re-exports their public names and resolves specs (`resolve_model`, `load_model_for`).

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

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enspipe.models.checkpoints import load_model, load_weights, save_model, weights_sha256
from enspipe.models.core import CHECKPOINT_FORMAT, IMAGENET_MEAN, IMAGENET_STD, EnsModel, HeadMismatch, ModelConfig
from enspipe.models.mnist import MNIST_ARCHS
from enspipe.models.registry import (
    BINARIZED_MASKED_PREFIX,
    BINARIZED_PREFIX,
    check_model_name,
    check_weights,
    create_model,
    is_architecture,
    is_model_path,
    is_registered,
)
from enspipe.util.errors import ConfigError

__all__ = ["BINARIZED_MASKED_PREFIX", "BINARIZED_PREFIX", "CHECKPOINT_FORMAT", "IMAGENET_MEAN", "IMAGENET_STD",
           "MNIST_ARCHS", "EnsModel", "HeadMismatch", "ModelConfig", "check_model_name", "check_weights",
           "create_model", "is_architecture", "is_model_path", "is_registered", "load_model", "load_model_for",
           "load_weights", "resolve_model", "save_model", "weights_sha256"]


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
            from enspipe.models.binarize import Binarized

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
