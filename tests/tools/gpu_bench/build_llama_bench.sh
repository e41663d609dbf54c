#!/usr/bin/env bash
# Build llama.cpp's llama-bench with CUDA for sm_90 (H100/H200) from .bench/llama.cpp-src.tar.xz.
#
# Runs on the GPU machine (16 cores, no network). Prints configure and compile times to stderr and
# the path of the built llama-bench on its last stdout line. llama and ggml are linked statically
# (BUILD_SHARED_LIBS=OFF), so the binary is one file: bring it back through $OUT (xz) and carry it
# in .bench/ to skip this build in a later call (tests/tools/bench_gpu.py does that).
#
# Usage: tests/tools/gpu_bench/build_llama_bench.sh [BUILD_DIR]   (default /tmp/llama-build)
# Build-time trims: one CUDA architecture (90), the llama-bench target only, no tests, examples or
# server, flash-attention kernels for same-type f16/q4_0/q8_0 K/V only (GGML_CUDA_FA_ALL_QUANTS=OFF),
# no NCCL, curl or OpenSSL; portable CPU flags (GGML_NATIVE=OFF: the binary may run on another host).
# cuBLAS: taken from the CUDA toolkit, else from the pip wheels beside PyTorch (nvidia-cublas), as
# on the lent machines, whose /usr/local/cuda may hold no cuBLAS.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
ARCHIVE="$ROOT/.bench/llama.cpp-src.tar.xz"
BUILD="${1:-/tmp/llama-build}"
JOBS="${JOBS:-$(nproc)}"
[[ -f "$ARCHIVE" ]] || { echo "missing $ARCHIVE: run tests/tools/gpu_bench/pack_llama_src.sh first" >&2; exit 1; }

NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
CUDA_ROOT="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
EXTRA=()
if ! compgen -G "$CUDA_ROOT/lib64/libcublas.so*" >/dev/null && ! compgen -G "$CUDA_ROOT/targets/*/lib/libcublas.so*" >/dev/null; then
    # pip layout: nvidia/cu13/{lib,include} (CUDA 13) or nvidia/cublas/{lib,include} (CUDA 12).
    read -r CUBLAS_LIB CUBLAS_INC < <(python3 - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for root in dict.fromkeys(r for r in roots if r and os.path.isdir(r)):
    libs = sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcublas.so*")))
    heads = glob.glob(os.path.join(root, "nvidia", "*", "include", "cublas_v2.h"))
    if libs and heads:
        print(os.path.dirname(libs[0]), os.path.dirname(heads[0]))
        break
PY
)
    [[ -n "${CUBLAS_LIB:-}" ]] || { echo "no cuBLAS found (toolkit $CUDA_ROOT, python wheels)" >&2; exit 1; }
    LINKS="$BUILD/cublas-links"
    mkdir -p "$LINKS"
    for lib in cublas cublasLt; do  # FindCUDAToolkit wants the unversioned names
        ln -sf "$(ls "$CUBLAS_LIB"/lib$lib.so.* | head -1)" "$LINKS/lib$lib.so"
    done
    echo "cuBLAS from $CUBLAS_LIB (headers $CUBLAS_INC)" >&2
    EXTRA+=(-DCUDA_cublas_LIBRARY="$LINKS/libcublas.so" -DCUDA_cublasLt_LIBRARY="$LINKS/libcublasLt.so"
            -DCMAKE_CUDA_FLAGS="-I$CUBLAS_INC" -DCMAKE_CXX_FLAGS="-I$CUBLAS_INC" -DCMAKE_C_FLAGS="-I$CUBLAS_INC"
            -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath,$CUBLAS_LIB -Wl,-rpath-link,$CUBLAS_LIB")
fi
if ! compgen -G "$CUDA_ROOT/lib64/libcuda.so" >/dev/null && ! compgen -G "$CUDA_ROOT/lib64/stubs/libcuda.so" >/dev/null \
   && ! compgen -G "$CUDA_ROOT/targets/*/lib/stubs/libcuda.so" >/dev/null; then
    DRIVER="$(ldconfig -p | awk '/libcuda\.so\.1 / {print $NF; exit}')"
    if [[ -n "$DRIVER" ]]; then
        EXTRA+=(-DCUDA_cuda_driver_LIBRARY="$DRIVER")
    else
        EXTRA+=(-DGGML_CUDA_NO_VMM=ON)  # no driver library to link: the legacy memory pool
    fi
fi

mkdir -p "$BUILD"
t0=$(date +%s)
tar -xJf "$ARCHIVE" -C "$BUILD"
SRC="$BUILD/llama.cpp"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$SRC" -B "$BUILD/out" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$NVCC" \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DGGML_CUDA_FA=ON -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
    "${EXTRA[@]}" > "$BUILD/configure.log" 2>&1 || { tail -40 "$BUILD/configure.log" >&2; exit 1; }
t1=$(date +%s)
cmake --build "$BUILD/out" --target llama-bench -j "$JOBS" > "$BUILD/build.log" 2>&1 \
    || { grep -m20 -B2 -A8 "error" "$BUILD/build.log" >&2 || tail -60 "$BUILD/build.log" >&2; exit 1; }
t2=$(date +%s)
BIN="$BUILD/out/bin/llama-bench"
echo "llama-bench build: configure $((t1 - t0)) s, compile $((t2 - t1)) s, $JOBS jobs, $(du -h "$BIN" | cut -f1)" >&2
echo "$BIN"
