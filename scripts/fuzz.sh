#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a short while (60 s each by default; pass
# another number of seconds as $1). Fails on the first crash, leaving its input under
# fuzz/artifacts/TARGET/ (reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET FILE).
#
# cargo-fuzz needs nightly-only flags (sanitizers, coverage instrumentation); this project
# builds with the machine's stable toolchain, and RUSTC_BOOTSTRAP=1 lets stable rustc take
# them. The seed corpus in fuzz/corpus/ stays untouched: new inputs go to fuzz/corpus-run/.
#
# The instrumented release build of the whole core takes about 19 minutes on 2 cores, so its
# target dir lives in the cache (~/.cache/unimodel/fuzz-target, or under $UNIMODEL_CACHE), not
# in the clone: a fresh clone rebuilds only what changed. Cargo's own fingerprints decide
# what is stale, so the cache needs no key.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${1:-60}
export RUSTC_BOOTSTRAP=1
target_dir=${UNIMODEL_CACHE:-$HOME/.cache/unimodel}/fuzz-target
mkdir -p "$target_dir"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (once)"
    cargo install --locked cargo-fuzz@0.13.2
fi

cd fuzz
targets=$(cargo fuzz list)
cargo fuzz build --target-dir "$target_dir"
for t in $targets; do
    echo "fuzzing $t for ${seconds}s"
    mkdir -p "corpus-run/$t"
    cargo fuzz run --target-dir "$target_dir" "$t" "corpus-run/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 2>&1 |
        grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|==[0-9]+==|SUMMARY|Test unit written)' || true
    # grep hides libFuzzer's progress lines; the exit status that matters is cargo fuzz's.
    if [[ ${PIPESTATUS[0]} -ne 0 ]]; then
        echo "fuzz target $t failed; input saved under fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
echo "fuzzing passed: $targets"
