"""Issue 24: evaluate reads a precomputed store of the evaluation images as a black-box source
(Table 1: each source's Step-LL directions computed once, applied to every target) and as a
target's own white-box attack. Oracle: the same cells computed in the test, with plain torch,
from the models and the attack's definition (Step-LL: x - eps * sign(grad of the loss of the
least-likely class)); the store's bytes are not trusted."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from enspipe.evaluate import EvalConfig, evaluate
from enspipe.models import load_model
from enspipe.precompute import PrecomputeConfig, precompute

EPS = 0.2
N = 120


@pytest.fixture(scope="module")
def stores(digits_static, digits_static2, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("val-stores")
    out = {}
    for name, model in (("D", digits_static), ("Bstar", digits_static2)):
        (out[name],) = precompute(PrecomputeConfig(model=str(model), out=str(root), dataset="digits", split="test",
                                                   limit=N, attacks=("step_ll",), shard_size=64, batch_size=64,
                                                   device="cpu"))
    return out


def _step_ll_errors(source, targets, x, y, eps) -> dict[str, int]:
    """Top-1 errors of each target on Step-LL examples crafted on `source`, by hand."""
    x = x.clone().requires_grad_(True)
    logits = source(x)
    ll = logits.argmin(1)
    loss = torch.nn.functional.cross_entropy(logits, ll, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    x_adv = (x - eps * g.sign()).clamp(0, 1).detach()
    with torch.no_grad():
        return {t: int((m(x_adv).argmax(1) != y).sum()) for t, m in targets.items()}


def test_store_cells_equal_step_ll_computed_by_hand(digits_static, digits_static2, stores):
    from enspipe.data import create_dataset

    names = {str(stores["D"]): "D", str(stores["Bstar"]): "Bstar", str(digits_static): "D",
             str(digits_static2): "Bstar"}
    res = evaluate(EvalConfig(models=(str(digits_static), str(digits_static2)), dataset="digits", limit=N,
                              attacks=(), eps=EPS, source_stores=(str(stores["D"]), str(stores["Bstar"])),
                              names=names, device="cpu", batch_size=50))
    data = create_dataset("digits", split="test", limit=N)
    x, y = data.images(slice(0, N)), torch.as_tensor(data.labels[:N])
    models = {"D": load_model(digits_static).eval(), "Bstar": load_model(digits_static2).eval()}
    for source in ("D", "Bstar"):
        want = _step_ll_errors(models[source], models, x, y, EPS)
        for target in ("D", "Bstar"):
            cell = res["models"][target]["blackbox"][source]["step_ll"]
            assert (cell["n"], cell["errors"]) == (N, want[target]), (source, target)
            if source == target:  # the diagonal is the white-box attack (Table 1)
                assert res["models"][target]["whitebox"]["step_ll"]["errors"] == want[target]
    # Not every cell is 0 or N: the oracle can tell a wrong direction from a right one.
    cells = [res["models"][t]["blackbox"][s]["step_ll"]["errors"] for t in models for s in models]
    assert any(0 < c < N for c in cells), cells
    # A store's own model is white-box, never black-box: the max over other sources only.
    assert res["models"]["D"]["blackbox_max"] == res["models"]["D"]["blackbox"]["Bstar"]["step_ll"]["error"]
    assert res["stores"]["D"]["attack"] == "step_ll" and res["attack_params"]["step_ll"] == {"eps": EPS}


def test_own_store_is_white_box_only(digits_static, digits_static2, stores):
    names = {str(stores["D"]): "D", str(digits_static): "D", str(digits_static2): "Bstar"}
    res = evaluate(EvalConfig(models=(str(digits_static), str(digits_static2)), dataset="digits", limit=N,
                              attacks=(), eps=EPS, whitebox_stores=(str(stores["D"]),), names=names,
                              device="cpu", batch_size=50))
    assert "step_ll" in res["models"]["D"]["whitebox"]
    assert res["models"]["Bstar"]["blackbox"] == {} and res["models"]["Bstar"]["whitebox"] == {}
    assert res["models"]["D"]["blackbox_max"] is None


def test_a_store_of_other_images_is_refused(digits_static, stores):
    from enspipe.util.errors import EnspipeError

    with pytest.raises(EnspipeError, match=r"samples|fingerprint|field: dataset\.limit"):
        evaluate(EvalConfig(models=(str(digits_static),), dataset="digits", limit=N // 2, attacks=(), eps=EPS,
                            source_stores=(str(stores["D"]),), device="cpu"))


def test_stores_that_would_share_a_count_are_refused(digits_static, digits_static2, stores):
    """Two stores of one model, or a store whose attack also runs online on the same model, would
    add into one counter (n = 2N, two attacks in one cell): refused, naming the field."""
    from enspipe.config import OptionError

    base = dict(models=(str(digits_static),), dataset="digits", limit=N, eps=EPS, device="cpu")
    names = {str(stores["D"]): "D", str(stores["Bstar"]): "D"}
    with pytest.raises(OptionError, match=r"source_stores.*two stores of D"):
        evaluate(EvalConfig(**base, attacks=(), source_stores=(str(stores["D"]), str(stores["Bstar"])),
                            names=names))
    with pytest.raises(OptionError, match=r"whitebox_stores.*step_ll directions of D"):
        evaluate(EvalConfig(**base, attacks=("step_ll",), whitebox_stores=(str(stores["D"]),),
                            names={str(stores["D"]): "D", str(digits_static): "D"}))
