#!/usr/bin/env bash
# Checks the container image without a Docker daemon: builds the Dockerfile's runtime stage as
# a root filesystem from Debian packages (mmdebstrap, the same package list and setup script
# as the Dockerfile), puts the binary in, seeds /models with the examples as the Helm chart's
# init container does, and runs the image's default command the way a container runtime
# would: in its own mount and PID namespaces (the server is PID 1, as in a container),
# chrooted, as the image's non-root user, with the image's environment, on a read-only root
# as the chart runs it (readOnlyRootFilesystem). Then it waits for readiness, runs one
# inference on the doubler, and runs the image's HEALTHCHECK command (it must pass while the
# server serves and fail once it has stopped). With podman present (and CHECK_DEPLOY_PODMAN
# not 0), the root filesystem is also imported as an image (`podman import`, with the
# Dockerfile's ENTRYPOINT, CMD, USER and ENV; some 20 s more).
#
# With --cluster it then runs deploy/compose.yaml's node1, node2 and gateway commands in the
# image too (ports remapped to free loopback ones, compose's service names to 127.0.0.1), on
# host etcd and nats-server (Debian's etcd-server, nats-server), and checks an inference
# through the gateway and both nodes' registration in etcd: `docker compose up` as far as it
# can go without Docker.
#
# usage: scripts/check-deploy.sh [--cluster] [BINARY]
#   BINARY: the unimodel binary to put in the image [default: $UNIMODEL_BIN, else
#   target/release/unimodel if built, else target/debug/unimodel]. It must run on Debian
#   bookworm's glibc (any binary built on bookworm does).
#
# Needs root (mmdebstrap's root mode, chroot, unshare), mmdebstrap (Debian package), curl,
# python3 with yaml for --cluster (Debian python3-yaml), and
# network access to the Debian archive on the first run only: the root filesystem is cached
# under ${UNIMODEL_CACHE_DIR:-~/.cache/unimodel}/deploy-rootfs/, keyed by a hash of what goes
# into it, so a warm run takes seconds. Idempotent; leaves nothing running or mounted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
    echo "check-deploy: $*" >&2
    exit 1
}
step() {
    printf '\n\033[1m==> %s\033[0m\n' "$*"
}

cluster=0
if [[ "${1:-}" == --cluster ]]; then
    cluster=1
    shift
fi
binary=${1:-${UNIMODEL_BIN:-}}
if [[ -z "$binary" ]]; then
    binary=target/release/unimodel
    [[ -x "$binary" ]] || binary=target/debug/unimodel
fi
[[ -x "$binary" ]] || die "no unimodel binary at '$binary': run cargo build, or pass its path"
binary=$(realpath "$binary")
((EUID == 0)) || die "needs root (mmdebstrap's root mode, chroot, unshare, mount)"
for tool in mmdebstrap unshare chroot setpriv curl python3 mount flock; do
    command -v "$tool" >/dev/null || die "'$tool' not found (Debian: apt-get install mmdebstrap curl)"
done
# Everything below runs in a private mount namespace: the overlay mounted for the run goes
# away with the script, however it ends.
if [[ -z "${UNIMODEL_CHECK_DEPLOY_NS:-}" ]]; then
    flags=()
    ((cluster)) && flags=(--cluster)
    UNIMODEL_CHECK_DEPLOY_NS=1 exec unshare --mount --propagation private \
        bash "$PWD/scripts/check-deploy.sh" "${flags[@]}" "$binary"
fi

suite=$(sed -n 's/^ARG DEBIAN_RELEASE=//p' Dockerfile)
[[ -n "$suite" ]] || die "Dockerfile has no 'ARG DEBIAN_RELEASE=...'"
mapfile -t packages < <(grep -v '^#' deploy/docker/runtime-packages.txt | grep -v '^[[:space:]]*$')

# The Dockerfile's runtime settings, read from the Dockerfile itself so that this check runs
# what the image would run: ENV, USER, CMD and HEALTHCHECK's CMD (exec form).
image_env=() image_user='' image_entrypoint=() image_cmd=() image_health=()
eval "$(python3 - <<'PY'
import json, re, shlex
text = re.sub(r"\\\n", " ", open("Dockerfile").read())
lines = [l.strip() for l in text.splitlines()]
runtime = lines[max(i for i, l in enumerate(lines) if l.startswith("FROM ")):]
env = {}
for l in runtime:
    if l.startswith("ENV "):
        env.update(kv.split("=", 1) for kv in shlex.split(l[4:]))
    elif l.startswith("USER "):
        user = l[5:].strip()
    elif l.startswith("CMD "):
        cmd = json.loads(l[4:])
    elif l.startswith("ENTRYPOINT "):
        entrypoint = json.loads(l[11:])
    elif l.startswith("HEALTHCHECK "):
        health = json.loads(l[l.index(" CMD ") + 5:])
print("image_env=(%s)" % " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()))
print("image_user=%s" % shlex.quote(user))
print("image_entrypoint=(%s)" % " ".join(map(shlex.quote, entrypoint)))
print("image_cmd=(%s)" % " ".join(map(shlex.quote, cmd)))
print("image_health=(%s)" % " ".join(map(shlex.quote, health)))
PY
)"

# --- the root filesystem (cached) --------------------------------------------------------
cache=${UNIMODEL_CACHE_DIR:-$HOME/.cache/unimodel}/deploy-rootfs
key=$(
    {
        echo "$suite"
        cat deploy/docker/runtime-packages.txt deploy/docker/setup-runtime.sh
        find plugins/examples -maxdepth 1 -name '*.py' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
)
lower="$cache/$key"
mkdir -p "$cache"
# One build at a time: a second run waits for the first one's root instead of racing it.
exec 9>"$cache/.lock"
flock 9
if [[ -d "$lower" ]]; then
    step "root filesystem: cached ($lower)"
else
    step "root filesystem: mmdebstrap $suite + ${packages[*]} (cached afterwards)"
    rm -rf "$lower.partial"
    # The hooks run the Dockerfile's setup script inside the new root, as its RUN does ($1 is
    # the root, expanded by mmdebstrap's shell, not this one).
    # shellcheck disable=SC2016
    mmdebstrap --mode=root --format=directory --variant=minbase \
        --include="$(IFS=,; echo "${packages[*]}")" \
        --customize-hook='mkdir -p "$1/tmp/setup"' \
        --customize-hook='copy-in deploy/docker/setup-runtime.sh plugins/examples /tmp/setup' \
        --customize-hook='chroot "$1" sh /tmp/setup/setup-runtime.sh /tmp/setup/examples' \
        --customize-hook='rm -rf "$1/tmp/setup"' \
        "$suite" "$lower.partial"
    # Renamed into place only when complete, so an interrupted run leaves no bad cache.
    mv "$lower.partial" "$lower"
    # Older root filesystems (other keys) are of no further use.
    find "$cache" -mindepth 1 -maxdepth 1 ! -name "$key" ! -name .lock -exec rm -rf {} +
fi
du -sh "$lower" | cut -f1
flock -u 9

# --- the image: the root filesystem plus the Dockerfile's later COPYs ---------------------
# An overlay on the cached root: the run writes only to a scratch upper layer, so the cache
# stays as built. The overlay lives in this script's own mount namespace (see the top), so
# nothing stays mounted whatever way the script ends.
work=$(mktemp -d /tmp/unimodel-check-deploy.XXXXXX)
# Every process started (an image's `unshare`, or a host service like etcd), by pid.
started=()
cleanup() {
    local pid inner
    for pid in "${started[@]}"; do
        # Killing a PID namespace's PID 1 (a server) takes every process in it (its workers).
        if inner=$(pid1_of "$pid"); then kill -KILL "$inner" 2>/dev/null || true; fi
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    umount -R "$work/root" 2>/dev/null || true
    rm -rf "$work"
}
# The pid (in this namespace) of the image's PID 1 under the `unshare` whose pid is given:
# unshare forks one child, which execs chroot, setpriv, env and finally the server.
pid1_of() {
    local children
    children=$(cat /proc/"$1"/task/*/children 2>/dev/null) || return 1
    [[ -n "$children" ]] || return 1
    echo "${children%% *}"
}
trap cleanup EXIT
root="$work/root"
mkdir "$root" "$work/upper" "$work/overlay-work"
mount -t overlay overlay \
    -o "lowerdir=$lower,upperdir=$work/upper,workdir=$work/overlay-work" "$root"
# The binary (a debug build is some 300 MB) is bind-mounted read-only rather than copied.
install -m 0755 /dev/null "$root/usr/local/bin/unimodel"
mount --bind -o ro "$binary" "$root/usr/local/bin/unimodel"
install -D -m 0644 deploy/docker/healthcheck.py deploy/docker/seed-examples.sh \
    -t "$root/usr/local/lib/unimodel/"

if [[ "${CHECK_DEPLOY_PODMAN:-auto}" != 0 ]] && command -v podman >/dev/null; then
    step "podman import"
    changes=(--change "USER $image_user" --change "ENTRYPOINT $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${image_entrypoint[@]}")"
        --change "CMD $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${image_cmd[@]}")")
    for kv in "${image_env[@]}"; do changes+=(--change "ENV $kv"); done
    tar -C "$root" -cf "$work/image.tar" .
    podman import "${changes[@]}" "$work/image.tar" localhost/unimodel:check-deploy
    podman image inspect localhost/unimodel:check-deploy --format '{{.Config.User}} {{.Config.Entrypoint}} {{.Config.Cmd}}'
    # Removed again, so repeated runs leave no dangling images. (`podman run` itself cannot be
    # checked in this sandbox: crun may not set the container's rlimits.)
    podman image rm localhost/unimodel:check-deploy >/dev/null
    rm -f "$work/image.tar"
else
    step "podman import: skipped (no podman here, or CHECK_DEPLOY_PODMAN=0)"
fi

# Runs a command in the image as its user, with its environment only.
in_image() {
    chroot "$root" setpriv --reuid "${image_user%%:*}" --regid "${image_user##*:}" --clear-groups \
        env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/unimodel "${image_env[@]}" "$@"
}

# The /models volume, seeded with the examples as the chart's init container does (as the
# image's user), twice: the second run must keep what the first copied, and succeed.
step "seed /models with the examples (chart init container, compose models-init)"
in_image sh /usr/local/lib/unimodel/seed-examples.sh /models
touch "$root/models/doubler/kept"
again=$(in_image sh /usr/local/lib/unimodel/seed-examples.sh /models)
grep -q 'doubler is already in /models' <<<"$again" ||
    die "seeding again did not keep the doubler already there: $again"
[[ -f "$root/models/doubler/kept" ]] || die "seeding again replaced the doubler already there"

# As the Helm chart runs it: a read-only root file system, writable only where the chart
# mounts emptyDir volumes (the SDK cache, /tmp, the home directory; keep the two lists alike).
for dir in /var/cache/unimodel /home/unimodel /tmp; do
    mode=0755
    [[ "$dir" == /tmp ]] && mode=1777
    mount -t tmpfs -o "mode=$mode,uid=${image_user%%:*},gid=${image_user##*:}" tmpfs "$root$dir"
done
mount -o remount,ro "$root"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
http_port=$(free_port)
grpc_port=$(free_port)
metrics_port=$(free_port)

# The image's command with this machine's free ports, listening on loopback only (the check
# shares the host's network).
args=()
skip_value=0
for arg in "${image_cmd[@]}"; do
    if ((skip_value)); then
        skip_value=0
        continue
    fi
    case "$arg" in
    --host | --port | --grpc-port | --metrics-port) skip_value=1 ;;
    *) args+=("$arg") ;;
    esac
done
args+=(--host 127.0.0.1 --port "$http_port" --grpc-port "$grpc_port" --metrics-port "$metrics_port")


# start_in_image NAME ARGS...: `unimodel ARGS` as a container runtime runs the image, in new
# mount and PID namespaces (the server is PID 1 with its own /proc), chrooted, as the image's
# user with its environment only; logs to $work/NAME.log. Sets $started_pid.
start_in_image() {
    local name=$1
    shift
    unshare --mount --pid --fork --mount-proc="$root/proc" \
        chroot "$root" setpriv --reuid "${image_user%%:*}" --regid "${image_user##*:}" \
        --clear-groups env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/unimodel \
        "${image_env[@]}" "${image_entrypoint[@]}" "$@" >"$work/$name.log" 2>&1 &
    started_pid=$!
    started+=("$started_pid")
}

# wait_for NAME PID URL: until URL answers 2xx (deadline 120 s), or NAME's process exits.
wait_for() {
    local deadline=$((SECONDS + 120))
    until curl -fsS -o /dev/null "$3" 2>/dev/null; do
        if ! kill -0 "$2" 2>/dev/null; then
            cat "$work/$1.log" >&2
            die "$1 exited before $3 answered"
        fi
        if ((SECONDS > deadline)); then
            cat "$work/$1.log" >&2
            die "$1: no answer from $3 within 120 s"
        fi
        sleep 0.2
    done
}

# stop_in_image PID: SIGTERM to the server itself; unshare exits with its status.
stop_in_image() {
    local inner status=0
    inner=$(pid1_of "$1") || die "no server under pid $1"
    kill -TERM "$inner"
    wait "$1" || status=$?
    local pid left=()
    for pid in "${started[@]}"; do
        [[ "$pid" == "$1" ]] || left+=("$pid")
    done
    started=("${left[@]}")
    return "$status"
}

# infer_doubler URL: one inference of the doubler at URL, checked.
infer_doubler() {
    local answer
    answer=$(curl -fsS "$1/v2/models/doubler/infer" \
        -H 'Content-Type: application/json' \
        -d '{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}') ||
        die "inference at $1 failed"
    python3 - "$answer" <<'PY' || die "unexpected inference answer from $1: $answer"
import json, sys
(y,) = json.loads(sys.argv[1])["outputs"]
assert y["name"] == "y" and y["data"] == [2.0, 4.0, 6.0], y
PY
    echo "inference at $1: $answer"
}

step "run: ${image_entrypoint[*]} ${args[*]}"
start_in_image server "${args[@]}"
server_pid=$started_pid
base="http://127.0.0.1:$http_port"
wait_for server "$server_pid" "$base/v2/health/ready"
echo "ready: $base/v2/health/ready"

# The server (PID 1 inside) runs as the image's user, not root.
inner_pid=$(pid1_of "$server_pid")
server_uid=$(awk '/^Uid:/ {print $2}' "/proc/$inner_pid/status")
[[ "$server_uid" == "${image_user%%:*}" ]] || die "the server runs as uid $server_uid, not ${image_user%%:*}"
echo "server uid: $server_uid"

infer_doubler "$base"

metrics=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics")
grep -q '^unimodel_queue_depth{' <<<"$metrics" ||
    die "no unimodel_queue_depth on the metrics port"
echo "metrics port: unimodel_queue_depth present"

step "HEALTHCHECK: ${image_health[*]}"
in_image UNIMODEL_HEALTH_PORT="$http_port" "${image_health[@]}" || die "the HEALTHCHECK failed on a ready server"
echo "passes while serving"

stop_in_image "$server_pid" || die "the server exited with status $? on SIGTERM"
if in_image UNIMODEL_HEALTH_PORT="$http_port" "${image_health[@]}" 2>/dev/null; then
    die "the HEALTHCHECK passed with no server"
fi
echo "fails once stopped"

if ((cluster)); then
    step "cluster: deploy/compose.yaml's node1, node2 and gateway in the image, on host etcd and NATS"
    for tool in etcd nats-server; do
        command -v "$tool" >/dev/null ||
            die "'$tool' not found (Debian: apt-get install etcd-server nats-server)"
    done
    # compose's commands, verbatim but for the network: every service's ports are mapped to
    # free loopback ports, and URLs naming a service (http://etcd:2379, http://node1:8000)
    # to 127.0.0.1 and that service's mapped port, as compose's network would resolve them.
    # (Set by the eval below; the *_args arrays are read through a nameref.)
    # shellcheck disable=SC2034
    node1_args=() node2_args=() gateway_args=()
    gateway_url='' gateway_pid=''
    etcd_port='' etcd_peer_port='' nats_port=''
    eval "$(python3 - <<'PY'
import re, shlex, socket
import yaml
services = yaml.safe_load(open("deploy/compose.yaml"))["services"]
ports = {}
def mapped(service, port):
    if (service, int(port)) not in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[(service, int(port))] = s.getsockname()[1]
    return ports[(service, int(port))]
def url(m):
    return f"{m[1]}://127.0.0.1:{mapped(m[2], m[3])}" if m[2] in services else m[0]
def rewrite(service, arg):
    flag, _, value = arg.partition("=")
    if flag in ("--port", "--grpc-port", "--metrics-port"):
        return f"{flag}={mapped(service, value)}"
    if flag == "--host":
        return "--host=127.0.0.1"
    return re.sub(r"(\w+)://([a-z][\w-]*):(\d+)", url, arg)
for name in ("node1", "node2", "gateway"):
    args = [rewrite(name, a) for a in services[name]["command"]]
    print(f"{name}_args=({' '.join(map(shlex.quote, args))})")
    port = next(a.split("=", 1)[1] for a in args if a.startswith("--port="))
    print(f"{name}_url=http://127.0.0.1:{port}")
print(f"etcd_port={mapped('etcd', 2379)}")
print(f"nats_port={mapped('nats', 4222)}")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(f"etcd_peer_port={s.getsockname()[1]}")
PY
)"
    etcd_url="http://127.0.0.1:$etcd_port"
    etcd --name check --data-dir "$work/etcd" --log-level warn \
        --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
        --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
        --initial-cluster "check=http://127.0.0.1:$etcd_peer_port" >"$work/etcd.log" 2>&1 &
    started+=("$!")
    wait_for etcd "$!" "$etcd_url/health"
    nats-server -a 127.0.0.1 -p "$nats_port" >"$work/nats.log" 2>&1 &
    started+=("$!")

    # All three share the image's root (one read-only root; scratch space on tmpfs).
    for name in node1 node2 gateway; do
        declare -n service_args="${name}_args"
        echo "$name: unimodel ${service_args[*]}"
        start_in_image "$name" "${service_args[@]}"
        unset -n service_args
        declare -g "${name}_pid=$started_pid"
    done
    for name in node1 node2; do
        pid_var="${name}_pid" url_var="${name}_url"
        wait_for "$name" "${!pid_var}" "${!url_var}/v2/health/ready"
    done
    # The gateway routes once it has seen the nodes' models READY in etcd.
    deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null "$gateway_url/v2/models/doubler/ready" 2>/dev/null; do
        kill -0 "$gateway_pid" 2>/dev/null || { cat "$work/gateway.log" >&2; die "the gateway exited"; }
        if ((SECONDS > deadline)); then
            cat "$work/gateway.log" >&2
            die "the gateway did not find the doubler ready within 60 s"
        fi
        sleep 0.2
    done
    infer_doubler "$gateway_url"
    # Both nodes registered in etcd under the names compose gives them.
    nodes=$(curl -fsS "$etcd_url/v3/kv/range" -d "$(python3 -c '
import base64, json
key, end = b"/unimodel/nodes/", b"/unimodel/nodes0"
print(json.dumps({"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode(), "keys_only": True}))')")
    registered=$(python3 -c '
import base64, json, sys
print(" ".join(sorted(base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1] for kv in json.loads(sys.argv[1]).get("kvs", []))))' "$nodes")
    [[ "$registered" == "node1 node2" ]] || die "nodes registered in etcd: '$registered', expected node1 node2"
    echo "registered in etcd: $registered"
    step "HEALTHCHECK of the gateway"
    in_image UNIMODEL_HEALTH_PORT="${gateway_url##*:}" "${image_health[@]}" ||
        die "the HEALTHCHECK failed on the gateway"
    echo "passes"
    for name in gateway node1 node2; do
        pid_var="${name}_pid"
        stop_in_image "${!pid_var}" || die "$name exited with status $? on SIGTERM"
    done
    echo "cluster stopped cleanly"
fi

step "image check passed"
