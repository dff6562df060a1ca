"""An attack without a function of its own (`attacks._stored_step`) checks and copies x once, in the
direction it shares with `direction()`, not a second time to apply it. Oracle: the calls, counted here."""
from __future__ import annotations

import torch
from torch import nn

from enspipe import attacks
from enspipe.attack_records import ATTACK_RECORDS, AttackRecord


def test_a_stored_step_prepares_x_once(monkeypatch):
    rec = AttackRecord("fgsm_stored", "fgsm_stored", None, "single-step", label="given",
                       direction="_sign_direction", store={"loss": "ce", "direction": "sign(grad)"})
    monkeypatch.setitem(ATTACK_RECORDS, rec.name, rec)
    calls = []
    real = attacks._prepare
    monkeypatch.setattr(attacks, "_prepare", lambda *a: calls.append(a[2]) or real(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    with torch.inference_mode():
        x_inf = x.clone()
    got, d = attacks.ATTACKS[rec.name](model, x_inf, y, eps=0.25, return_direction=True)
    assert len(calls) == 1
    assert not got.is_inference() and torch.equal(got, (x + 0.25 * d.float()).clamp(0, 1))
