"""`DiagnoseConfig`: what to diagnose; torch-free, so the job parser and the CLI read its options
without importing torch (`enspipe.diagnostics` re-exports it)."""
from __future__ import annotations

from dataclasses import dataclass

from enspipe.attack_records import attack_names
from enspipe.config import check, check_declared, normalize, option
from enspipe.configs import fields

__all__ = ["DiagnoseConfig"]

SINGLE_STEP = attack_names(kind="single-step")
ITERATIVE = attack_names(kind="iterative")


@dataclass(frozen=True)
class DiagnoseConfig:
    """What to diagnose and where the results go; saved in `diagnostics.json`.

    Each field is a flag of `enspipe diagnose` and (where a job can set it) a key of a job
    spec's `[diagnose.NAME]` table, with the default and help declared here once."""

    models: tuple[str, ...] = option(flag="--model", metavar="MODEL",
                                     help="A run dir or checkpoint, or an architecture with --weights / "
                                     "--pretrained (repeat to compare models).")
    other: str | None = option(None, metavar="MODEL", help="Another model whose adversarial direction spans the "
                               "loss surface (Figures 1, 4, 5) [default: the next --model; with one model a "
                               "random sign vector].")
    dataset: str = fields.dataset()
    split: str = fields.split("test", "to measure on")
    data_root: str | None = fields.data_root()
    limit: int | None = fields.limit(500, job=True, help="Samples to measure on (the first N of the split).")
    image_size: int | None = fields.image_size()
    eps: float = fields.eps()
    single: str = option("fgsm", choices=SINGLE_STEP, help="The single-step attack of the approximation "
                         "ratio and cosine (Table 6).")
    iterative: str = option("pgd", choices=ITERATIVE, help="The iterative attack it is compared with.")
    steps: int = option(40, minimum=1, help="Iterations of the iterative attack.")
    grid: int = option(21, minimum=2, help="Points per axis of the loss surface.")
    surface_points: int = option(3, minimum=1, help="Samples whose loss surface is drawn.")
    subspace_points: int | None = option(None, minimum=0, help="Samples the adversarial subspace is counted on "
                                         "(Appendix E; 0 skips it) [default: all].")
    seed: int = option(0, help="Seed of the random start and the random directions.")
    batch_size: int = option(256, minimum=1, help="Samples per forward/backward pass.")
    device: str = fields.device()
    loader_workers: int | None = fields.loader_workers(
        "Processes that decode the images ahead of the models (default: cores - 1 for imagefolder/wds, at "
        "least 1; 0 decodes in the diagnosing process). The images are decoded by PIL.")
    weights: str | None = fields.weights("Weights of the one model given as a bare architecture name.")
    pretrained: bool = fields.pretrained("Hub weights for every model given as a bare architecture name "
                                         "(offline: from the hub cache).")
    out: str | None = option(None, path="dir", job=False, help="Directory for diagnostics.json and the figures.")
    names: dict[str, str] = option(default_factory=dict, cli=False, job=False,
                                   help="model spec -> name shown in diagnostics.json and the figures")

    def __post_init__(self) -> None:
        normalize(self, paths=("other", "out", "weights", "data_root"), path_lists=("models",))
        check_declared(self)  # every field's choices and minimum; below, what no one field declares
        check(bool(self.models), "models", "needs at least one model")
        check(self.weights is None or not self.pretrained, "weights",
              "and `pretrained` exclude each other: pass one source of weights")
