"""Gradient-masking diagnostics: the evidence of §3.3 and §4 of the paper.

    measures   approximation ratio (Table 6), perturbation cosine, input-gradient norm,
               loss surface (Figures 1, 4, 5)
    hadamard   regular Hadamard matrices and the gradient-aligned adversarial subspaces of
               Appendix E (Lemma 7, Figure 2)
    stage      `diagnose` / `run_diagnose(DiagnoseConfig)`: all of the above for several models, written
               to `diagnostics.json` + PNG figures

The figures are drawn by `enspipe.report.plots`; `Binarized` (Appendix C.1, a gradient-masking
baseline) lives in `enspipe.models.binarize`. Both are re-exported here, as they were imported
from `enspipe.diagnostics` before it became a package.
"""
from enspipe.attacks import ITERATIVE, SINGLE_STEP
from enspipe.models.binarize import Binarized
from enspipe.diagnostics.hadamard import (
    _WILLIAMSON_25,
    SUBSPACE_KS,
    _williamson_regular,
    _williamson_search,
    aligned_subspace,
    count_adversarial_directions,
    regular_hadamard,
)
from enspipe.diagnostics.measures import (
    _orthogonal_signed,
    approximation_ratio,
    input_gradient_norm,
    loss_surface,
    perturbation_cosine,
)
from enspipe.diagnostics.stage import DIAGNOSTICS_FORMAT, DiagnoseConfig, diagnose, run_diagnose
from enspipe.report.plots import plot_loss_surface, plot_subspace

__all__ = [
    "DIAGNOSTICS_FORMAT",
    "DiagnoseConfig",
    "ITERATIVE",
    "SINGLE_STEP",
    "SUBSPACE_KS",
    "Binarized",
    "_WILLIAMSON_25",
    "_orthogonal_signed",
    "_williamson_regular",
    "_williamson_search",
    "aligned_subspace",
    "approximation_ratio",
    "count_adversarial_directions",
    "diagnose",
    "input_gradient_norm",
    "loss_surface",
    "perturbation_cosine",
    "plot_loss_surface",
    "plot_subspace",
    "regular_hadamard",
    "run_diagnose",
]
