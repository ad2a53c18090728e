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
# usage: scripts/check-deploy.sh [BINARY]
#   BINARY: the unimodel binary to put in the image [default: $UNIMODEL_BIN, else
#   target/release/unimodel if built, else target/debug/unimodel]. It must run on Debian
#   bookworm's glibc (any binary built on bookworm does).
#
# Needs root (mmdebstrap's root mode, chroot, unshare), mmdebstrap (Debian package), curl and
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

binary=${1:-${UNIMODEL_BIN:-}}
if [[ -z "$binary" ]]; then
    binary=target/release/unimodel
    [[ -x "$binary" ]] || binary=target/debug/unimodel
fi
[[ -x "$binary" ]] || die "no unimodel binary at '$binary': run cargo build, or pass its path"
binary=$(realpath "$binary")
((EUID == 0)) || die "needs root (mmdebstrap's root mode, chroot, unshare, mount)"
for tool in mmdebstrap unshare chroot setpriv curl python3 mount; do
    command -v "$tool" >/dev/null || die "'$tool' not found (Debian: apt-get install mmdebstrap curl)"
done
# Everything below runs in a private mount namespace: the overlay mounted for the run goes
# away with the script, however it ends.
if [[ -z "${UNIMODEL_CHECK_DEPLOY_NS:-}" ]]; then
    UNIMODEL_CHECK_DEPLOY_NS=1 exec unshare --mount --propagation private bash "$PWD/scripts/check-deploy.sh" "$binary"
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
if [[ -d "$lower" ]]; then
    step "root filesystem: cached ($lower)"
else
    step "root filesystem: mmdebstrap $suite + ${packages[*]} (cached afterwards)"
    mkdir -p "$cache"
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
    find "$cache" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
fi
du -sh "$lower" | cut -f1

# --- the image: the root filesystem plus the Dockerfile's later COPYs ---------------------
# An overlay on the cached root: the run writes only to a scratch upper layer, so the cache
# stays as built. The overlay lives in this script's own mount namespace (see the top), so
# nothing stays mounted whatever way the script ends.
work=$(mktemp -d /tmp/unimodel-check-deploy.XXXXXX)
server_pid=
inner_pid=
cleanup() {
    # Killing the namespace's PID 1 (the server) takes every process in it (its workers).
    if [[ -n "$inner_pid" ]]; then kill -KILL "$inner_pid" 2>/dev/null || true; fi
    if [[ -n "$server_pid" ]]; then
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    umount -R "$work/root" 2>/dev/null || true
    rm -rf "$work"
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


step "run: ${image_entrypoint[*]} ${args[*]}"
log="$work/server.log"
# New mount and PID namespaces: the server is PID 1 with its own /proc, as in a container.
unshare --mount --pid --fork --mount-proc="$root/proc" \
    chroot "$root" setpriv --reuid "${image_user%%:*}" --regid "${image_user##*:}" --clear-groups \
    env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/unimodel "${image_env[@]}" \
    "${image_entrypoint[@]}" "${args[@]}" >"$log" 2>&1 &
server_pid=$!

base="http://127.0.0.1:$http_port"
deadline=$((SECONDS + 120))
until curl -fsS -o /dev/null "$base/v2/health/ready" 2>/dev/null; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        cat "$log" >&2
        die "the server exited before it was ready"
    fi
    if ((SECONDS > deadline)); then
        cat "$log" >&2
        die "not ready within 120 s"
    fi
    sleep 0.2
done
echo "ready: $base/v2/health/ready"

# The server (PID 1 inside) runs as the image's user, not root.
read -r inner_pid server_uid < <(python3 - "$server_pid" <<'PY'
import pathlib, sys
def children(pid):
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        yield from (int(c) for c in (task / "children").read_text().split())
# unshare -> (forked) chroot exec'd into setpriv -> env -> unimodel: the same process.
(pid,) = children(int(sys.argv[1]))
print(pid, pathlib.Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
PY
)
[[ "$server_uid" == "${image_user%%:*}" ]] || die "the server runs as uid $server_uid, not ${image_user%%:*}"
echo "server uid: $server_uid"

answer=$(curl -fsS "$base/v2/models/doubler/infer" \
    -H 'Content-Type: application/json' \
    -d '{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}')
python3 - "$answer" <<'PY' || die "unexpected inference answer: $answer"
import json, sys
(y,) = json.loads(sys.argv[1])["outputs"]
assert y["name"] == "y" and y["data"] == [2.0, 4.0, 6.0], y
PY
echo "inference: $answer"

metrics=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics")
grep -q '^unimodel_queue_depth{' <<<"$metrics" ||
    die "no unimodel_queue_depth on the metrics port"
echo "metrics port: unimodel_queue_depth present"

step "HEALTHCHECK: ${image_health[*]}"
in_image UNIMODEL_HEALTH_PORT="$http_port" "${image_health[@]}" || die "the HEALTHCHECK failed on a ready server"
echo "passes while serving"

# SIGTERM to the server itself; unshare exits with its status.
kill -TERM "$inner_pid"
wait "$server_pid" || die "the server exited with status $? on SIGTERM"
server_pid=
inner_pid=
if in_image UNIMODEL_HEALTH_PORT="$http_port" "${image_health[@]}" 2>/dev/null; then
    die "the HEALTHCHECK passed with no server"
fi
echo "fails once stopped"

step "image check passed"
