#!/usr/bin/env bash
# The first command. On a fresh machine: create .venv, install torch (CPU build) first and then Cadre,
# prepare the packaged models, start the local stack, deploy the team and run its full cycle.
#   ./setup.sh              everything, with the smoke budget (CADRE_BUDGET=full for the real thing)
#   ./setup.sh --no-demo    install only (what CI and ./test.sh use)
set -euo pipefail
cd "$(dirname "$0")"

mkdir -p .cadre/logs
log=.cadre/logs/install.log
: > "$log"
# pip's own chatter (warnings about this machine's index settings, build-backend notices) goes to the
# log; a failing step prints the log's tail and stops.
step() {
  local what="$1"; shift
  echo "• $what"
  if ! "$@" >>"$log" 2>&1; then
    echo "✗ $what failed; the last lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  step "creating .venv" "${PYTHON:-python3}" -m venv .venv
fi
step "upgrading pip" .venv/bin/python -m pip install --quiet --upgrade pip
# torch first, from the CPU wheel pip finds on local disk; the project pins the same version so no
# later install can swap it for a multi-GB CUDA build.
step "installing torch 2.13.0 (CPU)" .venv/bin/python -m pip install --quiet "torch==2.13.0"
# llama.cpp's AMX kernels (Intel Xeon 4th gen and later) crash on the first generation with our Q4_K_M model
# (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp issue #20824): compile them out; every other native
# instruction set (AVX-512, VNNI) stays.
if [ "$(uname -m)" = x86_64 ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
step "installing Cadre and its stack (llama-cpp-python compiles once, ~7 min on 2 cores; pip caches the wheel)" \
  .venv/bin/python -m pip install --quiet -e ".[test]"
LLAMA_CPP_VERSION=$(.venv/bin/python -c "from cadre.tuning.adapter_export import LLAMA_CPP_PYTHON_VERSION as v; print(v)")
# A llama-cpp-python built before that flag (or a wheel pip cached from such a build) still has the AMX
# kernels: rebuild it once, without them.
if .venv/bin/python -c "import sys, llama_cpp; sys.exit(b'AMX_INT8 = 1' not in llama_cpp.llama_print_system_info())"; then
  .venv/bin/python -m pip cache remove llama_cpp_python >>"$log" 2>&1 || true
  step "rebuilding llama-cpp-python ${LLAMA_CPP_VERSION} without its AMX kernels (they crash on this CPU)" \
    .venv/bin/python -m pip install --quiet --force-reinstall --no-deps "llama-cpp-python==${LLAMA_CPP_VERSION}"
fi
.venv/bin/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') and '+cu' not in v else f'unexpected torch {v}')"
# llama.cpp's LoRA → GGUF converter (so a trained adapter can be served) ships only in the
# llama-cpp-python sdist: fetch it once from PyPI (pip caches it) and extract the scripts into .venv.
if [ ! -f .venv/share/cadre/llama.cpp/convert_lora_to_gguf.py ]; then
  mkdir -p .cadre/vendor
  step "fetching llama.cpp's LoRA converter (llama-cpp-python ${LLAMA_CPP_VERSION} sdist)" \
    .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==${LLAMA_CPP_VERSION}" -d .cadre/vendor
  step "installing the converter into .venv" \
    .venv/bin/python -m cadre.tuning.adapter_export install-converter ".cadre/vendor/llama_cpp_python-${LLAMA_CPP_VERSION}.tar.gz"
fi
echo "• installed (pip's log: $log)"
.venv/bin/cadre validate pipelines.yaml

if [ "${1:-}" = "--no-demo" ]; then
  exit 0
fi
exec .venv/bin/cadre demo --budget "${CADRE_BUDGET:-smoke}"
