"""One record per attack: every list of attacks in enspipe reads these (timm's registry shape).

An attack is a function in `enspipe.attacks` plus one `AttackRecord` here. The record says
what the rest of the package needs to know without running it (and without importing torch,
so configs, the job parser and the report can read it for free):

    name        the name stages, configs, job specs and results.json use ("step_ll")
    display     the name tables show ("Step-LL")
    function    the attack's function in `enspipe.attacks` ("module:function" for one elsewhere);
                None for a storable attack whose x_adv is clip(x + eps * direction)
    kind        "single-step" (one gradient) or "iterative" (takes `steps`)
    random      draws noise, so the stage's seed applies
    label       "given": takes `label` "true" or "pred" (the training-time rule, Appendix C.2);
                "least-likely": targets y_LL = argmin h(x) whatever `label` says, so its stores
                are named "pred" (one store, not two)
    alpha       how an unset alpha resolves: "random" (eps/2, at most eps), "iterative" (eps/k,
                at least eps/k), "pgd" (2.5 eps/k); None: no alpha
    direction   storable attacks only: the function (model, x, y, target) -> (sign d in {-1,0,1},
                clean logits, labels used) whose result a precompute store keeps; None: not storable
    store       storable attacks only: how a store's identity describes the direction ("{label}"
                is filled with the label mode); the stores' paths derive from it, so it never changes

Adding an attack a store can hold is one direction function in `enspipe.attacks` and one record
appended to `RECORDS`: precompute, train (`attack`), evaluate, diagnose, `verify --recompute`
and the report then know it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping

from enspipe.util.errors import AttackError

__all__ = ["ATTACK_RECORDS", "EPS_ABOVE", "EPS_MAX", "RECORDS", "AttackRecord", "attack_names", "display_name",
           "eps_number", "parse_eps", "record"]

KINDS = ("single-step", "iterative")
LABEL_RULES = ("given", "least-likely")
ALPHA_RULES = ("random", "iterative", "pgd")


@dataclass(frozen=True)
class AttackRecord:
    name: str
    display: str
    function: str | None
    kind: str
    random: bool = False
    label: str = "given"
    alpha: str | None = None
    direction: str | None = None
    store: Mapping[str, str] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        # A record is code: a wrong one is the developer's error, caught at import.
        assert self.kind in KINDS and self.label in LABEL_RULES and self.alpha in (None, *ALPHA_RULES), self
        assert (self.direction is None) == (self.store is None), f"{self.name}: direction and store go together"
        assert self.function is not None or self.direction is not None, f"{self.name}: no function"

    @property
    def storable(self) -> bool:
        """A precompute store can hold its direction (one signed gradient, independent of eps)."""
        return self.direction is not None

    @property
    def single_step(self) -> bool:
        return self.kind == "single-step"

    def label_mode(self, label: str) -> str:
        """The label mode of its stores given `label` ("true" or "pred")."""
        return "pred" if self.label == "least-likely" else label

    def store_params(self, label: str) -> dict[str, str]:
        """How a store's identity describes this attack's direction with `label`."""
        assert self.store is not None, f"{self.name} is not storable"
        return {k: v.format(label=label) for k, v in self.store.items()}


RECORDS: tuple[AttackRecord, ...] = (
    AttackRecord("fgsm", "FGSM", "fgsm", "single-step", direction="_sign_direction",
                 store={"loss": "ce", "target": "{label}_label", "direction": "sign(grad)"}),
    AttackRecord("step_ll", "Step-LL", "step_ll", "single-step", label="least-likely", direction="_sign_direction",
                 store={"loss": "ce", "target": "least_likely", "direction": "-sign(grad)"}),
    AttackRecord("rand_fgsm", "R+FGSM", "rand_fgsm", "single-step", random=True, alpha="random"),
    AttackRecord("rand_step_ll", "R+Step-LL", "rand_step_ll", "single-step", random=True, label="least-likely",
                 alpha="random"),
    AttackRecord("iter_fgsm", "I-FGSM", "iter_fgsm", "iterative", alpha="iterative"),
    AttackRecord("iter_ll", "Iter-LL", "iter_ll", "iterative", label="least-likely", alpha="iterative"),
    AttackRecord("pgd", "PGD", "pgd", "iterative", random=True, alpha="pgd"),
    AttackRecord("pgd_cw", "PGD (CW loss)", "pgd_cw", "iterative", random=True, alpha="pgd"),
)

ATTACK_RECORDS: dict[str, AttackRecord] = {r.name: r for r in RECORDS}


def attack_names(*, kind: str | None = None, storable: bool | None = None, random: bool | None = None,
                 ) -> tuple[str, ...]:
    """The names of the attacks that match, in record order."""
    return tuple(r.name for r in RECORDS
                 if (kind is None or r.kind == kind) and (storable is None or r.storable == storable)
                 and (random is None or r.random == random))


def record(name: str) -> AttackRecord:
    """The record of attack `name`; AttackError naming the known ones otherwise."""
    try:
        return ATTACK_RECORDS[name]
    except (KeyError, TypeError):
        raise AttackError(f"unknown attack {name!r}; known attacks are {', '.join(ATTACK_RECORDS)}.") from None


def display_name(name: str) -> str:
    """What a table shows for attack `name` (the name itself when there is no record)."""
    r = ATTACK_RECORDS.get(name)
    return r.display if r is not None else name


# --- eps: the one budget of every attack (here, so configs parse it without torch) ----------

def _parse_fraction(text: str) -> float | None:
    """"0.3" or "16/256" as float, or None when it is neither."""
    try:
        nums = [float(part) for part in text.strip().split("/")]
        return nums[0] if len(nums) == 1 else nums[0] / nums[1] if len(nums) == 2 else None
    except (ValueError, ZeroDivisionError):
        return None


def _number(value: object) -> float | None:
    """A plain real number (or a one-element tensor) as float, or None (bools and strings are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # a torch scalar tensor
        return float(value.item())
    return None


# eps lies in (EPS_ABOVE, EPS_MAX]: pixels are in [0, 1]. Config fields declare this range
# (`fields.eps`: above=, maximum=) and `check_declared` enforces it; `parse_eps` reads it here.
EPS_ABOVE, EPS_MAX = 0.0, 1.0
_EPS_WANTED = "eps must be a number in (0, 1] such as 0.3 or 16/256"


def eps_number(text: str | float) -> float:
    """An eps as written, "0.3", "16/256" or 0.3, as a finite float; its range is not checked
    here (a config field's declaration checks it, `parse_eps` for everyone else)."""
    value = _parse_fraction(text) if isinstance(text, str) else _number(text)
    if value is None or not math.isfinite(value):
        raise AttackError(f"{_EPS_WANTED}, got {text!r}.")
    return value


def parse_eps(text: str | float) -> float:
    """An eps outside a config (an attack's parameters): "0.3", "16/256" or 0.3, in (0, 1]."""
    value = eps_number(text)
    if not EPS_ABOVE < value <= EPS_MAX:
        raise AttackError(f"{_EPS_WANTED}, got {text!r}.")
    return value
