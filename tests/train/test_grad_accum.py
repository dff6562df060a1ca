"""Issue 24: `grad_accum` reaches the paper's effective ImageNet batch on one device (its runs
stepped on 50 replicas x 16). Oracle: the gradient of a mean loss over 32 samples is the mean
of the gradients over its two halves, so one step after two accumulated batches of 16 must
give the weights of one step on a batch of 32 (the same 32 samples: one epoch of exactly 32),
for a network without batch-dependent layers (C: no dropout, no batch norm)."""
from __future__ import annotations

import pytest
import torch

from enspipe.models import load_model
from enspipe.train import TrainConfig, train


def _weights(tmp_path, name: str, **kw) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(model="C", dataset="digits", limit=32, epochs=1, optimizer="sgd", lr=0.5, seed=3,
                      device="cpu", log_every=1000, out=str(tmp_path / name), **kw)
    train(cfg)
    return {k: v.detach().clone() for k, v in load_model(tmp_path / name).state_dict().items()}


def test_two_accumulated_batches_of_16_equal_one_batch_of_32(tmp_path):
    one = _weights(tmp_path, "b32", batch_size=32)
    acc = _weights(tmp_path, "b16x2", batch_size=16, grad_accum=2)
    two_steps = _weights(tmp_path, "b16", batch_size=16)
    moved = max(float((one[k] - two_steps[k]).abs().max()) for k in one)
    assert moved > 1e-3  # two plain steps of 16 differ: the comparison can tell
    for k in one:
        torch.testing.assert_close(acc[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_grad_accum_is_checked():
    from enspipe.config import OptionError

    with pytest.raises(OptionError, match="grad_accum"):
        TrainConfig(model="C", grad_accum=0)
