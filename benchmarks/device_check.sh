#!/usr/bin/env bash
# One script for a machine with an accelerator (< 5 minutes): the tests that touch the train step,
# then the speed benchmark (stock vs custom convolution, lax.scan vs per-step dispatch, patches/s).
# Usage: bash benchmarks/device_check.sh [PYTHON]   (from the repository root; writes $OUT if set)
set -euo pipefail
PY=${1:-${PYTHON:-.venv/bin/python}}
OUT=${OUT:-.}
export PYTHONPATH=${PYTHONPATH:-$PWD}
"$PY" -c "import jax; print('backend', jax.default_backend(), jax.devices())"
timeout 150 "$PY" -m pytest -q -x -m "not slow" tests/test_scan.py tests/test_models.py \
    tests/test_train.py::test_train_step_learns_and_uses_fresh_masks 2>&1 | tail -5
timeout 150 "$PY" benchmarks/speed.py --quick --train-only --scan --json "$OUT/device_speed.json"
