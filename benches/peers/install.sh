#!/usr/bin/env bash
# Installs each peer server into its own virtualenv under $PEERS_CACHE (idempotent: a venv
# whose stamp matches its pinned requirements is left alone).
#
#   benches/peers/install.sh [fastapi|litserve|ray|pytriton]...   # default: all
#
# Environment: PEERS_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/unimodel-peers), PEERS_PYTHON
# (interpreter that creates the venvs; default python3.11 or python3: the stock tritonserver's
# Python-backend stub links libpython3.11, so PyTriton and Triton need 3.11).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PEERS_CACHE=${PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/unimodel-peers}
PEERS_PYTHON=${PEERS_PYTHON:-$(command -v python3.11 || command -v python3)}

# Pinned top-level versions; pip resolves the rest (recorded in each venv's freeze.txt).
declare -A REQS=(
    [fastapi]="fastapi==0.163.2 uvicorn==0.54.0 numpy==2.2.6"
    [litserve]="litserve==0.2.19 numpy==2.2.6"
    [ray]="ray[serve]==2.60.0 numpy==2.2.6"
    [pytriton]="nvidia-pytriton==0.7.0"
)

install_one() {
    local name=$1
    local venv="$PEERS_CACHE/$name"
    local want="${REQS[$name]}"
    if [[ -f "$venv/.stamp" && "$(cat "$venv/.stamp")" == "$want" ]]; then
        echo "peers: $name already installed in $venv" >&2
        return 0
    fi
    echo "peers: installing $name ($want) into $venv" >&2
    rm -rf "$venv"
    "$PEERS_PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check $want
    "$venv/bin/pip" freeze >"$venv/freeze.txt"
    echo "$want" >"$venv/.stamp"
}

names=("$@")
if ((${#names[@]} == 0)); then
    names=(fastapi litserve ray pytriton)
fi
mkdir -p "$PEERS_CACHE"
for name in "${names[@]}"; do
    if [[ -z "${REQS[$name]:-}" ]]; then
        echo "peers: unknown peer '$name'; known: ${!REQS[*]}" >&2
        exit 2
    fi
    install_one "$name"
done
