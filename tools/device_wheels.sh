#!/usr/bin/env bash
# The wheels a GPU device machine needs for enspipe's benchmarks and tests that its image lacks
# (/work/.library/device/KINDS.md: python3 3.12 with torch, torchvision, timm, numpy, pillow, click,
# tqdm, safetensors, scikit-learn, matplotlib, psutil, fsspec, pytest, ... but no zarr, numcodecs,
# webdataset, dask/distributed or jsonschema), downloaded for cp312 manylinux x86_64 per the device
# README's recipe, one version of each (two would stop the whole install there).
#
#   tools/device_wheels.sh                 # into .whl/ (git-ignored), for the device's Python 3.12
#   tools/device_wheels.sh DIR 3.11        # another folder and Python: the import check here
#
# Versions are the ones this repository's tests run with (the shared venv); the set is what
# enspipe and benchmarks/bench_gpu.py, bench_decode.py import that the image does not hold, with
# their requirements (`unzip -p W '*/METADATA' | grep ^Requires-Dist`), checked by importing them
# on top of the image's packages alone (BENCHMARKS.md, "GPU session"). The device README's limit is
# 64 MiB for everything a call carries, the tree included: the script refuses wheels over 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py=${2:-3.12}
abi=cp${py/./}
WHEELS=(
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  webdataset==1.0.2 braceexpand==0.1.7
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 zict==3.0.0 tblib==3.2.2 tornado==6.6.1
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
)
# dask imports importlib_metadata below Python 3.12 (its marker): only the check's 3.11 needs it.
if [ "$py" != 3.12 ]; then WHEELS+=(importlib-metadata==10.2.0 lazy-importer==0.1.0); fi
# .gitignore names /.whl/ too; the exclude (the README's recipe) covers an older checkout. A
# worktree's .git is a file: its exclude is the common git dir's.
exclude="$(git rev-parse --git-common-dir)/info/exclude"
if [ "$dest" = .whl ]; then grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"; fi
mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: a stale one beside a new one stops the install there
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp --abi "$abi" \
  --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$dest" "${WHEELS[@]}"
n=$(ls "$dest"/*.whl | wc -l)
bytes=$(cat "$dest"/*.whl | wc -c)
ls -1 "$dest"/*.whl | sed 's|.*/||'
echo "$n wheels, $bytes bytes ($((bytes / 1024 / 1024)) MiB) in $dest for cp${py/./} manylinux x86_64"
if [ "$n" -ne "${#WHEELS[@]}" ]; then echo "expected ${#WHEELS[@]} wheels, got $n" >&2; exit 1; fi
if [ "$bytes" -gt $((60 << 20)) ]; then echo "over 60 MiB: the device call carries 64 MiB with the tree" >&2; exit 1; fi
