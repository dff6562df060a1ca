"""Issue 13: the adversarial training losses (`replace`, `paired`) against hand-computed values."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from enspipe.config import OptionError
from enspipe.train.losses import training_loss
from enspipe.train import TrainConfig, train


def _ce(row: list[float], label: int) -> float:
    """Cross-entropy of one row of logits, by hand: log sum exp - the label's logit."""
    return math.log(sum(math.exp(v) for v in row)) - row[label]


@pytest.fixture
def step():
    """One training step's pieces: a linear model, a uint8 batch whose first k rows are
    replaced by adversarial inputs, and the logits of what the trainer feeds the model."""
    torch.manual_seed(0)
    m, k = 6, 2
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x_uint8 = torch.randint(0, 256, (m, 1, 2, 2), dtype=torch.uint8)
    clean = x_uint8.float() / 255
    adv = (clean[:k] + 0.3 * torch.randn(k, 1, 2, 2).sign()).clamp(0, 1)
    x = torch.cat([adv, clean[k:]])
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    batch = {"x": x_uint8, "y": y, "n_adv": k}
    with torch.no_grad():
        logits, clean_logits = model(x), model(clean)
    return SimpleNamespace(model=model, batch=batch, x=x, y=y, k=k, m=m,
                           logits=logits.tolist(), clean_logits=clean_logits.tolist())


def _cfg(adv_loss: str, adv_weight: float) -> SimpleNamespace:
    return SimpleNamespace(adv_loss=adv_loss, adv_weight=adv_weight)


def test_replace_is_kurakins_weighted_loss(step):
    lam, k, m = 0.3, step.k, step.m
    adv = sum(_ce(step.logits[i], int(step.y[i])) for i in range(k))
    clean = sum(_ce(step.logits[i], int(step.y[i])) for i in range(k, m))
    want = (clean + lam * adv) / (m - k + lam * k)
    logits = step.model(step.x)
    got = training_loss(step.model, logits, step.y, step.batch, _cfg("replace", lam))
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.backward()  # a loss the trainer can step on


def test_replace_with_lambda_one_is_the_old_mean_bit_for_bit(step):
    logits = step.model(step.x)
    assert torch.equal(training_loss(step.model, logits, step.y, step.batch, _cfg("replace", 1.0)),
                       F.cross_entropy(logits, step.y))


def test_paired_adds_the_whole_clean_batch(step):
    lam, k, m = 0.3, step.k, step.m
    adv = sum(_ce(step.logits[i], int(step.y[i])) for i in range(k))
    clean = sum(_ce(step.clean_logits[i], int(step.y[i])) for i in range(m))
    want = (clean + lam * adv) / (m + lam * k)
    got = training_loss(step.model, step.model(step.x), step.y, step.batch, _cfg("paired", lam))
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)


def test_paired_with_the_whole_batch_is_the_reference_codes_half_and_half(step):
    """adv_fraction = 1, lambda = 1: 0.5 * mean CE(clean) + 0.5 * mean CE(adv) (tf_utils.tf_train)."""
    m = step.m
    adv_x = (step.batch["x"].float() / 255 + 0.2).clamp(0, 1)
    batch = {**step.batch, "n_adv": m}
    with torch.no_grad():
        adv_logits, clean_logits = step.model(adv_x).tolist(), step.model(step.batch["x"].float() / 255).tolist()
    want = 0.5 * sum(_ce(clean_logits[i], int(step.y[i])) for i in range(m)) / m \
        + 0.5 * sum(_ce(adv_logits[i], int(step.y[i])) for i in range(m)) / m
    got = training_loss(step.model, step.model(adv_x), step.y, batch, _cfg("paired", 1.0))
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)


def test_a_clean_batch_is_the_plain_mean(step):
    logits = step.model(step.x)
    for form in ("replace", "paired"):
        got = training_loss(step.model, logits, step.y, {**step.batch, "n_adv": 0}, _cfg(form, 0.3))
        assert torch.equal(got, F.cross_entropy(logits, step.y))


def test_train_config_defaults_and_checks():
    cfg = TrainConfig(model="A")
    assert (cfg.adv_loss, cfg.adv_weight) == ("replace", 1.0)  # today's behaviour stays the default
    for bad in ({"adv_loss": "mixed"}, {"adv_weight": 0.0}, {"adv_weight": float("nan")}):
        with pytest.raises(OptionError):
            TrainConfig(model="A", **bad)


def test_paired_trains_end_to_end(tmp_path):
    cfg = TrainConfig(model="D", dataset="digits", limit=256, mode="adv", adv_loss="paired", adv_fraction=1.0,
                      epochs=1, batch_size=64, device="cpu", log_every=1)
    train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["loss"]) and r["online_passes"] == r["batches"] for r in records)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["adv_loss"] == "paired" and saved["adv_fraction"] == 1.0
