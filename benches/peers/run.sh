#!/usr/bin/env bash
# The peer comparison: UniModel, stock tritonserver (Python backend), PyTriton, LitServe,
# Ray Serve and plain FastAPI, each serving the same two models (BYTES echo; batched
# tanh(W @ x) with a fixed 64x64 W), all driven by `unimodel bench` on this machine, on
# loopback only. Writes results/RESULTS.md (table and ratios) and results/peers.png.
#
#   benches/peers/run.sh            # ~10 s per step, several batching delays per server
#   benches/peers/run.sh --quick    # ~3 s per step, fewer delays: under 5 minutes
#   PEERS="unimodel triton" benches/peers/run.sh --quick    # a subset
#
# Environment: PEERS (subset, default all: unimodel triton pytriton fastapi litserve ray),
# DURATION, WARMUP (seconds per step), PEERS_CACHE (virtualenvs, see install.sh),
# UNIMODEL_PYTHON (python for UniModel's workers), UNIMODEL_BIN (skip the release build),
# RESULTS (output folder, default benches/peers/results), READY_TIMEOUT (default 120 s).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
QUICK=0
for arg in "$@"; do
    case $arg in
    --quick) QUICK=1 ;;
    *)
        echo "usage: $0 [--quick]" >&2
        exit 2
        ;;
    esac
done
if ((QUICK)); then
    DURATION=${DURATION:-3}
    WARMUP=${WARMUP:-1}
    TRITON_DELAYS=${TRITON_DELAYS:-"0 500"}
    UNIMODEL_DELAYS=${UNIMODEL_DELAYS:-"0 0.5"}
else
    DURATION=${DURATION:-10}
    WARMUP=${WARMUP:-3}
    TRITON_DELAYS=${TRITON_DELAYS:-"0 100 500 1000 2000"}
    UNIMODEL_DELAYS=${UNIMODEL_DELAYS:-"0 0.5 1 2"}
fi
PEERS=${PEERS:-"unimodel triton pytriton fastapi litserve ray"}
PEERS_CACHE=${PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/unimodel-peers}
RESULTS=${RESULTS:-$HERE/results}
READY_TIMEOUT=${READY_TIMEOUT:-120}
RUNS="$RESULTS/runs"
LOGS="$RESULTS/logs"
BODIES="$HERE/bodies"
HOST=127.0.0.1 # loopback only
export PEERS_CACHE

log() { printf '\n== %s\n' "$*" >&2; }

rm -rf "$RUNS" "$LOGS"
mkdir -p "$RUNS" "$LOGS"
log "installing peers (idempotent) into $PEERS_CACHE"
wanted=()
for p in $PEERS; do
    case $p in
    triton | pytriton) wanted+=(pytriton) ;;
    fastapi | litserve | ray) wanted+=("$p") ;;
    esac
done
if ((${#wanted[@]} > 0)); then
    "$HERE/install.sh" $(printf '%s\n' "${wanted[@]}" | sort -u)
fi
if [[ -z "${UNIMODEL_BIN:-}" ]]; then
    log "building unimodel (release)"
    (cd "$ROOT" && cargo build --release -p unimodel --bin unimodel)
    UNIMODEL_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/unimodel"
fi
BENCH=("$UNIMODEL_BIN" bench --no-progress --duration "$DURATION" --warmup "$WARMUP")

SERVER_PID=""
PORT=""
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server NAME PROBES CMD...: starts CMD (its own process group) and waits, bounded by
# READY_TIMEOUT, until POSTing each probe ("PATH=BODY_FILE", space-separated: one per model)
# answers 200.
start_server() {
    local name=$1 probes=$2
    shift 2
    local server_log="$LOGS/$name.log"
    log "starting $name: $*"
    setsid "$@" >"$server_log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + READY_TIMEOUT))
    local probe
    for probe in $probes; do
        until curl -fsS -o /dev/null -H 'Content-Type: application/json' \
            --data-binary "@${probe#*=}" "http://$HOST:$PORT${probe%%=*}" 2>/dev/null; do
            if ! kill -0 "$SERVER_PID" 2>/dev/null; then
                echo "$name exited before becoming ready; its log ($server_log):" >&2
                tail -n 30 "$server_log" >&2
                SERVER_PID=""
                return 1
            fi
            if ((SECONDS >= deadline)); then
                echo "$name not ready after ${READY_TIMEOUT}s; its log ($server_log):" >&2
                tail -n 30 "$server_log" >&2
                stop_server
                return 1
            fi
            sleep 0.5
        done
    done
}

# SIGTERM to the server's process group, SIGKILL after 30 s.
stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap stop_server EXIT

# bench RUN_NAME LABEL BENCH_ARGS...: one `unimodel bench` run, its report in $RUNS.
bench() {
    local run=$1 label=$2
    shift 2
    log "bench $run"
    "${BENCH[@]}" --label "$label" --json "$RUNS/$run.json" "$@" || echo "bench $run failed" >&2
}

# KServe V2 peers: the same fixed bodies for every server.
kserve_runs() {
    local name=$1 config=$2 what=$3
    local url="http://$HOST:$PORT"
    if [[ $what == *echo* ]]; then
        bench "$name-$config-echo" "$name $config echo" --url "$url" --model echo \
            --input-json "$BODIES/echo-kserve.json" --concurrency 1
    fi
    if [[ $what == *matmul1* ]]; then
        bench "$name-$config-matmul" "$name $config" --url "$url" --model matmul \
            --input-json "$BODIES/matmul-kserve.json" --concurrency 1,64
    elif [[ $what == *matmul64* ]]; then
        # Named apart: the chart shows each server's c=1 -> c=64 line, the table every delay.
        bench "$name-$config-matmul64" "$name $config" --url "$url" --model matmul \
            --input-json "$BODIES/matmul-kserve.json" --concurrency 64
    fi
}

json_runs() {
    local name=$1 config=$2
    local url="http://$HOST:$PORT"
    bench "$name-$config-echo" "$name $config echo" --protocol http-json --url "$url/echo" \
        --body-json "$BODIES/echo.json" --concurrency 1
    bench "$name-$config-matmul" "$name $config" --protocol http-json --url "$url/matmul" \
        --body-json "$BODIES/matmul.json" --concurrency 1,64
}

KSERVE_PROBES="/v2/models/echo/infer=$BODIES/echo-kserve.json /v2/models/matmul/infer=$BODIES/matmul-kserve.json"
JSON_PROBES="/echo=$BODIES/echo.json /matmul=$BODIES/matmul.json"

run_unimodel() {
    local first=1
    for delay in $UNIMODEL_DELAYS; do
        PORT=$(free_port)
        start_server "unimodel-delay$delay" "$KSERVE_PROBES" \
            "$UNIMODEL_BIN" run "$HERE/servers/unimodel_models.py" --port "$PORT" \
            --max-queue-delay-ms "$delay" || continue
        if ((first)); then
            kserve_runs unimodel "delay=${delay}ms" "echo matmul1"
            first=0
        else
            kserve_runs unimodel "delay=${delay}ms" matmul64
        fi
        stop_server
    done
}

triton_env() {
    local venv="$PEERS_CACHE/pytriton"
    local py_lib
    py_lib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
    TRITON_HOME=$("$venv/bin/python" -c 'import pytriton, os; print(os.path.join(os.path.dirname(pytriton.__file__), "tritonserver"))')
    # The Python backend looks for its stub beside libtriton_python.so: assemble a backend
    # folder with the stub built for this interpreter's version (3.11).
    local ver
    ver=$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    BACKENDS="$RESULTS/triton-backends"
    rm -rf "$BACKENDS"
    mkdir -p "$BACKENDS/python"
    cp "$TRITON_HOME/backends/python/"* "$BACKENDS/python/" 2>/dev/null || true
    cp "$TRITON_HOME/python_backend_stubs/$ver/triton_python_backend_stub" "$BACKENDS/python/"
    # libpython3.11 of the interpreter that owns the venv, and the wheel's bundled CUDA runtime
    # (the stub links it even on CPU).
    local wheel_libs="$venv/lib/python$ver/site-packages/nvidia_pytriton.libs"
    export LD_LIBRARY_PATH="$py_lib:$wheel_libs:${LD_LIBRARY_PATH:-}"
    # The stub ignores PYTHONPATH (isolated interpreter): model.py adds the venv's packages.
    SITE_PACKAGES="$venv/lib/python$ver/site-packages"
}

run_triton() {
    triton_env
    local first=1
    for delay in $TRITON_DELAYS; do
        local repo="$RESULTS/triton-repo-$delay"
        rm -rf "$repo"
        "$PEERS_CACHE/pytriton/bin/python" "$HERE/servers/make_triton_repo.py" "$repo" --delay-us "$delay" \
            --site-packages "$SITE_PACKAGES"
        PORT=$(free_port)
        start_server "triton-delay$delay" "$KSERVE_PROBES" \
            "$TRITON_HOME/bin/tritonserver" --model-repository "$repo" \
            --backend-directory "$BACKENDS" --http-address "$HOST" --http-port "$PORT" \
            --allow-grpc false --allow-metrics false --log-verbose 0 || continue
        if ((first)); then
            kserve_runs triton "delay=${delay}us" "echo matmul1"
            first=0
        else
            kserve_runs triton "delay=${delay}us" matmul64
        fi
        stop_server
    done
}

run_pytriton() {
    # PyTriton runs the same tritonserver and Python-backend stub: the stub must load the
    # libpython3.11 of the venv's interpreter, not another 3.11 build on the library path.
    local py_lib
    py_lib=$("$PEERS_CACHE/pytriton/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
    PORT=$(free_port)
    start_server pytriton "$KSERVE_PROBES" \
        env LD_LIBRARY_PATH="$py_lib:${LD_LIBRARY_PATH:-}" "$PEERS_CACHE/pytriton/bin/python" "$HERE/servers/pytriton_server.py" --port "$PORT" \
        --grpc-port "$(free_port)" --metrics-port "$(free_port)" --delay-us 100 || return 0
    kserve_runs pytriton "delay=100us" "echo matmul1"
    stop_server
}

run_fastapi() {
    PORT=$(free_port)
    start_server fastapi "$JSON_PROBES" \
        "$PEERS_CACHE/fastapi/bin/python" "$HERE/servers/fastapi_server.py" --port "$PORT" || return 0
    json_runs fastapi "no-batching"
    stop_server
}

run_litserve() {
    PORT=$(free_port)
    start_server litserve "$JSON_PROBES" \
        "$PEERS_CACHE/litserve/bin/python" "$HERE/servers/litserve_server.py" --port "$PORT" \
        --batch-timeout 0.001 || return 0
    json_runs litserve "timeout=1ms"
    stop_server
}

run_ray() {
    PORT=$(free_port)
    start_server ray-serve "$JSON_PROBES" \
        "$PEERS_CACHE/ray/bin/python" "$HERE/servers/ray_server.py" --port "$PORT" \
        --batch-wait 0.001 || return 0
    json_runs ray-serve "wait=1ms"
    stop_server
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u +%Y-%m-%dT%H:%MZ)
for p in $PEERS; do
    "run_$p"
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

log "writing $RESULTS/RESULTS.md and $RESULTS/peers.png"
"$UNIMODEL_BIN" bench --summarize "$RUNS"/*.json >"$RESULTS/summary.txt"
matmul_runs=("$RUNS"/*-matmul.json)
"$UNIMODEL_BIN" bench --summarize "${matmul_runs[@]}" >/dev/null \
    --label "batched tanh(W @ x), 64x64 FP32: c=1 -> c=64, smallest delay" --plot "$RESULTS/peers.png"
python3 "$HERE/report.py" "$RUNS" --started "$STARTED" --load-before "$LOAD_BEFORE" \
    --load-after "$LOAD_AFTER" --duration "$DURATION" --warmup "$WARMUP" --quick "$QUICK" \
    >"$RESULTS/RESULTS.md"
cat "$RESULTS/RESULTS.md"
