#!/usr/bin/env bash
# The start-up and apply() figures of docs/BENCHMARKS.md, measured as a user meets them:
# sgl-accel installed from its wheel (byte-code compiled by pip, start-up .pth in place) in
# a fresh virtualenv, not the editable install of .venv (whose redirector costs every start
# ~30 ms and whose sources may run without byte-code). torch, packaging and the rest come
# from .venv through a path line; sglang from .envs/sglang-$RELEASE.
#   bash scripts/bench-startup.sh [extra arguments of `sgl-accel bench --apply-cost`]
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE=${RELEASE:-0.5.11}
bench=.cache/bench-startup
export PIP_DISABLE_PIP_VERSION_CHECK=1
rm -rf "$bench" && mkdir -p "$bench/dist"
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation . -w "$bench/dist"
.venv/bin/python -m venv --without-pip "$bench/venv"
site=$("$bench/venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
# A path line (not a site directory): .venv's own .pth files (the editable install) do not run.
.venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))" > "$site/zz_bench_dependencies.pth"
.venv/bin/python -m pip --python "$bench/venv/bin/python" install -q --no-deps "$bench"/dist/sgl_accel-*.whl
unset PYTHONDONTWRITEBYTECODE
PYTHONPATH=".envs/sglang-$RELEASE" "$bench/venv/bin/python" -m sgl_accel bench --apply-cost --emulate "$@"
