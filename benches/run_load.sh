#!/usr/bin/env bash
# Standard load measurements of unimodel against the example doubler plugin, on loopback only.
#
#   benches/run_load.sh            # 10 s per step (DURATION=, WARMUP= override)
#   QUICK=1 benches/run_load.sh    # 3 s per step
#
# Steps (see benches/README.md for what every number means):
#   1. c=1,  JSON x:FP32:1x3, server started with --max-queue-delay-ms 0 (pure per-request latency)
#   2. c=64, JSON x:FP32:1x3, server with default flags (dynamic batching)
#   3. c=1,  binary x:FP32:1x4194304 (16 MiB round trip), same server
#   gRPC beside REST (GRPC=0 skips): c=1 on the step-1 server, c=64 on the step-2 server,
#   ModelInfer with raw inputs (what tritonclient.grpc sends)
#   4. optional: wrk at c=64 on step 2's request, when wrk is installed (WRK=0 skips it)
# then SIGTERM to the server and one summary table.
#
# Environment: UNIMODEL_PYTHON (python for the workers, passed through), PLUGIN (default
# plugins/examples/doubler.py), MODEL (default doubler), CHECK=1 (verify y == 2x on every
# response; costs bench CPU), LOADGEN_THREADS (default 1, the bench's --threads), OUT_DIR (JSON reports),
# READY_TIMEOUT (seconds to wait for /v2/health/ready, default 60), CARGO_TARGET_DIR,
# UNIMODEL_BIN (another server binary taking the same arguments, e.g. to test this script).
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ "${QUICK:-0}" == 1 ]]; then
    DURATION=${DURATION:-3}
    WARMUP=${WARMUP:-1}
else
    DURATION=${DURATION:-10}
    WARMUP=${WARMUP:-2}
fi
PLUGIN=${PLUGIN:-plugins/examples/doubler.py}
MODEL=${MODEL:-doubler}
READY_TIMEOUT=${READY_TIMEOUT:-60}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT_DIR=${OUT_DIR:-$TARGET_DIR/load-results/$(date -u +%Y%m%dT%H%M%SZ)}
HOST=127.0.0.1 # loopback only: this script never exposes the server
if [[ -n "${UNIMODEL_PYTHON:-}" ]]; then
    export UNIMODEL_PYTHON
fi

log() { printf '\n== %s\n' "$*" >&2; }

log "building the release binary (unimodel; its \`bench\` command drives the load)"
cargo build --release -p unimodel --bin unimodel
UNIMODEL=${UNIMODEL_BIN:-$TARGET_DIR/release/unimodel}
BENCH=("$TARGET_DIR/release/unimodel" bench --no-progress)
mkdir -p "$OUT_DIR"

SERVER_PID=""
PORT=""
GRPC_PORT=""

# A port the kernel just handed out and released; nothing else on this machine races for it
# within the second before the server binds it.
free_port() {
    "${UNIMODEL_PYTHON:-python3}" -c \
        'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server NAME [FLAGS...]: starts unimodel on a free port and waits (bounded) until ready.
start_server() {
    local name=$1
    shift
    PORT=$(free_port)
    GRPC_PORT=$(free_port)
    local server_log="$OUT_DIR/server-$name.log"
    log "starting server ($name): $UNIMODEL run $PLUGIN --port $PORT --grpc-port $GRPC_PORT $*"
    "$UNIMODEL" run "$PLUGIN" --port "$PORT" --grpc-port "$GRPC_PORT" "$@" >"$server_log" 2>&1 &
    SERVER_PID=$!
    # The server offers no readiness event to a separate process: probe /v2/health/ready,
    # bounded by READY_TIMEOUT, and give up at once if the server exits.
    local deadline=$((SECONDS + READY_TIMEOUT))
    until curl -fsS -o /dev/null "http://$HOST:$PORT/v2/health/ready" 2>/dev/null; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "server exited before becoming ready; its log ($server_log):" >&2
            tail -n 40 "$server_log" >&2
            SERVER_PID=""
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "server not ready after ${READY_TIMEOUT}s; its log ($server_log):" >&2
            tail -n 40 "$server_log" >&2
            return 1
        fi
        sleep 0.2
    done
}

# Sends SIGTERM (the server drains), waits up to 30 s, then SIGKILL.
stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "server ignored SIGTERM for 30 s; killing it" >&2
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap stop_server EXIT

FAILED=0
CHECK_FLAG=()
if [[ "${CHECK:-0}" == 1 ]]; then
    CHECK_FLAG=(--check-double)
fi

# loadgen_step NAME [BENCH FLAGS...]: one `unimodel bench` run against the current server.
loadgen_step() {
    local name=$1
    shift
    log "unimodel bench: $name"
    "${BENCH[@]}" --url "http://$HOST:$PORT" --model "$MODEL" --duration "$DURATION" \
        --warmup "$WARMUP" --threads "$LOADGEN_THREADS" --label "$name" \
        --json "$OUT_DIR/$name.json" "${CHECK_FLAG[@]}" "$@" || FAILED=1
}

REPORTS=()
# grpc_step NAME [BENCH FLAGS...]: the same step over gRPC (--check-double is HTTP only).
grpc_step() {
    [[ "${GRPC:-1}" != 0 ]] || return 0
    local name=$1
    shift
    log "unimodel bench: $name"
    "${BENCH[@]}" --url "http://$HOST:$PORT" --model "$MODEL" --duration "$DURATION" \
        --warmup "$WARMUP" --threads "$LOADGEN_THREADS" --label "$name" \
        --json "$OUT_DIR/$name.json" --protocol grpc --grpc-url "http://$HOST:$GRPC_PORT" \
        "$@" || FAILED=1
    REPORTS+=("$OUT_DIR/$name.json")
}

if start_server nodelay --max-queue-delay-ms 0; then
    loadgen_step c1-json-1x3-nodelay --concurrency 1 --protocol rest --input x:FP32:1x3
    REPORTS+=("$OUT_DIR/c1-json-1x3-nodelay.json")
    grpc_step c1-grpc-1x3-nodelay --concurrency 1 --input x:FP32:1x3
    stop_server
else
    FAILED=1
fi

if start_server default; then
    loadgen_step c64-json-1x3-batched --concurrency 64 --protocol rest --input x:FP32:1x3
    REPORTS+=("$OUT_DIR/c64-json-1x3-batched.json")
    grpc_step c64-grpc-1x3-batched --concurrency 64 --input x:FP32:1x3
    loadgen_step c1-binary-16MiB --concurrency 1 --protocol rest-binary --input x:FP32:1x4194304
    REPORTS+=("$OUT_DIR/c1-binary-16MiB.json")

    if [[ "${WRK:-1}" != 0 ]] && command -v wrk >/dev/null; then
        log "wrk: c=64, same JSON request (a second opinion on step 2's req/s)"
        lua="$OUT_DIR/wrk-post.lua"
        cat >"$lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]}'
LUA
        wrk -t1 -c64 -d"${DURATION}s" --latency -s "$lua" \
            "http://$HOST:$PORT/v2/models/$MODEL/infer" | tee "$OUT_DIR/wrk-c64.txt" || FAILED=1
    fi
    stop_server
else
    FAILED=1
fi

log "summary (JSON reports in $OUT_DIR)"
existing=()
for r in "${REPORTS[@]}"; do
    [[ -f "$r" ]] && existing+=("$r")
done
if ((${#existing[@]} > 0)); then
    "${BENCH[@]}" --summarize "${existing[@]}"
fi
exit "$FAILED"
