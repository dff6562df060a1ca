"""enspipe.attacks on a small conv net trained on scikit-learn's digits (1x8x8, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from enspipe.attacks import (
    ATTACKS,
    ITERATIVE,
    RANDOM,
    SINGLE_STEP,
    Ensemble,
    apply_direction,
    create_attack,
    cw_margin,
    direction,
    fgsm,
    iter_fgsm,
    iter_ll,
    parse_eps,
    pgd,
    rand_fgsm,
    rand_step_ll,
    step_ll,
)
from enspipe.util.errors import AttackError, EnspipeError

EPSILONS = [16 / 256, 0.3, 1.0]


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    return x, torch.tensor(data.target, dtype=torch.int64)


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    net.zero_grad(set_to_none=True)
    return net


@pytest.fixture(scope="session")
def model(digits) -> nn.Module:
    # On the suite's one thread (conftest.py): this fixture once set two for the rest of the
    # process, and its training alone took 50 s of wall time on a loaded 2-core machine (6.6 s
    # on one thread); the tests below hold for the one-thread model as they did for the other.
    x, y = digits
    net = train(make_net(0), x[:1500], y[:1500])
    with torch.no_grad():
        acc = (net(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert acc > 0.9, acc  # a real, trained model: attacks below act on meaningful gradients
    return net


@pytest.fixture(scope="session")
def model2(digits) -> nn.Module:
    x, y = digits
    return train(make_net(1), x[:1500], y[:1500], epochs=3)


@pytest.fixture(scope="session")
def batch(digits) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits
    return x[1500:1756], y[1500:1756]  # held-out samples


def closed_form_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    return g


def in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> bool:
    return bool(
        (x_adv >= x - eps).all() and (x_adv <= x + eps).all()
        and (x_adv - x).abs().max() <= eps + 1e-6
        and (x_adv >= 0).all() and (x_adv <= 1).all()
    )


def attack_all(name: str, model, x, y, eps, seed=0) -> torch.Tensor:
    params = {"eps": eps}
    if name in ("rand_fgsm", "rand_step_ll", "pgd", "pgd_cw"):
        params["generator"] = torch.Generator().manual_seed(seed)
    if name in ("pgd", "pgd_cw"):
        params["steps"] = 5
    return create_attack(name, **params)(model, x, y)


# ---------------------------------------------------------------------------- threat model


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_respects_the_eps_ball_and_the_pixel_range(name, model, batch):
    x_real, y = batch[0][:64], batch[1][:64]
    g = torch.Generator().manual_seed(1)
    inputs = {
        "real": x_real,
        "random": torch.rand(x_real.shape, generator=g),
        "zeros": torch.zeros_like(x_real),
        "ones": torch.ones_like(x_real),
        "borders": torch.randint(0, 2, x_real.shape, generator=g).float(),
    }
    for eps in EPSILONS:
        for kind, x in inputs.items():
            x_adv = attack_all(name, model, x, y, eps)
            assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
            assert in_ball(x_adv, x, eps), (name, eps, kind)
        if eps < 1:
            x_adv = attack_all(name, model, x_real, y, eps)
            assert not torch.equal(x_adv, x_real), name  # it does move


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_leave_grads_and_mode_alone(name, model, batch):
    x, y = batch[0][:32], batch[1][:32]
    for training in (False, True):
        model.train(training)
        try:
            attack_all(name, model, x, y, 0.1)
            assert all(m.training == training for m in model.modules())
            assert all(p.grad is None for p in model.parameters())
        finally:
            model.eval()


def test_attacks_run_inside_no_grad_and_autocast_in_float32(model, batch):
    x, y = batch[0][:32], batch[1][:32]
    ref = fgsm(model, x, y, eps=0.1)
    with torch.no_grad():
        assert torch.equal(fgsm(model, x, y, eps=0.1), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fgsm(model, x, y, eps=0.1), ref)
    with torch.inference_mode(), pytest.raises(AttackError):
        fgsm(model, x, y, eps=0.1)


# ---------------------------------------------------------------------------- single step


@pytest.mark.parametrize("eps", EPSILONS)
def test_fgsm_equals_its_closed_form(model, batch, eps):
    x, y = batch
    expected = (x + eps * closed_form_grad(model, x, y).sign()).clamp(0, 1)
    assert torch.equal(fgsm(model, x, y, eps=eps), expected)


@pytest.mark.parametrize("eps", EPSILONS)
def test_step_ll_equals_its_closed_form(model, batch, eps):
    x, _ = batch
    y_ll = model(x).argmin(1)
    expected = (x - eps * closed_form_grad(model, x, y_ll).sign()).clamp(0, 1)
    assert torch.equal(step_ll(model, x, eps=eps), expected)
    assert torch.equal(step_ll(model, x, torch.zeros_like(y_ll), eps=eps), expected)  # y unused


def test_label_pred_uses_the_argmax(model, batch):
    x, y = batch
    pred = model(x).argmax(1)
    assert not torch.equal(pred, y)  # some held-out digits are misclassified: the cases that differ
    ref = fgsm(model, x, pred, eps=0.1)
    assert torch.equal(fgsm(model, x, eps=0.1, label="pred"), ref)
    assert torch.equal(fgsm(model, x, (y + 1) % 10, eps=0.1, label="pred"), ref)  # y ignored
    _, _, labels = direction(model, x, attack="fgsm", label="pred")
    assert torch.equal(labels, pred)
    assert torch.equal(iter_fgsm(model, x, eps=0.1, steps=3, label="pred"),
                       iter_fgsm(model, x, pred, eps=0.1, steps=3))


def test_direction_round_trip(model, batch):
    x, y = batch
    d, logits, labels = direction(model, x, y, attack="fgsm")
    assert d.dtype == torch.int8 and d.shape == x.shape and set(d.unique().tolist()) <= {-1, 0, 1}
    assert logits.dtype == torch.float32 and logits.shape == (len(x), 10)
    assert labels.dtype == torch.int64 and torch.equal(labels, y)
    assert torch.allclose(logits, model(x))
    for eps in (16 / 256, 0.3):
        assert torch.equal(apply_direction(x, d, eps), fgsm(model, x, y, eps=eps))
        per_example = torch.full((len(x),), eps)
        assert torch.equal(apply_direction(x, d, per_example), fgsm(model, x, y, eps=eps))

    d_ll, _, y_ll = direction(model, x, attack="step_ll")
    assert torch.equal(y_ll, model(x).argmin(1))
    for eps in (16 / 256, 0.3):
        assert torch.equal(apply_direction(x, d_ll, eps), step_ll(model, x, eps=eps))

    x_adv, d_ret = fgsm(model, x, y, eps=0.3, return_direction=True)
    assert torch.equal(d_ret, d) and torch.equal(x_adv, apply_direction(x, d, 0.3))

    # Per-example eps really is per example.
    eps = torch.linspace(0, 0.5, len(x))
    x_adv = apply_direction(x, d, eps)
    assert torch.equal(x_adv[0], x[0]) and in_ball(x_adv[-1], x[-1], 0.5)
    with pytest.raises(AttackError):
        apply_direction(x, d[:3], 0.1)


# ---------------------------------------------------------------------------- random step


@pytest.mark.parametrize("attack", [rand_fgsm, rand_step_ll])
def test_random_step_attacks_are_seeded(attack, model, batch):
    x, y = batch

    def run(seed: int) -> torch.Tensor:
        return attack(model, x, y, eps=0.3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    def run_pgd(seed: int) -> torch.Tensor:
        return pgd(model, x, y, eps=0.3, steps=2, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run_pgd(3), run_pgd(3))
    assert not torch.equal(run_pgd(3), run_pgd(4))


def test_rand_fgsm_follows_eq_7(model, batch):
    x, y = batch
    eps, alpha = 0.3, 0.1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).sign()
    x_start = (x + alpha * noise).clamp(0, 1)
    expected = x_start + (eps - alpha) * closed_form_grad(model, x_start, y).sign()
    expected = torch.minimum(torch.maximum(expected, x - eps), x + eps).clamp(0, 1)
    got = rand_fgsm(model, x, y, eps=eps, alpha=alpha, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)
    # alpha = 0 is FGSM.
    assert torch.equal(rand_fgsm(model, x, y, eps=eps, alpha=0.0), fgsm(model, x, y, eps=eps))


# ---------------------------------------------------------------------------- iterative


def test_one_step_iterative_equals_single_step(model, batch):
    x, y = batch
    for eps in (16 / 256, 0.3):
        once = iter_fgsm(model, x, y, eps=eps, steps=1, alpha=eps)
        assert torch.equal(once, fgsm(model, x, y, eps=eps))
        assert torch.equal(iter_ll(model, x, eps=eps, steps=1, alpha=eps), step_ll(model, x, eps=eps))
        assert torch.equal(pgd(model, x, y, eps=eps, steps=1, alpha=eps, random_start=False),
                           fgsm(model, x, y, eps=eps))


def test_pgd_reaches_at_least_fgsm_loss(model, batch):
    x, y = batch
    eps = 0.2

    def loss(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return F.cross_entropy(model(x_adv), y).item()

    clean, single = loss(x), loss(fgsm(model, x, y, eps=eps))
    multi = loss(pgd(model, x, y, eps=eps, steps=20, generator=torch.Generator().manual_seed(0)))
    iterative = loss(iter_fgsm(model, x, y, eps=eps, steps=10))
    assert clean < single <= multi and single <= iterative


def test_pgd_cw_increases_the_margin(model, batch):
    x, y = batch
    with torch.no_grad():
        before = cw_margin(model(x), y)
        after = cw_margin(model(pgd(model, x, y, eps=0.2, steps=20, loss="cw", kappa=5.0,
                                    generator=torch.Generator().manual_seed(0))), y)
        after0 = cw_margin(model(create_attack("pgd_cw", eps=0.2, steps=20, kappa=0.0)(model, x, y)), y)
    assert after.mean() > before.mean() + 1.0
    assert (after > 0).float().mean() > (before > 0).float().mean()
    assert (after0 > 0).float().mean() > 0.5  # kappa = 0 still misclassifies most inputs


def test_iter_ll_moves_towards_the_least_likely_class(model, batch):
    x, _ = batch
    with torch.no_grad():
        y_ll = model(x).argmin(1)
        before = F.cross_entropy(model(x), y_ll)
        after = F.cross_entropy(model(iter_ll(model, x, eps=0.3, steps=10)), y_ll)
    assert after < before


# ---------------------------------------------------------------------------- ensembles


def test_ensemble_attack_equals_attack_on_the_averaged_model(model, model2, batch):
    x, y = batch

    class Averaged(nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return torch.stack([model(inp), model2(inp)]).mean(0)

    with torch.no_grad():
        assert torch.allclose(Ensemble([model, model2])(x), (model(x) + model2(x)) / 2, atol=1e-6)
    for members in ([model, model2], (model, model2)):
        assert torch.equal(fgsm(members, x, y, eps=0.1), fgsm(Averaged(), x, y, eps=0.1))
        assert torch.equal(step_ll(members, x, eps=0.1), step_ll(Averaged(), x, eps=0.1))
        assert torch.equal(iter_fgsm(members, x, y, eps=0.1, steps=3),
                           iter_fgsm(Averaged(), x, y, eps=0.1, steps=3))
    assert not torch.equal(fgsm([model, model2], x, y, eps=0.1), fgsm(model, x, y, eps=0.1))
    assert all(p.grad is None for m in (model, model2) for p in m.parameters())
    with pytest.raises(AttackError):
        Ensemble([])


# ---------------------------------------------------------------------------- parameters


def test_parse_eps():
    assert parse_eps("16/256") == 0.0625
    assert parse_eps("0.3") == 0.3 and parse_eps(0.3) == 0.3 and parse_eps(" 1 ") == 1.0
    for bad in ("1/0", "nan", "inf", "-0.1", "0", "1.5", "abc", "", "1/2/3", float("nan"), True):
        with pytest.raises(AttackError, match="eps"):
            parse_eps(bad)


def test_create_attack(model, batch):
    x, y = batch
    attack = create_attack("fgsm", eps="16/256")
    assert torch.equal(attack(model, x, y), fgsm(model, x, y, eps=0.0625))
    assert torch.equal(create_attack("iter_ll", eps=0.3, steps=2, alpha="0.15")(model, x, y),
                       iter_ll(model, x, eps=0.3, steps=2, alpha=0.15))
    with pytest.raises(AttackError, match="known attacks are fgsm"):
        create_attack("deepfool", eps=0.3)
    bad_params = [
        ("fgsm", {"eps": 0.3, "steps": 3}),          # unknown parameter
        ("fgsm", {"eps": 0.3, "return_direction": True}),
        ("fgsm", {}),                                 # eps missing
        ("fgsm", {"eps": "1/0"}),
        ("fgsm", {"eps": 0.3, "label": "gold"}),
        ("rand_fgsm", {"eps": 0.1, "alpha": 0.2}),   # alpha > eps
        ("iter_fgsm", {"eps": 0.3, "steps": 10, "alpha": 0.01}),  # alpha < eps/steps
        ("iter_fgsm", {"eps": 0.3, "steps": 0}),
        ("pgd", {"eps": 0.3, "loss": "hinge"}),
        ("pgd", {"eps": 0.3, "kappa": -1.0}),
        ("pgd", {"eps": 0.3, "alpha": "abc"}),
        ("pgd_cw", {"eps": 0.3, "loss": "ce"}),
    ]
    for name, params in bad_params:
        with pytest.raises(AttackError):
            create_attack(name, **params)
    assert issubclass(AttackError, EnspipeError)


def test_create_attack_seed_and_defaults(model, batch):
    """Stages call every attack by name through create_attack: `seed` is accepted by all,
    used by the random ones, and the defaults are the paper's MNIST settings."""
    x, y = batch[0][:32], batch[1][:32]
    assert set(SINGLE_STEP) | set(ITERATIVE) == set(ATTACKS) and not set(SINGLE_STEP) & set(ITERATIVE)
    for name in ATTACKS:
        by_seed = create_attack(name, eps=0.3, seed=7)
        again = by_seed(model, x, y)
        assert torch.equal(by_seed(model, x, y), again)  # a fresh generator on every call
        if name in RANDOM:
            expected = create_attack(name, eps=0.3, generator=torch.Generator().manual_seed(7))(model, x, y)
        else:
            expected = create_attack(name, eps=0.3)(model, x, y)  # seed ignored
        assert torch.equal(again, expected), name
    assert torch.equal(create_attack("iter_fgsm", eps=0.3)(model, x, y), iter_fgsm(model, x, y, eps=0.3, steps=10))
    assert torch.equal(create_attack("pgd", eps=0.3, seed=1)(model, x, y),
                       pgd(model, x, y, eps=0.3, steps=40, generator=torch.Generator().manual_seed(1)))
    # A generator as the seed is one stream, carried on across calls (two batches in a row).
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    stream = create_attack("rand_fgsm", eps=0.3, seed=gen)
    for half in (slice(0, 16), slice(16, 32)):
        assert torch.equal(stream(model, x[half], y[half]), rand_fgsm(model, x[half], y[half], eps=0.3, generator=ref))
    for bad in ({"seed": "7"}, {"seed": True}, {"seed": 1, "generator": torch.Generator()}):
        with pytest.raises(AttackError):
            create_attack("pgd", eps=0.3, **bad)


def test_bad_calls_raise_attack_error(model, batch):
    x, y = batch
    calls = [
        lambda: fgsm(model, x, eps=0.1),                          # label="true" needs y
        lambda: fgsm(model, x, y.float(), eps=0.1),
        lambda: fgsm(model, x, y[:3], eps=0.1),
        lambda: fgsm(model, x, y, eps=float("nan")),
        lambda: fgsm(model, x, y, eps=1.5),
        lambda: fgsm(model, x.long(), y, eps=0.1),
        lambda: direction(model, x, y, attack="pgd"),
        lambda: rand_fgsm(model, x, y, eps=0.1, alpha=0.2),
        lambda: iter_fgsm(model, x, y, eps=0.3, steps=10, alpha=0.001),
        lambda: pgd(model, x, y, eps=0.1, generator=42),  # a seed is not a generator
    ]
    for call in calls:
        with pytest.raises(AttackError):
            call()


@pytest.mark.parametrize("least_likely", [False, True])
def test_a_stored_step_is_its_direction_applied(model, batch, monkeypatch, least_likely):
    """A storable record without a function of its own attacks online as clip(x + eps * d) with d
    its direction (`_stored_step`, the one body it shares with `direction()`): the closed form,
    computed here with autograd, for both label rules, three eps, and an input made under
    inference_mode (detached and copied, as every attack takes it)."""
    from enspipe.attack_records import ATTACK_RECORDS, AttackRecord

    name = "ll_stored" if least_likely else "fgsm_stored"
    rec = AttackRecord(name, name, None, "single-step", label="least-likely" if least_likely else "given",
                       direction="_sign_direction", store={"loss": "ce", "direction": "sign(grad)"})
    monkeypatch.setitem(ATTACK_RECORDS, name, rec)
    attack = ATTACKS[name]
    assert attack.__name__ == name
    x, y = batch
    with torch.no_grad():
        logits = model(x)
    cases = {"ll": (logits.argmin(1), -1.0)} if least_likely else \
        {"true": (y, 1.0), "pred": (logits.argmax(1), 1.0)}
    for label, (target, sign) in cases.items():
        want_d = (sign * closed_form_grad(model, x, target).sign()).to(torch.int8)
        kw = {} if least_likely else {"label": label}
        for eps in EPSILONS:
            got, d = attack(model, x, y, eps=eps, return_direction=True, **kw)
            assert d.dtype == torch.int8 and torch.equal(d, want_d), (label, eps)
            assert torch.equal(got, (x + eps * want_d.float()).clamp(0, 1)), (label, eps)
        with torch.inference_mode():
            x_inf = x.clone()
        assert torch.equal(attack(model, x_inf, y, eps=0.1, **kw), (x + 0.1 * want_d.float()).clamp(0, 1))
