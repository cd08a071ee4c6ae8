#!/usr/bin/env bash
# The benchmark on an NVIDIA GPU: sections 1-2 (plain batched loop vs slotserve's embedded API)
# at N = 1 to 128 with every layer on the GPU, on a random-weight 1.1B llama (TinyLlama's shape).
#
#   scripts/gpu_bench.sh fetch        here (the package registry reachable): puts what the GPU
#                                     machine lacks into gpu-carry/ (git ignores it, ~45 MB)
#   scripts/gpu_bench.sh run gpu-carry   on the GPU machine (no network; Python 3.12, CUDA 13):
#                                     writes the results to $OUT (default /tmp/gpu-bench)
#
# The CUDA build of llama-cpp-python and how to load it come from ../shared/gpu/README.md
# (SHARED=/path/to/shared when the checkout is elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  fetch)
    gpu="${SHARED:-../shared}/gpu"  # the CUDA build, beside this checkout unless SHARED says
    [ -f "$gpu/llama_cpp_cuda_sm90.tar.xz" ] || { echo "no $gpu/llama_cpp_cuda_sm90.tar.xz; set SHARED" >&2; exit 1; }
    mkdir -p gpu-carry/wheels
    cp "$gpu"/llama_cpp_cuda_sm90.tar.xz gpu-carry/
    cp "$gpu"/diskcache-*.whl gpu-carry/wheels/
    # What slotserve and the model writer need that the GPU machine does not have.
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
      -d gpu-carry/wheels msgspec starlette uvicorn h11 click gguf==0.19.0 pyyaml tqdm
    du -sh gpu-carry
    ;;
  run)
    carry="${2:?usage: $0 run CARRIED_FOLDER}"
    out="${OUT:-/tmp/gpu-bench}"
    mkdir -p /tmp/site "$out"
    tar -xJf "$carry/llama_cpp_cuda_sm90.tar.xz" -C /tmp/site
    python3 -m pip install --quiet --no-index --no-deps --target /tmp/site "$carry"/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    NV=$(python3 -c "import nvidia,os;print(':'.join(sorted({os.path.join(p,d,'lib') for p in nvidia.__path__ for d in os.listdir(p) if os.path.isdir(os.path.join(p,d,'lib'))})))")
    export LD_LIBRARY_PATH="$NV:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$out/nvidia-smi.csv"
    python3 -m runtime.bench.random_model /tmp/llama-1b-random.gguf --shape 1b
    python3 -m runtime.cli bench --sections plain,embedded --n 1,4,16,32,64,128 \
      --model /tmp/llama-1b-random.gguf --gpu-layers -1 --max-tokens 64 --n-ctx-per-slot 256 \
      --repeats 3 --out "$out" 2>&1 | tee "$out/bench.txt"
    ;;
  *)
    echo "usage: $0 fetch | run CARRIED_FOLDER" >&2
    exit 2
    ;;
esac
