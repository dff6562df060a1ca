"""enspipe: Ensemble Adversarial Training as an offline pipeline.

Every stage is a function of one config, with the output location inside it:

    import enspipe
    enspipe.train(enspipe.TrainConfig(model="D", dataset="mnist", out="runs/D"))
    enspipe.precompute(enspipe.PrecomputeConfig(model="runs/D", dataset="mnist", out="stores"))
    enspipe.evaluate(enspipe.EvalConfig(models=("runs/A_ens",), sources=("runs/B",), out="results"))
    enspipe.diagnose(enspipe.DiagnoseConfig(models=("runs/A_ens",), out="diag"))
    enspipe.run_job("jobs/quickstart.toml", out="runs/quickstart")

`enspipe.cli` and `enspipe.jobs` call the same functions. The stages and their configs are
imported on first use (module `__getattr__`), so that `import enspipe` stays cheap.
"""
import importlib as _importlib
import os as _os

__version__ = "0.1.0"

# Stores must not depend on how many threads computed them (a dask worker runs one torch
# thread, the in-process run all cores). MKL's GEMM blocks its sums by thread count on
# AVX-512 CPUs: measured on a 2-core Xeon, 29 of 15,000 float16 logits of the same batches
# differed between 1 and 2 threads. Its strict conditional-numerical-reproducibility mode
# removes that (0 differ) at no measurable cost (resnet18 forward, Linear 784x300). MKL
# reads the variable at its first call, so this must run before any matrix product; it
# is inherited by every worker process. A user's own setting wins.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# name -> (module, attribute); None: the module itself. `train`, `evaluate` and `precompute`
# are modules that can be called as their stage (enspipe.util._callable).
_LAZY = {
    "train": ("enspipe.train", None),
    "TrainConfig": ("enspipe.configs.train", "TrainConfig"),
    "precompute": ("enspipe.precompute", None),
    "PrecomputeConfig": ("enspipe.precompute", "PrecomputeConfig"),
    "evaluate": ("enspipe.evaluate", None),
    "EvalConfig": ("enspipe.configs.evaluate", "EvalConfig"),
    "diagnose": ("enspipe.diagnostics.stage", "run_diagnose"),
    "DiagnoseConfig": ("enspipe.configs.diagnose", "DiagnoseConfig"),
    "run_job": ("enspipe.jobs", "run_job"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'enspipe' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = _importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
