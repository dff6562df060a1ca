"""Numeric precision: one `Precision` resolved once per run, taken by every stage that computes.

The vocabulary is `PRECISIONS`; every config field that takes a precision uses it (or, for
stores, `STORE_PRECISIONS`, derived from it) as its `choices`, and `check_declared` refuses
anything else, so the name is checked in one place. `Precision.resolve(name, device)` is then
the one place that turns a name into what the stages need:

    dtype            float32, bfloat16 or float16
    autocast()       the forward passes' context (a null context for fp32)
    channels_last    CUDA with reduced precision: tensor cores read NHWC; on the CPU it does not pay
    grad_scaler()    loss scaling for fp16 (its gradients underflow), a no-op object otherwise
    wrap(model)      a model that runs its own forward under the autocast (attacks switch
                     autocast off inside; the wrapped model switches it back on for itself)
    native           whether the device computes in this precision natively

Native support: `resolve(..., strict=True)` (precompute, `verify --recompute`) refuses a
reduced precision the device cannot compute natively with one line naming `precision`: a
store's bytes must come from the device's own kernels. The trainer and its validation
resolve with strict=False: on such a CPU torch's autocast emulates bf16/fp16 (the same
numbers, slower), which is the documented fallback.

torch is imported inside the functions, so config modules can import the vocabulary for free.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from enspipe.config import OptionError

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "STORE_PRECISIONS", "Precision"]

PRECISIONS = ("fp32", "bf16", "fp16")
# What a store's directions may be computed in: an fp16 input gradient underflows without
# loss scaling (a sign map of zeros), and a precompute has no loss to scale.
STORE_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp16")

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class _NoScaler:
    """fp32/bf16: the GradScaler interface doing nothing (bf16 has fp32's exponent range)."""

    def scale(self, loss: Any) -> Any:
        return loss

    def step(self, optimizer: Any) -> None:
        optimizer.step()

    def update(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def is_enabled(self) -> bool:
        return False


@dataclass(frozen=True)
class Precision:
    """A precision on a device, resolved once per run (see the module docstring)."""

    name: str
    device: Any  # torch.device

    @classmethod
    def resolve(cls, name: str, device: torch.device | str, *, strict: bool = False) -> Precision:
        """The precision `name` on `device`; with `strict`, OptionError("precision") for a reduced
        precision the device cannot compute natively. `name` comes from a config field whose
        declared choices (`PRECISIONS`) `check_declared` already enforced: not checked again."""
        p = _resolve(cls, name, str(device))
        if strict and not p.native:
            raise OptionError("precision", f"{name} cannot run on device {p.device}: {p._why_not()}; use fp32")
        return p

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, _DTYPES[self.name])

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype an autocast runs in, None for fp32 (no autocast)."""
        return None if self.name == "fp32" else self.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' autocast (nothing for fp32)."""
        import torch

        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def channels_last(self) -> bool:
        # Tensor cores read NHWC: channels_last with reduced precision is what CUDA users run;
        # on the CPU it does not pay, and fp32 keeps the default format (an fp32 store's bytes
        # must not depend on a reduced-precision job run before it in the same process).
        return self.device.type == "cuda" and self.name != "fp32"

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """x (an image batch) in this precision's memory format."""
        import torch

        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and self.channels_last else x

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in this precision's memory format (changed only when it differs)."""
        import torch

        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if getattr(model, "_enspipe_memory_format", torch.contiguous_format) != fmt:
            model.to(memory_format=fmt)
            model._enspipe_memory_format = fmt
        return model

    def grad_scaler(self) -> Any:
        """fp16: a torch GradScaler (its gradients underflow without loss scaling); else a no-op
        with the same interface, so the step is written once."""
        import torch

        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else _NoScaler()

    def wrap(self, model: Any) -> Any:
        """`model` whose forward runs under this precision's autocast and returns fp32 logits
        (the model itself for fp32)."""
        return model if self.name == "fp32" else _AutocastForward(model, self)

    @property
    def native(self) -> bool:
        """Whether the device computes in this precision natively (fp32: always)."""
        return self.name == "fp32" or not self._why_not()

    def _why_not(self) -> str:
        import torch

        if self.name == "fp32":
            return ""
        if self.device.type == "cuda":
            if self.name == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
                return f"{torch.cuda.get_device_name(self.device)} has no bf16 tensor cores"
            return ""
        if self.device.type == "cpu":
            if self.name == "bf16" and not (torch.backends.mkldnn.is_available()
                                            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
                return "this CPU has no native bf16 (AVX512-BF16 or AMX)"
            if self.name == "fp16" and not (torch.backends.mkldnn.is_available()
                                            and torch.ops.mkldnn._is_mkldnn_fp16_supported()):
                return "this CPU has no native fp16 (AVX512-FP16 or AMX-FP16)"
            return ""
        if not torch.amp.is_autocast_available(self.device.type):
            return f"torch has no autocast for {self.device.type}"
        return ""


@functools.lru_cache(maxsize=None)
def _resolve(cls: type[Precision], name: str, device: str) -> Precision:
    # Cached: a per-batch seam (train's `adversarial_inputs`) gets the run's one object back.
    # The native check is not cached: it asks the device each time (once per run).
    import torch

    assert name in PRECISIONS, f"{name!r}: a config's declared choices let through no other precision"
    return cls(name, torch.device(device))


class _AutocastForward:
    """A model under a precision's autocast, returning fp32 logits. The attacks switch autocast
    off (an fp16 gradient could underflow); a model called through this wrapper switches it
    back on for its own forward, so the online pass runs at the run's precision."""

    def __init__(self, model: Any, precision: Precision):
        self.model, self.precision = model, precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            return self.model(x).float()
