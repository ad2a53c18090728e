#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the reference OpenAI-compatible server the LLM bench compares
# UniModel against) from the llama.cpp sources that llama-cpp-python vendors: the same llama.cpp
# revision as plugins/llm/llama_cpp.py runs, so the comparison measures the serving layer, not two
# kernel versions. Builds once into a cache and prints the binary's path.
#
#   benches/llm/build-llama-server.sh
#
# Cache: ~/.cache/unimodel/llama-server/<version>-<flags hash>/bin/llama-server (the build is
# -march=native: the hash covers the CPU's flags and the cmake options). Sources: the
# llama-cpp-python sdist, kept in ~/.cache/unimodel/sdist/ (fetched with `pip download` once).
# cmake: the one on PATH, else pip's `cmake` wheel in a cached venv. A bench-only dependency: CI
# never builds this. It takes a long time on a small machine; it runs `nice -n 19` with
# BUILD_JOBS jobs (default 1). Override the cache root with UNIMODEL_CACHE.
set -euo pipefail

VERSION=0.3.36
JOBS=${BUILD_JOBS:-1}
# The server only: no tests, examples or web UI (the prebuilt UI would be downloaded from HF).
CMAKE_OPTS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF)

cache_root=${UNIMODEL_CACHE:-$HOME/.cache/unimodel}
cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)
flags_hash=$(printf '%s\n%s\n' "${CMAKE_OPTS[*]}" "$cpu_flags" | sha256sum | cut -c1-12)
dir="$cache_root/llama-server/$VERSION-$flags_hash"
bin="$dir/bin/llama-server"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache_root/llama-server" "$cache_root/sdist"
exec 9>"$dir.lock"
flock 9
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

sdist="$cache_root/sdist/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    echo "fetching the llama-cpp-python $VERSION sdist" >&2
    python3 -m pip download --no-deps --no-binary :all: --no-build-isolation \
        --dest "$cache_root/sdist" "llama-cpp-python==$VERSION" >&2
fi

cmake_bin=$(command -v cmake || true)
if [[ -z "$cmake_bin" ]]; then
    tools="$cache_root/cmake-venv"
    if [[ ! -x "$tools/bin/cmake" ]]; then
        echo "installing cmake into $tools" >&2
        # In place (a venv's scripts name their own path, so it cannot be moved after).
        rm -rf "$tools"
        python3 -m venv "$tools"
        "$tools/bin/pip" install -q cmake >&2
    fi
    cmake_bin="$tools/bin/cmake"
fi

work="$dir.build"
mkdir -p "$work"
if [[ ! -f "$work/src/CMakeLists.txt" ]]; then
    echo "unpacking llama.cpp from $sdist" >&2
    rm -rf "$work/src" "$work/unpack"
    mkdir -p "$work/unpack"
    tar xzf "$sdist" -C "$work/unpack" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    mv "$work/unpack/llama_cpp_python-$VERSION/vendor/llama.cpp" "$work/src"
    rm -rf "$work/unpack"
fi
echo "building llama-server ($JOBS jobs, nice 19) in $work: long on a small machine" >&2
# The build dir is kept on failure, so a rerun resumes instead of starting over.
nice -n 19 "$cmake_bin" -S "$work/src" -B "$work/build" "${CMAKE_OPTS[@]}" >&2
nice -n 19 "$cmake_bin" --build "$work/build" --target llama-server -j "$JOBS" >&2
mkdir -p "$dir.tmp/bin"
cp "$work/build/bin/llama-server" "$dir.tmp/bin/"
rm -rf "$dir" && mv "$dir.tmp" "$dir"
rm -rf "$work"
echo "$bin"
