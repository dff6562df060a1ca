"""`EvalConfig`: what to evaluate; torch-free, so the job parser and the CLI read its options
without importing torch (`enspipe.evaluate` re-exports it). Its attack options are checked by
the attacks themselves (`enspipe.attacks`, imported when a config is built)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enspipe.attack_records import attack_names
from enspipe.config import OptionError, check, check_declared, normalize, option
from enspipe.configs import fields
from enspipe.util.errors import AttackError

__all__ = ["EvalConfig"]


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and where the results go; saved beside the results.

    Each field is a flag of `enspipe evaluate` and (where a job can set it) a key of a job
    spec's `[evaluate.NAME]` table, with the default and help declared here once."""

    models: tuple[str, ...] = option(flag="--model", metavar="MODEL", job=False,
                                     help="A target: a run dir or checkpoint, or an architecture with --weights / "
                                     "--pretrained (repeat for several targets).")
    dataset: str = fields.dataset()
    split: str = fields.split("test", "to evaluate on")
    data_root: str | None = fields.data_root()
    limit: int | None = fields.limit(job=True)
    image_size: int | None = fields.image_size()
    attacks: tuple[str, ...] = option(("fgsm",), sep=",", metavar="ATTACKS", choices=attack_names(),
                                      help="Comma list (or repeat) of " + ", ".join(attack_names()) + ".")
    eps: float = fields.eps()
    sources: tuple[str, ...] = option((), metavar="MODEL", help="Holdout model(s) whose attacks transfer to the "
                                      "targets (black-box).")
    ensemble_source: bool = option(False, help="Also attack with the ensemble of all --sources.")
    batch_size: int = option(256, minimum=1, help="Samples per batch.")
    seed: int = option(0, help="Seed of the random attacks' noise.")
    device: str = fields.device()
    loader_workers: int | None = fields.loader_workers(
        "Processes that decode the images ahead of the models (default: on a CUDA device cores - 1 for "
        "imagefolder/wds, at least 1: one core drives the device; on a CPU device 0, as for in-memory sets: "
        "the models' threads use every core, and the images are decoded in the evaluating process).")
    # cpu by default, not auto: an evaluate step's job key (and every result cached under it) was made
    # with PIL before the option existed, and one key must not mean either decoder by the node it ran on.
    decoder: str = fields.decoder("images", "Default cpu: nvJPEG only when asked, since its pixels differ from "
                                  "PIL's by a few levels, and so may the errors.", default="cpu")
    names: dict[str, str] = option(default_factory=dict, cli=False, job=False,
                                   help="model spec -> name shown in tables")
    weights: str | None = fields.weights("Weights of the one model given as a bare architecture name.")
    pretrained: bool = fields.pretrained("Hub weights for every model given as a bare architecture name "
                                         "(offline: from the hub cache).")
    binarized: tuple[str, ...] = option((), metavar="MODEL", help="Also evaluate this model behind input "
                                        "binarization (Appendix C.1's gradient-masking baseline; repeat).")
    out: str | None = option(None, path="any", job=False, help="Directory (or .json path) for results.json.")
    binarized_masked: tuple[str, ...] = option((), metavar="MODEL", help="Also evaluate this model behind input "
                                               "binarization with its true zero gradient (the masking diagnostic; repeat).")
    source_stores: tuple[str, ...] = option(
        (), flag="--source-store", metavar="STORE", job=False,
        help="A precomputed direction store of the evaluation images (precompute --split test) whose "
             "directions, x + eps * d, transfer to the targets (black-box; white-box where the store's "
             "model is a target of the same name): Table 1's sources, computed once (repeat).")
    whitebox_stores: tuple[str, ...] = option(
        (), flag="--whitebox-store", metavar="STORE", job=False,
        help="A direction store of a target's own model (named as that target): its white-box attack "
             "only, never transferred (Table 2's and Table 4's white-box Step-LL from Table 1's stores).")
    attack_options: tuple[str, ...] = option(
        (), flag="--attack-option", metavar="ATTACK.KEY=VALUE",
        help="Set one parameter of one attack, e.g. rand_fgsm.alpha=0.05, pgd_cw.kappa=50, "
             "pgd.steps=100 (repeatable; defaults: the paper's, else the reference code's).")

    def __post_init__(self) -> None:
        normalize(self, paths=("out", "weights", "data_root"), path_lists=("models", "sources", "binarized", "binarized_masked",
                                                                          "source_stores", "whitebox_stores"))
        check_declared(self)  # every field's choices and minimum; below, what no one field declares
        check(bool(self.models or self.binarized or self.binarized_masked), "models", "needs at least one target")
        check(not self.ensemble_source or len(self.sources) >= 2, "ensemble_source", "needs at least two `sources`")
        check(self.weights is None or not self.pretrained, "weights",
              "and `pretrained` exclude each other: pass one source of weights")
        object.__setattr__(self, "attack_options", tuple(self.attack_options))
        self.options()  # checked now: a bad option fails before any model is loaded

    def options(self) -> dict[str, dict[str, Any]]:
        """{attack: {parameter: value}} from `attack_options`, each checked by its attack."""
        from enspipe import attacks

        try:
            return attacks.parse_attack_options(self.attack_options, eps=self.eps, attacks=self.attacks)
        except AttackError as e:
            raise OptionError("attack_options", str(e)) from None

    def attack_params(self) -> dict[str, dict[str, Any]]:
        """Every parameter each attack runs with (its defaults resolved), as results.json records."""
        from enspipe import attacks

        opts = self.options()
        return {a: attacks.attack_params(a, eps=self.eps, **opts.get(a, {})) for a in self.attacks}
