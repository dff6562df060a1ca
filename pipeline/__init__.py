"""enspipe: Ensemble Adversarial Training as an offline pipeline.

Stages (`precompute`, `train`, `evaluate`, ...) are plain functions; `enspipe.cli` and
`enspipe.jobs` call them. Submodules are imported lazily so that `import enspipe` is cheap.
"""
__version__ = "0.1.0"
