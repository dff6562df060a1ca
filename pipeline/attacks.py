"""The l-inf attacks of the paper (§3.2, §4.1, Appendix C.2), batched, on any [0,1]-input model.

(Over 400 lines on purpose: eight attacks share one set of conventions, parameter checks and
gradient machinery, and `create_attack` / `parse_attack_options`, the one way a stage calls
an attack by name and sets its parameters, must run exactly those checks.)

A model is a `torch.nn.Module` mapping float `[B, C, H, W]` in `[0, 1]` to logits `[B, K]`;
a list or tuple of models is attacked as their `Ensemble` (average of logits). Every attack
returns `x_adv` with `x - eps <= x_adv <= x + eps` and `0 <= x_adv <= 1` (DESIGN §2).

    FGSM        x + eps * sign(grad_x L(x, y))                           eq. 2
    Step-LL     x - eps * sign(grad_x L(x, y_LL)),  y_LL = argmin h(x)    eq. 3
    R+FGSM      x' = x + alpha * sign(N(0, I));  x' + (eps - alpha) * sign(grad_x' L(x', y))   eq. 7
    R+Step-LL   the same, descending towards y_LL (taken at x')
    I-FGSM      k FGSM steps of size alpha >= eps/k, each projected on the ball    §3.2
    Iter-LL     k Step-LL steps, y_LL fixed from the clean input
    PGD         Madry et al.: uniform random start, k signed steps, CE or the CW hinge loss

Conventions, chosen once for every attack:
- The loss is summed over the batch (not averaged) so an example's gradient does not shrink
  with the batch size; only its sign is used, but a tiny gradient could underflow to 0.
- `sign(0) = 0`: a pixel with zero gradient does not move, so directions are in {-1, 0, +1}.
- `label="pred"` (the label-leaking fix, Kurakin et al. 2017b; Appendix C.2) uses the argmax of
  the first forward pass the attack makes anyway: at x for FGSM / I-FGSM, at the random
  start for R+FGSM and PGD. Iterative attacks keep the labels of their first step.
- One forward and one backward per gradient step (`directions`: one forward shared by several
  attacks' steps at the same x); the gradient is taken w.r.t. the input only
  (`torch.autograd.grad`), so parameters' `.grad` is never touched, and the model's
  train/eval mode is the caller's choice (static models: eval; BatchNorm in train mode
  updates its running statistics, as in the reference code).
- Gradients are on and autocast is off inside an attack, whatever the caller's context.
- Randomness comes only from `generator` (a CPU `torch.Generator`): noise is drawn on the CPU
  and moved to x's device, so a seed gives the same attack on every device.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from typing import Callable, Iterator, Literal, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enspipe.attack_records import (ATTACK_RECORDS, AttackRecord, _number, _parse_fraction, attack_names, parse_eps,
                                    record)
from enspipe.util.errors import AttackError

Label = Literal["true", "pred"]
Loss = Literal["ce", "cw"]
Model = Union[nn.Module, Sequence[nn.Module]]
_Target = Literal["given", "pred", "ll"]  # where an attack's labels come from


# ----------------------------------------------------------------------------------------
# models


class Ensemble(nn.Module):
    """Several models as one: the average of their logits."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise AttackError("An ensemble needs at least one model.")
        self.models = nn.ModuleList(models)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.models]).mean(0)


def _as_model(model: Model) -> nn.Module:
    # Wrapping never touches the members' train/eval mode: Ensemble only holds references.
    if isinstance(model, (list, tuple, nn.ModuleList)):
        return Ensemble(model)
    return model


# ----------------------------------------------------------------------------------------
# parameter checks (also run by create_attack, so a bad job spec fails before any compute)


def _check_eps(eps: object) -> float:
    value = _number(eps)
    if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise AttackError(f"eps must be a number in [0, 1] (pixels are in [0, 1]), got {eps!r}.")
    return value


def _check_alpha(alpha: object) -> float:
    value = _number(alpha)
    if value is None or not math.isfinite(value) or value < 0.0:
        raise AttackError(f"alpha must be a finite number >= 0, got {alpha!r}.")
    return value


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise AttackError(f"steps must be an integer >= 1, got {steps!r}.")
    return int(steps)


def _check_choice(what: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise AttackError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value  # type: ignore[return-value]


def _check_kappa(kappa: object) -> float:
    value = _number(kappa)
    if value is None or not math.isfinite(value) or value < 0.0:
        raise AttackError(f"kappa must be a finite number >= 0, got {kappa!r}.")
    return value


def _check_generator(generator: object) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise AttackError("generator must be a CPU torch.Generator (noise is drawn on the CPU).")


def _rand_alpha(eps: float, alpha: object) -> float:
    """R+FGSM's random step: eps/2 by default (the paper's Tables 2 and 9), at most eps."""
    value = eps / 2 if alpha is None else _check_alpha(alpha)
    if value > eps:
        raise AttackError(f"alpha must be at most eps={eps} in a random-step attack, got {alpha!r}.")
    return value


def _iter_alpha(eps: float, steps: int, alpha: object) -> float:
    """I-FGSM's step: eps/k by default; smaller steps could never reach the ball's surface."""
    value = eps / steps if alpha is None else _check_alpha(alpha)
    if value * steps < eps * (1 - 1e-6):  # tolerance: eps/k computed elsewhere may round down
        raise AttackError(f"alpha must be at least eps/steps={eps / steps:.6g}, got {alpha!r}.")
    return value


def _pgd_alpha(eps: float, steps: int, alpha: object) -> float:
    """PGD's step: 2.5 * eps / k by default, so that k steps can cross the ball and back."""
    return 2.5 * eps / steps if alpha is None else _check_alpha(alpha)


CW_KAPPA = 100.0  # the reference code's CW confidence (simple_eval.py --kappa); Madry et al. use 50


def _pgd_kappa(loss: str, kappa: object) -> float | None:
    """The CW hinge's confidence: CW_KAPPA by default; the CE loss takes none."""
    if kappa is None:
        return CW_KAPPA if loss == "cw" else None
    value = _check_kappa(kappa)
    if loss != "cw":
        raise AttackError("kappa is the confidence of the CW loss; PGD with loss='ce' takes none "
                          "(use pgd_cw, or loss='cw').")
    return value


def _target(label: object) -> _Target:
    return "given" if _check_choice("label", label, ("true", "pred")) == "true" else "pred"


# ----------------------------------------------------------------------------------------
# the shared machinery: inputs, one gradient, projection


def _prepare(x: object, y: object, target: _Target) -> tuple[Tensor, Tensor | None]:
    """Check x and y; x detached (and a normal tensor), y int64 on x's device or None."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise AttackError("x must be a floating-point tensor [B, C, H, W] with values in [0, 1].")
    x = x.detach()
    if x.is_inference():  # made under inference_mode: autograd cannot record through it
        x = x.clone()
    if target != "given":
        return x, None  # y is accepted but unused, for one signature across attacks
    if y is None:
        raise AttackError("label='true' needs the true labels y; pass y or use label='pred'.")
    y = torch.as_tensor(y, device=x.device)
    if y.is_floating_point() or y.is_complex() or y.shape != (x.shape[0],):
        shape = tuple(y.shape)
        raise AttackError(f"y must be integer class labels of shape [{x.shape[0]}], got {shape}.")
    return x, y.long()


@contextlib.contextmanager
def _attack_mode(x: Tensor, autocast: torch.dtype | None = None) -> Iterator[None]:
    """Gradients on and AMP off (or autocast to `autocast` when asked), even inside the caller's
    no_grad() or autocast()."""
    if torch.is_inference_mode_enabled():
        raise AttackError("Attacks need autograd; call them outside torch.inference_mode().")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if autocast is not None:
            stack.enter_context(torch.autocast(x.device.type, dtype=autocast))
        elif torch.amp.is_autocast_available(x.device.type):
            stack.enter_context(torch.autocast(x.device.type, enabled=False))
        yield


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin max_{j != y} z_j - z_y per example: > 0 iff misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(1) - z_y


def _input_grad(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    target: _Target,
    loss: Loss = "ce",
    kappa: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward + one backward: (grad_x of the summed loss, logits at x, labels used)."""
    return _input_grads(model, x, y, [target], loss, kappa)[0]


def _input_grads(model: nn.Module, x: Tensor, y: Tensor | None, targets: Sequence[_Target],
                 loss: Loss = "ce", kappa: float = 0.0) -> list[tuple[Tensor, Tensor, Tensor]]:
    """`_input_grad` for each target from one forward pass, one backward each: (grad_x, logits,
    labels) each; the graph is kept until the last backward."""
    x = x.detach().requires_grad_(True)
    logits = model(x).float()
    held = logits.detach()  # one tensor in every target's result (precompute copies it to the host once)
    out = []
    for k, target in enumerate(targets):
        labels = held.argmax(1) if target == "pred" else held.argmin(1) if target == "ll" else y
        assert labels is not None
        if loss == "ce":
            value = F.cross_entropy(logits, labels, reduction="sum")
        else:
            # CW hinge (Carlini & Wagner 2017a, as in Madry et al.'s code): raise the margin up
            # to kappa, then stop pushing: maximise min(margin, kappa) = -max(z_y - z_other, -kappa).
            value = cw_margin(logits, labels).clamp(max=kappa).sum()
        (grad,) = torch.autograd.grad(value, x, retain_graph=k < len(targets) - 1)
        out.append((grad, held, labels))
    return out


def _signed(grad: Tensor, target: _Target) -> Tensor:
    """The single-step direction from the input gradient, in place: up the loss, or down towards y_LL."""
    d = grad.sign_()
    return d.neg_() if target == "ll" else d


def _sign_direction(
    model: nn.Module, x: Tensor, y: Tensor | None, target: _Target
) -> tuple[Tensor, Tensor, Tensor]:
    """The single-step direction as float in {-1, 0, 1}: up the loss, or down towards y_LL."""
    grad, logits, labels = _input_grad(model, x, y, target)
    return _signed(grad, target), logits, labels


def _ball(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Elementwise bounds of the eps ball around x intersected with [0, 1] (x is in [0, 1])."""
    return (x - eps).clamp_(0.0, 1.0), (x + eps).clamp_(0.0, 1.0)


def _iterate(
    model: nn.Module,
    x: Tensor,
    start: Tensor,
    y: Tensor | None,
    target: _Target,
    *,
    eps: float,
    alpha: float,
    steps: int,
    loss: Loss = "ce",
    kappa: float = 0.0,
) -> Tensor:
    """k projected signed-gradient steps from `start`; labels fixed by the first step.

    The first step's labels stay for every later step: argmax h(start) for "pred", and for
    "ll" y_LL = argmin h(start), so Iter-LL (start = the clean x) keeps descending towards
    the least-likely class of the clean input (Kurakin et al. 2017a), never a class that
    became least likely along the way.
    """
    lo, hi = _ball(x, eps)
    step = -alpha if target == "ll" else alpha  # least-likely attacks descend towards y_LL
    x_adv = start
    for _ in range(steps):
        grad, _, y = _input_grad(model, x_adv, y, target, loss, kappa)
        target = "given"  # keep the first step's labels
        x_adv = torch.clamp(x_adv.add(grad.sign_(), alpha=step), lo, hi)
    return x_adv


def _noise(x: Tensor, generator: torch.Generator | None, kind: Literal["sign", "uniform"]) -> Tensor:
    """sign(N(0, I)) or U(-1, 1) noise of x's shape, drawn on the CPU for device independence."""
    if kind == "sign":
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).sign_()
    else:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32).mul_(2).sub_(1)
    return noise.to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------------------
# single-step attacks and the stored direction


def apply_direction(x: Tensor, d: Tensor, eps: float | Tensor) -> Tensor:
    """clip(x + eps * d, 0, 1) for a stored direction d; eps a scalar or per-example [B]."""
    if d.shape != x.shape:
        raise AttackError(f"direction shape {tuple(d.shape)} does not match x's {tuple(x.shape)}.")
    if isinstance(eps, Tensor) and eps.dim() > 0:
        if eps.shape != (x.shape[0],):
            shape = tuple(eps.shape)
            raise AttackError(f"per-example eps must have shape [{x.shape[0]}], got {shape}.")
        eps = eps.to(device=x.device, dtype=x.dtype).view(-1, *[1] * (x.dim() - 1))
    else:
        eps = _check_eps(eps)
    # eps * d is exactly +-eps or 0, so this equals x +- eps computed any other way: the result
    # lies in [x - eps, x + eps] exactly and fgsm() (which uses this same expression) matches.
    return (x + eps * d.to(x.dtype)).clamp_(0.0, 1.0)


def direction(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    attack: str,
    label: Label = "true",
    autocast: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """What a precompute store keeps: (d int8 in {-1,0,1}, clean logits float32, labels int64).

    `attack` is any storable attack (`STORABLE`: its record names its direction function);
    clip(x + eps*d, 0, 1) == fgsm(model, x, y, eps=eps, label=label) (or step_ll) for every eps.
    labels are y (label="true"), argmax of the logits (label="pred") or y_LL (a least-likely attack).
    `autocast` (e.g. torch.bfloat16) runs the forward and backward under autocast to that dtype;
    the default is full precision. The sign is narrowed to int8 on x's device.
    """
    _check_choice("attack", attack, STORABLE)
    return _direction(ATTACK_RECORDS[attack], model, x, y, label, autocast)


def _direction(rec: AttackRecord, model: Model, x: Tensor, y: Tensor | None, label: object,
               autocast: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    """`direction()` of a storable record: the one body behind precompute's stores and the online
    step of an attack without a function of its own (`_stored_step`), so they cannot drift."""
    target = _rec_target(rec, label)
    model = _as_model(model)
    x, y = _prepare(x, y, target)
    with _attack_mode(x, autocast):
        d, logits, labels = _resolve(rec.direction)(model, x, y, target)
    return d.to(torch.int8), logits, labels


def _rec_target(rec: AttackRecord, label: object) -> _Target:
    """The labels a storable attack's direction uses: y_LL for a least-likely one, else `label`'s."""
    return "ll" if rec.label == "least-likely" else _target(label)


def directions(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    attacks: Sequence[str],
    label: Label = "true",
    autocast: torch.dtype | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """`direction()` of each attack in `attacks` on one batch, in that order; several sign-gradient
    ones (FGSM, Step-LL: every storable attack now) share one forward pass: precompute with several
    attacks. For a model in eval mode, bit for bit what one `direction()` call per attack gives (the
    same kernels on the same saved activations: tests/precompute/test_precompute_decodes_once.py
    compares the stores and the tensors); in train mode the one forward updates batch-norm
    statistics and draws dropout once, not once per attack."""
    recs = [ATTACK_RECORDS[_check_choice("attack", a, STORABLE)] for a in attacks]
    if len(recs) < 2 or any(rec.direction != "_sign_direction" for rec in recs):
        return [_direction(rec, model, x, y, label, autocast) for rec in recs]
    targets = [_rec_target(rec, label) for rec in recs]
    x, y = _prepare(x, y, "given" if "given" in targets else "pred")
    with _attack_mode(x, autocast):
        return [(_signed(grad, target).to(torch.int8), logits, labels)
                for target, (grad, logits, labels) in zip(targets, _input_grads(_as_model(model), x, y, targets))]


def fgsm(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    eps: float,
    label: Label = "true",
    return_direction: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """FGSM (eq. 2): x + eps * sign(grad_x CE(h(x), y)); label="pred" uses y = argmax h(x).

    Defaults: label="true" (eq. 2 and the reference code's evaluation use the true label;
    "pred" is the training-time choice of Appendix C.2). With return_direction, also returns
    the direction d as int8 in {-1, 0, 1}.
    """
    eps = _check_eps(eps)
    target = _target(label)
    model = _as_model(model)
    x, y = _prepare(x, y, target)
    with _attack_mode(x):
        d, _, _ = _sign_direction(model, x, y, target)
    x_adv = apply_direction(x, d, eps)
    return (x_adv, d.to(torch.int8)) if return_direction else x_adv


def step_ll(
    model: Model, x: Tensor, y: Tensor | None = None, *, eps: float, return_direction: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Step-LL (eq. 3): x - eps * sign(grad_x CE(h(x), y_LL)), y_LL = argmin h(x); y is unused."""
    eps = _check_eps(eps)
    model = _as_model(model)
    x, _ = _prepare(x, y, "ll")
    with _attack_mode(x):
        d, _, _ = _sign_direction(model, x, None, "ll")
    x_adv = apply_direction(x, d, eps)
    return (x_adv, d.to(torch.int8)) if return_direction else x_adv


def _random_step(
    model: Model,
    x: Tensor,
    y: Tensor | None,
    target: _Target,
    eps: object,
    alpha: object,
    generator: torch.Generator | None,
) -> Tensor:
    """Eq. 7: a random signed step of size alpha, then one gradient step of eps - alpha."""
    eps = _check_eps(eps)
    alpha = _rand_alpha(eps, alpha)
    _check_generator(generator)
    model = _as_model(model)
    x, y = _prepare(x, y, target)
    # The reference code clips the random start to [0, 1] before taking the gradient there.
    x_start = (x + alpha * _noise(x, generator, "sign")).clamp_(0.0, 1.0)
    with _attack_mode(x):
        d, _, _ = _sign_direction(model, x_start, y, target)
    lo, hi = _ball(x, eps)  # only float rounding can leave the ball here; clamp it away
    return torch.clamp(x_start.add(d, alpha=eps - alpha), lo, hi)


def rand_fgsm(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    eps: float,
    alpha: float | None = None,
    label: Label = "true",
    generator: torch.Generator | None = None,
) -> Tensor:
    """R+FGSM (eq. 7); label="pred" takes argmax h(x') at the random start x'.

    Defaults: alpha = eps/2, the only value the paper states (Tables 2 and 9, R+Step-LL on
    ImageNet). For MNIST's Table 7 the paper is silent; the reference code evaluates with
    alpha = 0.05 (simple_eval.py), which the MNIST jobs set (`rand_fgsm = { alpha = 0.05 }`).
    """
    return _random_step(model, x, y, _target(label), eps, alpha, generator)


def rand_step_ll(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    eps: float,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """R+Step-LL (eq. 7 with Step-LL); y_LL = argmin h(x') at the random start; y is unused.

    Defaults: alpha = eps/2, as the paper's Tables 2 and 9 (ImageNet, eps = 16/256).
    """
    return _random_step(model, x, y, "ll", eps, alpha, generator)


# ----------------------------------------------------------------------------------------
# iterative attacks


def iter_fgsm(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    label: Label = "true",
) -> Tensor:
    """I-FGSM (Kurakin et al. 2017a): k steps of alpha >= eps/k, each projected (§3.2).

    Defaults: the paper states only alpha >= eps/k; the reference code's I-FGSM takes
    k = 10 steps of alpha = eps/k (simple_eval.py --steps 10), used here.
    """
    eps = _check_eps(eps)
    steps = _check_steps(steps)
    alpha = _iter_alpha(eps, steps, alpha)
    target = _target(label)
    model = _as_model(model)
    x, y = _prepare(x, y, target)
    with _attack_mode(x):
        return _iterate(model, x, x, y, target, eps=eps, alpha=alpha, steps=steps)


def iter_ll(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
) -> Tensor:
    """Iter-LL: k Step-LL steps; y_LL = argmin h(x) of the clean x, kept fixed (Kurakin 2017a).

    Defaults: k = 10 steps of alpha = eps/k, as I-FGSM's (the paper's one Iter-LL figure,
    Table 2, is a two-step attack: steps=2; the reference code has no Iter-LL).
    """
    eps = _check_eps(eps)
    steps = _check_steps(steps)
    alpha = _iter_alpha(eps, steps, alpha)
    model = _as_model(model)
    x, _ = _prepare(x, y, "ll")
    with _attack_mode(x):
        return _iterate(model, x, x, None, "ll", eps=eps, alpha=alpha, steps=steps)


def pgd(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    eps: float,
    steps: int = 40,
    alpha: float | None = None,
    loss: Loss = "ce",
    kappa: float | None = None,
    label: Label = "true",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD (Madry et al. 2017): uniform start in the ball, k projected steps of alpha.

    loss="cw" maximises the Carlini-Wagner hinge min(max_{j!=y} z_j - z_y, kappa).
    label="pred" takes argmax h at the start point (the random start when random_start).

    Defaults (the paper names the attack but none of its settings; the reference code has no
    PGD): Madry et al.'s MNIST attack, k = 40 steps from a uniform random start, with
    alpha = 2.5 eps/k (0.019 at eps = 0.3; Madry et al.'s code uses 0.01); kappa =
    `CW_KAPPA` = 100 for loss="cw", the confidence of the reference code's CW attack.
    """
    eps = _check_eps(eps)
    steps = _check_steps(steps)
    alpha = _pgd_alpha(eps, steps, alpha)
    _check_choice("loss", loss, ("ce", "cw"))
    kappa = _pgd_kappa(loss, kappa)
    _check_generator(generator)
    target = _target(label)
    model = _as_model(model)
    x, y = _prepare(x, y, target)
    start = x
    if random_start:
        lo, hi = _ball(x, eps)
        start = torch.clamp(x.add(_noise(x, generator, "uniform"), alpha=eps), lo, hi)
    with _attack_mode(x):
        return _iterate(
            model, x, start, y, target, eps=eps, alpha=alpha, steps=steps, loss=loss,
            kappa=kappa or 0.0,
        )


def pgd_cw(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    eps: float,
    steps: int = 40,
    alpha: float | None = None,
    kappa: float = CW_KAPPA,
    label: Label = "true",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD with the Carlini-Wagner hinge loss (the PGD of the paper's Tables 4 and 8).

    Defaults as `pgd`'s; kappa = 100, the confidence of the reference code's CW attack (the
    paper is silent; Madry et al.'s CW-loss PGD uses 50). A small kappa stops at the
    source's decision boundary, which transfers poorly (black-box columns biased down).
    """
    return pgd(
        model, x, y, eps=eps, steps=steps, alpha=alpha, loss="cw", kappa=kappa,
        label=label, random_start=random_start, generator=generator,
    )


# ----------------------------------------------------------------------------------------
# registry: the one way stages call an attack by name


# Each attack is a function above and a record in `enspipe.attack_records` (kind, randomness,
# label rule, how alpha resolves, whether a store can hold it, display name); this module reads
# the records and names no attack itself. Each attack's defaults are its function's keyword
# defaults, and its docstring says where each comes from: the paper where it states a value,
# else the reference code (ftramer/ensemble-adv-training), else Madry et al. for PGD.
# `create_attack` resolves them (`attack_params`) and runs the attack with every parameter
# explicit, so what a stage records is exactly what ran.


def _resolve(ref: str) -> Callable[..., Tensor]:
    """A record's function: a name in this module, or "module:function"."""
    if ":" in ref:
        import importlib

        module, _, fn = ref.partition(":")
        return getattr(importlib.import_module(module), fn)
    return globals()[ref]


def _stored_step(rec: AttackRecord) -> Callable[..., Tensor]:
    """The attack of a storable record without a function of its own: x + eps * its direction,
    clipped (what training with its store applies)."""
    def run(model: Model, x: Tensor, y: Tensor | None, label: object, eps: object,
            return_direction: bool) -> Tensor | tuple[Tensor, Tensor]:
        eps = _check_eps(eps)
        d, _, _ = _direction(rec, model, x, y, label, None)
        # x, checked by `_direction` already, detached (the sum is a new tensor, also for an x
        # made under inference_mode); the int8 d is exactly the sign, so x_adv is what the float sign gave.
        x_adv = apply_direction(x.detach(), d, eps)
        return (x_adv, d) if return_direction else x_adv

    if rec.label == "least-likely":
        def attack(model: Model, x: Tensor, y: Tensor | None = None, *, eps: float,
                   return_direction: bool = False) -> Tensor | tuple[Tensor, Tensor]:
            return run(model, x, y, "pred", eps, return_direction)
    else:
        def attack(model: Model, x: Tensor, y: Tensor | None = None, *, eps: float,  # type: ignore[misc]
                   label: Label = "true", return_direction: bool = False) -> Tensor | tuple[Tensor, Tensor]:
            return run(model, x, y, label, eps, return_direction)
    attack.__name__ = attack.__qualname__ = rec.name
    attack.__doc__ = f"{rec.display}: clip(x + eps * d, 0, 1), d its stored direction ({rec.direction})."
    return attack


class _Functions(Mapping):
    """{name: attack function}, read from the records when asked (so a record and its function
    may be declared in either order)."""

    def __getitem__(self, name: str) -> Callable[..., Tensor]:
        rec = ATTACK_RECORDS[name]
        return _resolve(rec.function) if rec.function is not None else _stored_step(rec)

    def __iter__(self) -> Iterator[str]:
        return iter(ATTACK_RECORDS)

    def __len__(self) -> int:
        return len(ATTACK_RECORDS)


ATTACKS: Mapping[str, Callable[..., Tensor]] = _Functions()
SINGLE_STEP = attack_names(kind="single-step")  # one gradient; no `steps`
ITERATIVE = attack_names(kind="iterative")      # take `steps`
RANDOM = attack_names(random=True)              # draw noise: `seed` applies
STORABLE = attack_names(storable=True)          # a precompute store can hold their directions
# Not per-attack options: eps is one budget for every attack of an evaluation, and the noise
# comes from the stage's seed.
_NOT_OPTIONS = ("eps", "generator")
_ALPHA = {"random": lambda eps, steps, alpha: _rand_alpha(eps, alpha),
          "iterative": lambda eps, steps, alpha: _iter_alpha(eps, steps, alpha),
          "pgd": lambda eps, steps, alpha: _pgd_alpha(eps, steps, alpha)}


def _keywords(name: str) -> list[str]:
    """The attack's keyword parameters (return_direction changes the return type: never bound)."""
    signature = inspect.signature(ATTACKS[name]).parameters
    return [p for p, s in signature.items() if s.kind is s.KEYWORD_ONLY and p != "return_direction"]


def _default(name: str, param: str) -> object:
    return inspect.signature(ATTACKS[name]).parameters[param].default


def _validate(name: str, params: dict) -> None:
    """Run the attack's own parameter checks without a model or data."""
    eps = _check_eps(params["eps"])
    if "label" in params:
        _target(params["label"])
    if "loss" in params:
        _check_choice("loss", params["loss"], ("ce", "cw"))
    if "kappa" in params:
        _pgd_kappa(params.get("loss", _default(name, "loss") if "loss" in _keywords(name) else "cw"), params["kappa"])
    if "generator" in params:
        _check_generator(params["generator"])
    if "random_start" in params and not isinstance(params["random_start"], bool):
        raise AttackError(f"random_start must be true or false, got {params['random_start']!r}.")
    rec = ATTACK_RECORDS[name]
    steps = _check_steps(params.get("steps", _default(name, "steps"))) if "steps" in _keywords(name) else 1
    if rec.alpha is not None:
        _ALPHA[rec.alpha](eps, steps, params.get("alpha"))


def _parse_params(name: str, params: dict[str, object]) -> dict[str, object]:
    """`params` checked against attack `name`: known keys, eps present, fractions parsed."""
    record(name)  # an unknown name: AttackError naming the known ones
    known = _keywords(name)
    for key in params:
        if key not in known:
            raise AttackError(
                f"attack {name!r} has no parameter {key!r}; its parameters are {', '.join(known)}."
            )
    if "eps" not in params:
        raise AttackError(f"attack {name!r} needs eps, e.g. create_attack({name!r}, eps=0.3).")
    params = dict(params)
    if isinstance(params["eps"], str):
        params["eps"] = parse_eps(params["eps"])
    if isinstance(params.get("alpha"), str):
        alpha = _parse_fraction(params["alpha"])  # type: ignore[arg-type]
        params["alpha"] = params["alpha"] if alpha is None else alpha  # _validate names a bad one
    _validate(name, params)
    return params


def attack_params(name: str, **params: object) -> dict[str, object]:
    """Every parameter attack `name` runs with, given `params`: the defaults filled in and
    resolved (alpha from eps and steps, kappa from the loss), checked as `create_attack`
    checks them. This is what `evaluate` records for each attack in results.json.

        attack_params("pgd_cw", eps=0.3)
        -> {"eps": 0.3, "steps": 40, "alpha": 0.01875, "kappa": 100.0, "label": "true",
            "random_start": True}
    """
    params = _parse_params(name, params)
    params.pop("generator", None)
    out: dict[str, object] = {}
    for key in _keywords(name):
        if key != "generator":
            out[key] = params.get(key, _default(name, key))
    eps = _check_eps(out["eps"])
    rec = ATTACK_RECORDS[name]
    if rec.alpha is not None:
        out["alpha"] = _ALPHA[rec.alpha](eps, int(out.get("steps", 1)), out["alpha"])  # type: ignore[arg-type]
    if "kappa" in out:
        kappa = _pgd_kappa(str(out.get("loss", "cw")), out["kappa"])
        if kappa is None:
            del out["kappa"]  # the CE loss has no confidence
        else:
            out["kappa"] = kappa
    return out


class Attack:
    """An attack by name with its parameters bound: attack(model, x, y) -> x_adv.

    `params` is every parameter it runs with (`attack_params`); a random attack created with
    an int seed draws its noise from a fresh generator seeded with it on every call.
    """

    def __init__(self, name: str, params: dict[str, object],
                 seed: int | torch.Generator | None = None, generator: torch.Generator | None = None):
        self.name, self.params, self.seed = name, params, seed
        self._generator = generator

    def __call__(self, model: Model, x: Tensor, y: Tensor | None = None) -> Tensor:
        extra: dict[str, object] = {}
        if ATTACK_RECORDS[self.name].random:
            if self._generator is not None:
                extra["generator"] = self._generator
            elif isinstance(self.seed, torch.Generator):
                extra["generator"] = self.seed  # one stream, carried on across calls
            elif self.seed is not None:
                extra["generator"] = torch.Generator().manual_seed(int(self.seed))
        return ATTACKS[self.name](model, x, y, **self.params, **extra)

    def with_seed(self, seed: int | torch.Generator | None) -> Attack:
        """The same attack (parameters as resolved, not parsed again) drawing its noise from `seed`."""
        return Attack(self.name, self.params, seed=seed)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"Attack({self.name!r}, {args})"


def create_attack(name: str, *, seed: int | torch.Generator | None = None,
                  **params: object) -> Attack:
    """attack(model, x, y) -> x_adv for the attack `name` with `params` bound.

    eps and alpha may be strings such as "16/256" (as in job specs). Parameters not given
    take the attack's defaults (see `ATTACKS`); the returned `Attack.params` holds every
    parameter resolved. Parameters are checked now, so a bad spec fails before any compute.
    `seed` is accepted by every attack, so a stage can seed an attack it knows only by name;
    a deterministic attack ignores it. A random attack (`RANDOM`) draws its noise from a
    fresh generator seeded with an int `seed` on each call (the same x_adv for the same
    input), or from a CPU `torch.Generator` `seed` whose stream carries on across calls.
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, torch.Generator)):
            raise AttackError(f"seed must be an integer or a CPU torch.Generator, got {seed!r}.")
        if "generator" in params:
            raise AttackError(f"attack {name!r} got both seed and generator; pass one of them.")
        if isinstance(seed, torch.Generator):
            _check_generator(seed)
    generator = params.get("generator")
    resolved = attack_params(name, **params)
    return Attack(name, resolved, seed=seed, generator=generator)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------
# per-attack options: "ATTACK.KEY=VALUE" (the CLI's --attack-option, a job's options table)


def option_names(name: str) -> tuple[str, ...]:
    """The parameters of attack `name` that an option may set (all but eps and the noise)."""
    return tuple(k for k in _keywords(name) if k not in _NOT_OPTIONS)


def _option_value(text: str) -> object:
    """An option's value as typed: true/false, an integer, a number or fraction, else text."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return int(t)
    except ValueError:
        pass
    value = _parse_fraction(t)
    return t if value is None else value


def attack_option_strings(table: object) -> tuple[str, ...]:
    """A job spec's options table {attack: {key: value}} as "ATTACK.KEY=VALUE" items."""
    if not isinstance(table, dict):
        raise AttackError("options must be a table of attacks, e.g. rand_fgsm = { alpha = 0.05 }.")
    items = []
    for attack, values in table.items():
        if not isinstance(values, dict):
            raise AttackError(f"options.{attack} must be a table such as {{ alpha = 0.05 }}, "
                              f"got {values!r}.")
        for key, value in values.items():
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            items.append(f"{attack}.{key}={text}")
    return tuple(items)


def parse_attack_options(items: Sequence[str], *, eps: float | str = 0.3,
                         attacks: Sequence[str] | None = None) -> dict[str, dict[str, object]]:
    """{attack: {key: value}} from "ATTACK.KEY=VALUE" items, each attack's options checked
    with its own parameter checks at this eps. `attacks`, when given, are the attacks an
    evaluation runs: an option for any other attack is an error, not silently unused.

        parse_attack_options(["rand_fgsm.alpha=0.05", "pgd_cw.kappa=50"])
        -> {"rand_fgsm": {"alpha": 0.05}, "pgd_cw": {"kappa": 50}}
    """
    out: dict[str, dict[str, object]] = {}
    given: dict[str, list[str]] = {}
    for item in items:
        text = str(item).strip()
        lhs, eq, value = text.partition("=")
        attack, dot, key = lhs.strip().partition(".")
        attack, key = attack.strip(), key.strip()
        if not eq or not dot or not attack or not key or not value.strip():
            raise AttackError(f"attack option {text!r} must read ATTACK.KEY=VALUE, e.g. rand_fgsm.alpha=0.05.")
        if attack not in ATTACK_RECORDS:
            raise AttackError(f"{text}: unknown attack {attack!r}; known attacks are {', '.join(ATTACK_RECORDS)}.")
        if attacks is not None and attack not in attacks:
            raise AttackError(f"{text}: {attack} is not among the attacks evaluated ({', '.join(attacks)}).")
        names = option_names(attack)
        if key in _NOT_OPTIONS:
            why = "one budget for every attack" if key == "eps" else "drawn from the evaluation's seed"
            raise AttackError(f"{text}: {key} is not a per-attack option ({key} is {why}).")
        if key not in names:
            takes = f"its options are {', '.join(names)}" if names else "it takes no options"
            raise AttackError(f"{text}: attack {attack!r} has no option {key!r}; {takes}.")
        if key in out.get(attack, {}):
            raise AttackError(f"{text}: {attack}.{key} is given twice.")
        out.setdefault(attack, {})[key] = _option_value(value)
        given.setdefault(attack, []).append(text)
    for attack, params in out.items():
        try:
            attack_params(attack, eps=eps, **params)
        except AttackError as e:
            raise AttackError(f"{' '.join(given[attack])}: {e}") from None
    return out
