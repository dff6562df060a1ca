"""Precision: one vocabulary, one object per run (dtype, autocast, channels_last, grad scaler,
native support), and the only place a precision name is checked."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from enspipe.config import OptionError, _opt
from enspipe.precision import PRECISIONS, STORE_PRECISIONS, Precision

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"


def test_every_precision_field_takes_the_one_vocabulary():
    import enspipe

    seen = {}
    for name in ("TrainConfig", "PrecomputeConfig", "EvalConfig", "DiagnoseConfig"):
        for f in dataclasses.fields(getattr(enspipe, name)):
            if f.name == "precision":
                seen[name] = _opt(f).choices
    assert seen == {"TrainConfig": PRECISIONS, "PrecomputeConfig": STORE_PRECISIONS}
    assert PRECISIONS == ("fp32", "bf16", "fp16") and STORE_PRECISIONS == ("fp32", "bf16")
    # No other module names the vocabulary: the string is compared in precision.py alone.
    spelled = [p.relative_to(PIPELINE) for p in PIPELINE.rglob("*.py")
               if '"fp16"' in p.read_text() or "== \"bf16\"" in p.read_text()]
    assert spelled == [Path("precision.py")], spelled


def test_what_each_precision_resolves_to():
    cpu = torch.device("cpu")
    fp32, bf16, fp16 = (Precision.resolve(n, cpu) for n in PRECISIONS)
    assert (fp32.dtype, bf16.dtype, fp16.dtype) == (torch.float32, torch.bfloat16, torch.float16)
    assert (fp32.autocast_dtype, bf16.autocast_dtype) == (None, torch.bfloat16)
    assert not any(p.channels_last for p in (fp32, bf16, fp16))  # on the CPU NHWC does not pay
    assert Precision("bf16", torch.device("cuda")).channels_last and not Precision("fp32", torch.device("cuda")).channels_last
    x = torch.ones(2, 3)
    with bf16.autocast():
        assert (x @ x.T).dtype == torch.bfloat16
    with fp32.autocast():
        assert (x @ x.T).dtype == torch.float32
    # The wrapped model runs its own forward under the autocast and returns fp32 logits.
    lin = torch.nn.Linear(3, 2)
    assert bf16.wrap(lin)(x).dtype == torch.float32 and fp32.wrap(lin) is lin
    # An unknown name is refused once, by the config field's declared choices (resolve takes
    # only names a config let through).
    from enspipe.configs.train import TrainConfig

    with pytest.raises(OptionError, match="precision must be one of fp32, bf16, fp16, not 'fp8'"):
        TrainConfig(model="A", precision="fp8")


def test_the_grad_scaler_is_a_no_op_unless_fp16():
    """A no-op scaler steps exactly as plain backward + step (same weights, bit for bit)."""
    def step(scaler_of: str | None) -> torch.Tensor:
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        loss = lin(torch.ones(3, 4)).pow(2).sum()
        if scaler_of is None:
            loss.backward()
            opt.step()
        else:
            scaler = Precision.resolve(scaler_of, "cpu").grad_scaler()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            assert scaler.is_enabled() == (scaler_of == "fp16") and (scaler.state_dict() == {}) == (scaler_of != "fp16")
        return lin.weight.detach().clone()

    plain = step(None)
    assert torch.equal(step("fp32"), plain) and torch.equal(step("bf16"), plain)
    assert isinstance(Precision.resolve("fp16", "cpu").grad_scaler(), torch.amp.GradScaler)


def test_strict_refuses_what_the_device_cannot_compute_natively(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a CPU without bf16
    with pytest.raises(OptionError) as e:
        Precision.resolve("bf16", "cpu", strict=True)
    assert e.value.field == "precision" and "bf16 cannot run on device cpu" in str(e.value)
    assert "\n" not in str(e.value)
    # The trainer's documented fallback: autocast emulates it (not strict).
    assert not Precision.resolve("bf16", "cpu").native
    Precision.resolve("fp32", "cpu", strict=True)
