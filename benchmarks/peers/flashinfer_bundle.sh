#!/usr/bin/env bash
# FlashInfer with the benchmark grid's kernels built ahead of time, packed for a GPU
# machine that has no network (or no time to compile at first use).
#
#   benchmarks/peers/flashinfer_bundle.sh OUT.tar.gz [WORKLOAD.json]
#
# Needs network (PyPI), nvcc and a C++ compiler here; no GPU. It
#   1. installs flashinfer-python, apache-tvm-ffi and nvidia-cudnn-frontend for the GPU
#      machine's Python (TARGET_PYTHON, default 3.12) into site/, and the first two for
#      this Python into a build tree;
#   2. builds, with this machine's nvcc for CUDA_ARCH (default 9.0a), every kernel
#      variant pa_hybrid.bench.peers.flashinfer runs on the grid (grid_jit_specs), and
#      puts each library where FlashInfer loads prebuilt kernels without compiling
#      (site/flashinfer/data/aot/NAME/NAME.so);
#   3. drops the headers those libraries no longer need and packs site/ (csrc/ stays:
#      FlashInfer renders its module specs from the templates there before it looks
#      for a prebuilt library).
# On the GPU machine (which must have torch, numpy, nvidia-ml-py, einops, ninja, ...
# the rest of FlashInfer's requirements; the image this was written for has them):
#   mkdir -p /tmp/peers && tar xzf OUT.tar.gz -C /tmp/peers && export PYTHONPATH=/tmp/peers/site
#   python -m pa_hybrid.bench --peers
# The libraries link the CUDA runtime of this nvcc's major version (libcudart.so.13 for
# CUDA 13): the GPU machine's torch must use the same major version.
set -euo pipefail

out=${1:?usage: $0 OUT.tar.gz [WORKLOAD.json]}
repo=$(cd "$(dirname "$0")/../.." && pwd)
workload=${2:-$repo/../shared/bench/workload.json}
flashinfer_version=${FLASHINFER_VERSION:-0.5.3}  # the version ../shared/bench/PEERS.md measured
tvm_ffi_version=${TVM_FFI_VERSION:-0.1.15.post2}
cudnn_frontend_version=${CUDNN_FRONTEND_VERSION:-1.32.0}  # the cudnn peer; cuDNN itself comes with torch
target_python=${TARGET_PYTHON:-3.12}
cuda_arch=${CUDA_ARCH:-9.0a}
cuda_home=${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}
python=${PYTHON:-python3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip_quiet=(-q --disable-pip-version-check --no-cache-dir)

echo "== FlashInfer $flashinfer_version, tvm-ffi $tvm_ffi_version, cuDNN frontend $cudnn_frontend_version for Python $target_python"
"$python" -m pip install "${pip_quiet[@]}" --no-deps --only-binary=:all: --target "$work/site" \
    --python-version "$target_python" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    "flashinfer-python==$flashinfer_version" "apache-tvm-ffi==$tvm_ffi_version" \
    "nvidia-cudnn-frontend==$cudnn_frontend_version"

echo "== the same for this Python, to build with"
"$python" -m pip install "${pip_quiet[@]}" --no-deps --target "$work/build" \
    "flashinfer-python==$flashinfer_version" "apache-tvm-ffi==$tvm_ffi_version" \
    nvidia-ml-py einops click tabulate ninja

# Build machines without a GPU driver have no libcuda.so to link against: an empty
# stand-in with the driver's soname records the dependency, the real driver resolves it.
mkdir -p "$work/stubs"
echo "" | cc -shared -x c -Wl,-soname,libcuda.so.1 -o "$work/stubs/libcuda.so" -

echo "== building the grid's kernels for sm_${cuda_arch/./} with $cuda_home/bin/nvcc"
PYTHONPATH="$work/build:$repo" PATH="$work/build/bin:$PATH" CUDA_HOME="$cuda_home" \
FLASHINFER_CUDA_ARCH_LIST="$cuda_arch" FLASHINFER_WORKSPACE_BASE="$work/jit" \
FLASHINFER_EXTRA_LDFLAGS="-Wl,--no-as-needed -L$work/stubs" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
"$python" - "$workload" "$work/site/flashinfer/data/aot" <<'EOF'
import json, shutil, sys, time
from pathlib import Path

from pa_hybrid.bench.peers.flashinfer import grid_jit_specs

workload, aot = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
for spec in grid_jit_specs(workload):
    start = time.time()
    spec.build(verbose=False)
    (aot / spec.name).mkdir(parents=True, exist_ok=True)
    shutil.copy2(spec.jit_library_path, aot / spec.name / f"{spec.name}.so")
    print(f"{spec.name}: {time.time() - start:.0f} s", flush=True)
EOF

# headers are only read when compiling
rm -rf "$work/site/flashinfer/data/"{cutlass,include,spdlog}
mkdir -p "$(dirname "$out")"
tar czf "$out" -C "$work" site
echo "== wrote $out ($(du -h "$out" | cut -f1))"
