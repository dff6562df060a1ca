"""Stage modules that can be called as their stage: `enspipe.train(cfg)` is `enspipe.train.train(cfg)`.

`enspipe.train`, `enspipe.evaluate` and `enspipe.precompute` each name a module and the stage
function inside it. Python sets a package's attribute to a submodule whenever that submodule
is imported, so a lazy package attribute could not stay the function; instead the module
itself is made callable, and both `enspipe.train(cfg)` and `enspipe.train.TrainConfig` work
however the module was first imported.
"""
from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["callable_stage"]


class _StageModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def callable_stage(module_name: str) -> None:
    """Make module `module_name` callable as its function of the same last name."""
    sys.modules[module_name].__class__ = _StageModule
