#!/usr/bin/env bash
# Gather, into .whl/ (git-ignored), the wheels the GPU device image lacks (it has torch, numpy, scipy, tqdm,
# safetensors, huggingface-hub, pyyaml, pillow, requests, regex, filelock, packaging; Python 3.12).
# On the device:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.whl/" >> .git/info/exclude; }
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 piq==0.8.0 lpips==0.1.4 importlib_metadata==8.7.0
# antlr4-python3-runtime 4.9.3 (needed by omegaconf) is published only as a source distribution: build its wheel.
$PY -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
