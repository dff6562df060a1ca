"""enspipe: Ensemble Adversarial Training as an offline pipeline.

Stages (`precompute`, `train`, `evaluate`, ...) are plain functions; `enspipe.cli` and
`enspipe.jobs` call them. Submodules are imported lazily so that `import enspipe` is cheap.
"""
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
