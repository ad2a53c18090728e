#!/usr/bin/env bash
# Builds llama-cpp-python (the engine under plugins/llm/llama_cpp.py) into a cached wheel once and
# prints the wheel's path. It has no binary wheel on PyPI: pip compiles the vendored llama.cpp
# (about 11 minutes on 2 cores), so tests and CI install this cached wheel instead.
#
#   scripts/llm-wheel.sh [PYTHON]      # PYTHON: the interpreter the wheel is for (default python3)
#
# Cache: ~/.cache/unimodel/wheels/llama-cpp-python-<version>-<python tag>-<flags hash>/, where the
# flags hash covers CMAKE_ARGS and the CPU's instruction-set flags (the build is -march=native,
# so a cache copied to another CPU is rebuilt rather than crashing with an illegal instruction).
# A later call finds the wheel and prints its path in well under a second.
#
# Needs g++ (scripts/test.sh installs it) and PyPI only: pip fetches the sdist, scikit-build-core
# and cmake/ninja as wheels; nothing else is downloaded (llama.cpp's own downloads are for ARM
# KleidiAI and Windows OpenMP only). Override the cache root with UNIMODEL_CACHE.
set -euo pipefail

VERSION=0.3.36
PYTHON=${1:-python3}
# A CPU build without the multimodal (mtmd) library the plugin never loads: a third less to compile.
CMAKE_ARGS_PINNED="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"

py_tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)
flags_hash=$(printf '%s\n%s\n' "$CMAKE_ARGS_PINNED" "$cpu_flags" | sha256sum | cut -c1-12)
cache_root=${UNIMODEL_CACHE:-$HOME/.cache/unimodel}
dir="$cache_root/wheels/llama-cpp-python-$VERSION-$py_tag-$flags_hash"

find_wheel() {
    compgen -G "$dir/llama_cpp_python-$VERSION-*.whl" | head -n1
}

if wheel=$(find_wheel) && [[ -n "$wheel" ]]; then
    echo "$wheel"
    exit 0
fi

mkdir -p "$cache_root/wheels"
# One build at a time: a second caller (another test run) waits for the first one's wheel.
exec 9>"$dir.lock"
flock 9
if wheel=$(find_wheel) && [[ -n "$wheel" ]]; then
    echo "$wheel"
    exit 0
fi

echo "building llama-cpp-python $VERSION for $py_tag (CPU, about 11 minutes on 2 cores) into $dir" >&2
tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
CMAKE_ARGS="$CMAKE_ARGS_PINNED" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PYTHON" -m pip wheel --no-deps --no-cache-dir --wheel-dir "$tmp" \
    "llama-cpp-python==$VERSION" >&2
built=$(compgen -G "$tmp/llama_cpp_python-$VERSION-*.whl" | head -n1)
[[ -n "$built" ]] || { echo "pip wheel produced no llama_cpp_python wheel in $tmp" >&2; exit 1; }
# Publish atomically: a directory appears only with its finished wheel inside.
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
find_wheel
