#!/usr/bin/env bash
# A Python here that sees only what a GPU device machine's image holds (its package list in
# /work/.library/device/KINDS.md, copied below: the packages of this venv that it names, linked, not
# copied), so that a run with the carried wheels on top (tools/device_wheels.sh) shows what the
# device would lack. The venv's own Python version (3.11 here; the device's is 3.12): wheels for it
# come from `tools/device_wheels.sh DIR 3.11`.
#
#   tools/device_like_python.sh DIR      # DIR/bin/python (no site-packages of its own) and DIR/base
#   PYTHONPATH=SITE:DIR/base:... DIR/bin/python -c 'import enspipe'
set -euo pipefail
dir=${1:?usage: tools/device_like_python.sh DIR}
python3 -m venv --without-pip --clear "$dir"
mkdir -p "$dir/base"
python3 - "$dir/base" <<'PY'
import importlib.metadata as md
import re
import sys
from pathlib import Path

# KINDS.md, "Python packages already there" (2026-11-17), as listed there.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
image = {norm(n) for n in IMAGE.split()}
base = Path(sys.argv[1])
linked = []
for dist in md.distributions():
    name = norm(dist.metadata["Name"])
    # The image's CUDA libraries carry other suffixes than this venv's (-cu12 / -cu13 / none).
    if name not in image and not name.startswith(("nvidia-", "cuda-")):
        continue
    site = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or ()}
    for top in tops:
        src = site / top
        if top.endswith(".pth") or top in ("..", "bin") or not src.exists() or (base / top).exists():
            continue
        (base / top).symlink_to(src)
    linked.append(name)
print(f"{len(linked)} of the image's packages linked from {sys.prefix} into {base}")
PY
echo "python: $dir/bin/python ($("$dir/bin/python" -V 2>&1)); PYTHONPATH=SITE:$dir/base:..."
