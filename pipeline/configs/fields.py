"""The field groups every stage config shares, declared once: data, weights, device, eps.

Each function returns one `option(...)` field; a stage config lists them in its own order (the
order of its flags) and passes what differs (a split's default, whether a job may set it). The
dataset help names the data registry's sources, asked when --help is made (`enspipe.data`
imports torch; a config module must not).
"""
from __future__ import annotations

from typing import Any

from enspipe.attack_records import EPS_ABOVE, EPS_MAX, eps_number
from enspipe.config import option

__all__ = ["DECODERS", "data_root", "dataset", "decoder", "device", "eps", "image_size", "limit", "loader_workers", "pretrained", "split", "weights"]


def _sources() -> str:
    from enspipe.data import KNOWN_SOURCES

    return ", ".join(KNOWN_SOURCES[:-1]) + " or " + KNOWN_SOURCES[-1]


# --- data --------------------------------------------------------------------------------

def dataset(**kw: Any) -> Any:
    return option("digits", job=False, help=lambda: _sources() + ".", **kw)


def split(default: str, what: str, *, job: bool = False) -> Any:
    return option(default, job=job, help=f"The dataset split {what}.")


def data_root() -> Any:
    return option(None, path="dir", job=False,
                  help="Where datasets live (else $ENSPIPE_DATA, else ~/.cache/enspipe/data).")


def limit(default: int | None = None, *, job: bool = False,
          help: str = "Use only the first N samples of the canonical order.") -> Any:
    return option(default, minimum=1, job=job, help=help)


def image_size() -> Any:
    return option(None, minimum=8, job=False,
                  help="Resize (imagefolder: resize + center-crop) images to this square size.")


# --- weights -----------------------------------------------------------------------------

def weights(help: str, *, job: bool = False) -> Any:
    return option(None, path="existing", job=job, help=help)


def pretrained(help: str, *, job: bool = False) -> Any:
    return option(False, job=job, help=help)


# --- where it runs and the budget ----------------------------------------------------------

DECODERS = ("auto", "cpu", "nvjpeg")


def decoder(what: str, tail: str, default: str = "auto") -> Any:
    """How JPEGs of imagefolder/wds data are decoded (precompute, train, evaluate: one vocabulary)."""
    return option(default, choices=DECODERS, help=f"JPEG decode of imagefolder/wds {what}: auto (nvJPEG on a "
                  "CUDA device, batched, resized and cropped there, the loader workers only reading bytes; PIL "
                  f"elsewhere), cpu (PIL in the loader workers), or nvjpeg (CUDA only). {tail}")


def loader_workers(help: str, default: int | None = None) -> Any:
    """Processes that read (and decode) the data ahead of the device (precompute, train, evaluate,
    diagnose: one vocabulary). How a run goes, never what it computes: `runtime`, so a job step's
    key and `resume` ignore it. None: from the cores (`data.loader.default_workers`)."""
    return option(default, minimum=0, runtime=True, help=help)


def device() -> Any:
    return option("auto", job=False, help="auto, cpu or cuda[:N].")


def eps(default: float = 0.3) -> Any:
    # The parser reads the syntax only; the range is declared here once and `check_declared`
    # enforces it, for text ("1.5") and numbers (1.5) alike.
    return option(default, parse=eps_number, metavar="EPS", above=EPS_ABOVE, maximum=EPS_MAX,
                  help="l-inf budget: 0.3 or 16/256.")
