"""The paper's MNIST architectures (Table 5): A, B, B*, C, C-code, D.
"""
from __future__ import annotations


import torch
from torch import nn

from enspipe.util.errors import ModelError


__all__ = ["MNIST_ARCHS"]

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
