"""enspipe.diagnostics on scikit-learn's digits (upsampled to 1x16x16, so d = 256 >= 100
directions fit), with a tiny MLP trained once per session and a binary linear model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from enspipe.attacks import fgsm
from enspipe.diagnostics import (
    _WILLIAMSON_25,
    Binarized,
    _orthogonal_signed,
    _williamson_regular,
    _williamson_search,
    aligned_subspace,
    approximation_ratio,
    count_adversarial_directions,
    diagnose,
    input_gradient_norm,
    loss_surface,
    perturbation_cosine,
    plot_loss_surface,
    plot_subspace,
    regular_hadamard,
)
from enspipe.util.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def digits16() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x, torch.tensor(data.target, dtype=torch.int64)


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="session")
def mlp(digits16) -> nn.Module:
    """A small ReLU network: nonlinear, so a single step is not the optimum."""
    # On the suite's one thread (conftest.py): this fixture once set two for the rest of the process.
    torch.manual_seed(0)
    x, y = digits16
    net = _train(nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)), x[:1500], y[:1500], 10)
    with torch.no_grad():
        assert (net(x[1500:]).argmax(1) == y[1500:]).float().mean() > 0.85  # a real, trained model
    return net


@pytest.fixture(scope="session")
def mlp2(digits16) -> nn.Module:
    torch.manual_seed(1)
    x, y = digits16
    return _train(nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10)), x[:1500], y[:1500], 5)


@pytest.fixture(scope="session")
def linear(digits16) -> nn.Module:
    """A binary linear classifier (even vs odd digits): its loss is a monotone function of
    one linear function of x, so the single signed step is exactly the optimum in the box."""
    torch.manual_seed(2)
    x, y = digits16
    return _train(nn.Sequential(nn.Flatten(), nn.Linear(256, 2)), x[:1500], y[:1500] % 2, 3)


@pytest.fixture(scope="session")
def batch(digits16) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits16
    return x[1500:1564], y[1500:1564]


# --- Appendix E: regular Hadamard matrices -------------------------------------------------

@pytest.mark.parametrize("k", [4, 16, 36, 64, 100, 144, 400])
def test_regular_hadamard_is_regular_and_orthogonal(k):
    H = regular_hadamard(k)
    root = math.isqrt(k)
    assert H.shape == (k, k)
    assert set(np.unique(H)) == {-1, 1}
    assert np.array_equal(H @ H.T, k * np.eye(k, dtype=np.int64))
    assert np.all(H.sum(axis=1) == root)  # every row sums to sqrt(k): "regular"
    assert np.all(H.sum(axis=0) == root)  # and so does every column (H^T is regular too)


@pytest.mark.parametrize("k", [0, 2, 8, 12, 196])
def test_unbuilt_orders_are_refused(k):
    # 196 = 4 * 7^2 is a regular order, but no construction for it is built here: say so.
    with pytest.raises(ConfigError):
        regular_hadamard(k)


def test_the_order_100_sequences_are_reproduced_by_their_search():
    assert _williamson_search(25, 5) == _WILLIAMSON_25
    # The same search at order 9 gives an independent order-36 matrix: also regular.
    H = _williamson_regular(_williamson_search(9, 3))
    assert np.array_equal(H @ H.T, 36 * np.eye(36, dtype=np.int64)) and np.all(H.sum(1) == 6)


# --- Lemma 7 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [4, 16, 36, 64, 100])
@pytest.mark.parametrize("extra", [0, 7])  # k divides d, or d mod k = 7 coordinates are padding
def test_aligned_subspace_meets_lemma_7(k, extra):
    gen = torch.Generator().manual_seed(k + extra)
    d = 12 * k + extra
    g = torch.randn(d, generator=gen, dtype=torch.float64) ** 3  # uneven weights, as real gradients
    r = aligned_subspace(g, k, generator=gen)
    m = d // k
    assert r.shape == (k, d)
    assert set(r.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # mutually orthogonal, each with m*k nonzero entries
    assert torch.equal(r @ r.T, m * k * torch.eye(k, dtype=r.dtype))
    # sign(g)^T r_i = m sqrt(k) for every i (= d / sqrt(k) when k | d): Lemma 7's tight bound
    assert torch.allclose(r @ g.sign(), torch.full((k,), m * math.sqrt(k), dtype=r.dtype))
    # mean_i g^T r_i = ||g on the used coordinates||_1 / sqrt(k), whatever the permutation
    used = r.abs().amax(0) > 0
    assert torch.allclose((r @ g).mean(), g[used].abs().sum() / math.sqrt(k))
    if extra == 0:
        assert torch.allclose((r @ g).mean(), g.abs().sum() / math.sqrt(k))


def test_lemma_7_expectation_over_permutations():
    # E[g^T r_i] = ||g||_1 / sqrt(k) for each single i, over the random permutation.
    gen = torch.Generator().manual_seed(0)
    k, d = 16, 16 * 40
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    samples = torch.stack([aligned_subspace(g, k, generator=gen)[3] @ g for _ in range(400)])
    expected = g.abs().sum() / math.sqrt(k)
    assert abs(samples.mean() - expected) < 0.05 * expected


def test_orthogonal_signed_direction():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(5, 300, generator=gen).sign()
    other = torch.randn(5, 300, generator=gen) + 0.5 * g  # correlated with g, as transfer is
    o = _orthogonal_signed(g, other)
    assert torch.equal((g * o).sum(1), torch.zeros(5))
    assert set(o.unique().tolist()) <= {-1.0, 0.0, 1.0}
    kept = o != 0
    assert torch.equal(o[kept], other.sign()[kept])  # only zeroes entries, never flips them


# --- §4 / Table 6 ----------------------------------------------------------------------------

def test_approximation_ratio_of_a_linear_model_is_one(linear, batch):
    x, y = batch
    res = approximation_ratio(linear, x, y % 2, eps=0.1, steps=20)
    assert res["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert res["gap"] == pytest.approx(0.0, abs=1e-5)
    assert res["loss_single"] > res["loss_clean"]
    cos = perturbation_cosine(linear, x, y % 2, eps=0.1, steps=20)
    assert cos["mean"] == pytest.approx(1.0, abs=1e-5)  # both attacks reach the same vertex


def test_approximation_ratio_of_a_nonlinear_model_has_a_gap(mlp, batch):
    x, y = batch
    res = approximation_ratio(mlp, x, y, eps=0.3, steps=20)
    assert 0.02 < res["gap"] < 1 and res["ratio"] == pytest.approx(1 - res["gap"])
    assert res["loss_opt"] >= res["loss_iterative"] and res["loss_opt"] >= res["loss_single"]
    assert 0 <= res["ratio_per_point"] <= 1
    cos = perturbation_cosine(mlp, x, y, eps=0.3, steps=20)
    assert -1 <= cos["mean"] < 0.99


def test_input_gradient_norm_matches_autograd(mlp, batch):
    x, y = batch
    res = input_gradient_norm(mlp, x, y, batch_size=10)  # chunking must not change the result
    xg = x[:1].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(mlp(xg), y[:1]), xg)
    one = input_gradient_norm(mlp, x[:1], y[:1])
    assert one["l1"] == pytest.approx(float(g.abs().sum()), rel=1e-5)
    assert one["l2"] == pytest.approx(float(g.norm()), rel=1e-5)
    assert res["n"] == len(x) and res["l1"] > res["l2"] > 0


# --- Appendix C.1 ----------------------------------------------------------------------------

def test_binarized_has_zero_input_gradient(mlp, batch):
    x, y = batch
    model = Binarized(mlp)
    with torch.no_grad():
        assert torch.equal(model(x), mlp((x > 0.5).float()))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    assert torch.count_nonzero(g) == 0
    assert torch.equal(fgsm(model, x, y, eps=0.3), x)  # the white-box gradient attack cannot move
    assert input_gradient_norm(model, x, y)["l1"] == 0.0


# --- Figures 1, 4, 5 and 2 -------------------------------------------------------------------

def test_loss_surface_shape_and_png(mlp, mlp2, batch, tmp_path):
    x, y = batch
    surf = loss_surface(mlp, x[:2], y[:2], eps=0.3, other_direction=mlp2, grid=7)
    assert surf["loss"].shape == (2, 7, 7)
    assert surf["eps1"][0] == 0 and surf["eps1"][-1] == pytest.approx(0.3)
    assert surf["orthogonal"]
    with torch.no_grad():
        clean = F.cross_entropy(mlp(x[:2]), y[:2], reduction="none").numpy()
    assert np.allclose(surf["loss"][:, 0, 0], clean, rtol=1e-5)  # the origin is x itself
    # along its own signed gradient, the loss of a (locally) well-behaved model goes up
    assert surf["loss_along_gradient"][-1] > surf["loss_along_gradient"][0]
    path = plot_loss_surface(surf, tmp_path / "surface.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    # a single image and a tensor direction work too
    one = loss_surface(mlp, x[0], y[0], eps=0.1, other_direction=torch.ones_like(x[0]), grid=3)
    assert one["loss"].shape == (1, 3, 3)


def test_count_adversarial_directions(mlp, batch, tmp_path):
    x, y = batch
    res = count_adversarial_directions(mlp, x[:24], y[:24], eps=[1e-4, 0.5])
    assert res["ks"] == [4, 16, 36, 64, 100] and res["skipped_ks"] == []
    assert 0 < res["n_points"] <= 24  # only the correctly classified points
    tiny, large = res["curves"]
    assert len(large["share_at_least"]) == 100
    assert all(a >= b for a, b in zip(large["share_at_least"], large["share_at_least"][1:]))  # a survival curve
    assert tiny["share_at_least"][0] == 0.0  # a 1e-4 step changes no prediction
    assert large["share_at_least"][0] > 0.5  # eps = 0.5 finds adversarial directions for most points
    assert max(large["directions"]) <= 100
    path = plot_subspace({"mlp": res, "again": res}, tmp_path / "subspace.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    tiny_model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    small = count_adversarial_directions(tiny_model, x[:4, :, :8, :8], y[:4], eps=0.1, ks=(4, 100),
                                         only_correct=False)
    assert small["ks"] == [4] and small["skipped_ks"] == [100]  # d = 64 < 100: skipped, and said


def test_diagnose_writes_json_and_figures(mlp, mlp2, batch, tmp_path):
    x, y = batch
    res = diagnose({"mlp": mlp, "mlp2": mlp2}, x[:16], y[:16], eps=0.3, other=None, out_dir=tmp_path,
                   steps=5, grid=5, surface_points=2, ks=(4, 16))
    data = json.loads((tmp_path / "diagnostics.json").read_text())
    assert set(data["models"]) == {"mlp", "mlp2"}
    m = data["models"]["mlp"]
    assert m["loss_surface"]["other"] == "mlp2"  # the other model's direction spans the surface
    assert 0 <= m["approximation_ratio"]["ratio"] <= 1
    assert np.asarray(m["loss_surface"]["loss"]).shape == (2, 5, 5)
    assert len(m["subspace"]["curves"]) == 3  # eps * (4, 10, 16) / 16
    for name in ["subspace.png", m["figures"]["loss_surface"], data["models"]["mlp2"]["figures"]["loss_surface"]]:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert res["path"] == str(tmp_path / "diagnostics.json")
