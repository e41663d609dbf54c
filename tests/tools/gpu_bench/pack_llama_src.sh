#!/usr/bin/env bash
# Pack the llama.cpp sources that llama-bench needs into .bench/llama.cpp-src.tar.xz.
#
# The GPU machine cannot download, so llama.cpp travels with the working tree (carry ".bench").
# Source: the llama-cpp-python sdist (its vendor/llama.cpp), the same llama.cpp our CPU benchmarks
# use. Only what a CUDA build of the llama-bench target needs is kept: the build files, ggml (CPU
# and CUDA backends), src, include, common, vendor and tools/llama-bench; tools/CMakeLists.txt is
# replaced by one that adds llama-bench alone. Models, docs, the web UI, tests and examples go.
# .bench/ is git-ignored: the archive is never committed.
#
# Usage: tests/tools/gpu_bench/pack_llama_src.sh [SDIST.tar.gz]
#   without an argument: /tmp/sdist/llama_cpp_python-0.3.36.tar.gz if it exists, else
#   `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36` into a temp folder.
set -euo pipefail

VERSION=0.3.36
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
OUT_DIR="$ROOT/.bench"
ARCHIVE="$OUT_DIR/llama.cpp-src.tar.xz"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

SDIST="${1:-/tmp/sdist/llama_cpp_python-$VERSION.tar.gz}"
if [[ ! -f "$SDIST" ]]; then
    python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/dl"
    SDIST="$(ls "$WORK"/dl/llama_cpp_python-*.tar.gz)"
fi

tar -xzf "$SDIST" -C "$WORK"
SRC="$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
DST="$WORK/llama.cpp"
mkdir -p "$DST/tools" "$DST/ggml/src"

# Top level: build files and licence only.
cp "$SRC"/CMakeLists.txt "$SRC"/LICENSE "$DST"/
cp -r "$SRC"/cmake "$SRC"/include "$SRC"/src "$SRC"/common "$SRC"/vendor "$DST"/

# ggml: everything except the backends we do not build (CPU and CUDA stay; BLAS is tiny and
# referenced by name).
cp "$SRC"/ggml/CMakeLists.txt "$DST"/ggml/
cp -r "$SRC"/ggml/cmake "$SRC"/ggml/include "$DST"/ggml/
for entry in "$SRC"/ggml/src/*; do
    name="$(basename "$entry")"
    case "$name" in
        ggml-*) [[ -d "$entry" ]] || { cp "$entry" "$DST/ggml/src/"; continue; }
                case "$name" in ggml-cpu|ggml-cuda|ggml-blas) cp -r "$entry" "$DST/ggml/src/" ;; esac ;;
        *) cp -r "$entry" "$DST/ggml/src/" ;;
    esac
done

# tools: llama-bench alone.
cp -r "$SRC"/tools/llama-bench "$DST"/tools/
cat > "$DST/tools/CMakeLists.txt" <<'CMAKE'
# Trimmed by tests/tools/gpu_bench/pack_llama_src.sh: only llama-bench is built.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
CMAKE

mkdir -p "$OUT_DIR"
# Reproducible archive: fixed order, owner and times.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$WORK" -cf - llama.cpp \
    | xz -9 -T0 > "$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
echo "wrote $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1); unpacked $(du -sh "$DST" | cut -f1))"
