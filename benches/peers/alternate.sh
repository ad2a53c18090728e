#!/usr/bin/env bash
# Old and new UniModel binaries alternating in one run (issue 10's no-regression check),
# with stock Triton measured in the same run for the c=1 target:
#
#   benches/peers/alternate.sh OLD_BIN NEW_BIN [ROUNDS]     # default 2 rounds, --quick steps
#
# Each round runs `run.sh --quick` for the old binary, then the new one (PEERS=unimodel), then
# stock Triton once; `alternate.py` prints c=64 matmul req/s and c=1 p50 per binary and round,
# and the new/old and new/Triton ratios, with the load average before each run (the machine
# may be shared: read ratios from rounds at a similar load). Results under $RESULTS (default
# benches/peers/results/alternate).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OLD=${1:?usage: $0 OLD_BIN NEW_BIN [ROUNDS]}
NEW=${2:?usage: $0 OLD_BIN NEW_BIN [ROUNDS]}
ROUNDS=${3:-2}
OUT=${RESULTS:-$HERE/results/alternate}
[[ -x $OLD && -x $NEW ]] || {
    echo "$0: OLD_BIN and NEW_BIN must be executables" >&2
    exit 2
}
rm -rf "$OUT"
mkdir -p "$OUT"
for round in $(seq 1 "$ROUNDS"); do
    for tag in old new; do
        bin=$OLD
        [[ $tag == new ]] && bin=$NEW
        echo "round $round: $tag" >&2
        cut -d' ' -f1 /proc/loadavg >"$OUT/$round-$tag.load"
        PEERS=unimodel UNIMODEL_BIN=$bin RESULTS="$OUT/$round-$tag" "$HERE/run.sh" --quick >"$OUT/$round-$tag.log" 2>&1
    done
    echo "round $round: triton" >&2
    cut -d' ' -f1 /proc/loadavg >"$OUT/$round-triton.load"
    PEERS=triton TRITON_DELAYS=0 RESULTS="$OUT/$round-triton" "$HERE/run.sh" --quick >"$OUT/$round-triton.log" 2>&1
done
python3 "$HERE/alternate.py" "$OUT"
