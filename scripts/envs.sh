#!/usr/bin/env bash
# Build the test environments on a CPU-only machine:
#   .venv/                one virtualenv: CPU torch 2.13.0, the pure-Python packages
#                         sglang's import chain needs, sgl-accel (editable) and pytest;
#   .envs/sglang-X/       one directory per sglang release, installed --no-deps --target,
#                         put on sys.path by tests/conftest.py (SGL_ACCEL_TEST_SGLANG=X).
# Idempotent: a release directory that already holds its dist-info is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASES=${SGLANG_RELEASES:-"0.5.10.post1 0.5.11 0.5.12.post1 0.5.13.post1"}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# Plain pip: `torch==2.13.0` resolves to the CPU wheel in the machine's find-links.
.venv/bin/pip install -q -r requirements/test.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') and torch.version.cuda is None else 'expected CPU torch 2.13.0, got ' + v)"
.venv/bin/pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true

mkdir -p .cache/wheels .envs
for v in $RELEASES; do
    dest=.envs/sglang-$v
    if [ -d "$dest/sglang-$v.dist-info" ]; then
        continue
    fi
    if ! ls .cache/wheels/sglang-"$v"-*.whl >/dev/null 2>&1; then
        .venv/bin/pip download -q --no-deps "sglang==$v" -d .cache/wheels 2>&1 | grep -v "^WARNING: Location" || true
    fi
    rm -rf "$dest"
    .venv/bin/pip install -q --no-deps --no-compile --target "$dest" .cache/wheels/sglang-"$v"-*.whl 2>&1 | grep -v "^WARNING: Location" || true
    test -d "$dest/sglang-$v.dist-info"
done
echo "environments ready: .venv + $(ls -d .envs/sglang-* | tr '\n' ' ')"
