#!/usr/bin/env bash
# Wheels of the Python packages the GPU image lacks (nibabel, SimpleITK), for Python 3.12 on x86_64, into .whl/ at
# the repository root: carry .whl to the GPU machine; benchmarks/gpu_check.sh installs them there (no internet).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl nibabel==5.4.2 SimpleITK==2.5.3
ls -la .whl
