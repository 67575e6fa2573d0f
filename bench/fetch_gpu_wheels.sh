#!/usr/bin/env bash
# The Python packages the engine needs that the GPU box's image lacks (it reaches no registry), downloaded here as
# wheels for its Python (3.12, x86_64) into .wheels/ (git-ignored). Carry .wheels with the device call;
# bench/gpu_checks.sh installs them from there when they are missing.
#
#     bash bench/fetch_gpu_wheels.sh            # then run(..., carry=[".wheels"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
mkdir -p .wheels
pip download --quiet --no-deps --dest .wheels --python-version "$PY" --platform manylinux2014_x86_64 \
    --only-binary=:all: pydantic pydantic-core annotated-types typing-inspection
ls .wheels
