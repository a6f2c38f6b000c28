#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer (coverage instrumentation on stable Rust) and runs
# them: first every committed input (the seed corpus and the regression inputs), then new
# inputs for a while. Fails if any target crashes, and says where the input was saved.
#
#   tests/fuzz/run.sh [TARGET...] [--seconds N] [--seed N] [--merge] [--build-only]
#
# No TARGET: every target. --seconds: how long each target fuzzes (default 60, or
# FZ_FUZZ_SECONDS; 0 only replays the committed inputs). --seed: libFuzzer's random seed
# (default: a new one each run; CI fixes it). --merge: afterwards, add to the committed corpus
# the inputs that found new coverage (review before committing; keep it small).
#
# The build goes to target/fuzz (or $CARGO_TARGET_DIR/fuzz); what the runs find stays there
# too: target/fuzz/work/TARGET/corpus grows from run to run, and crashing inputs land in
# target/fuzz/work/TARGET/crashes/.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
all=(proto_decode grant grant_gateway dns_stub packet gateway_path fz_file cedar_file)

targets=()
seconds="${FZ_FUZZ_SECONDS:-60}"
seed=""
merge=false
build_only=false
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --merge) merge=true; shift ;;
        --build-only) build_only=true; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
        *)
            if [[ ! " ${all[*]} " == *" $1 "* ]]; then
                echo "run.sh: no target \`$1\`; the targets are: ${all[*]}" >&2
                exit 2
            fi
            targets+=("$1"); shift ;;
    esac
done
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || { [ -n "$seed" ] && ! [[ "$seed" =~ ^[0-9]+$ ]]; }; then
    echo "run.sh: --seconds and --seed take whole numbers" >&2
    exit 2
fi

# libFuzzer's runtime is C++, built by libfuzzer-sys: it needs a C++ compiler.
if ! command -v c++ >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "== installing g++ (libFuzzer's runtime is C++)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    else
        echo "run.sh: libFuzzer needs a C++ compiler (g++); install it and run again" >&2
        exit 1
    fi
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/fuzz"
# What cargo fuzz passes, minus the sanitizer (which needs nightly): libFuzzer's coverage
# feedback (8-bit counters and the PC table, edges, comparisons) and `cfg(fuzzing)`. With an
# explicit --target these flags reach only what runs in the targets, never build scripts or
# proc macros. Debug assertions and overflow checks are on in the profile (Cargo.toml).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# ...except the crates of the curve and hash arithmetic (rustc-wrapper.sh says why).
export RUSTC_WRAPPER="$here/rustc-wrapper.sh"

echo "== building fuzz targets (${targets[*]}) into $CARGO_TARGET_DIR"
bins=()
for target in "${targets[@]}"; do bins+=(--bin "$target"); done
cargo build --quiet --locked --release --manifest-path "$here/Cargo.toml" \
    --target "$host" --features libfuzzer "${bins[@]}"
$build_only && exit 0

# Dictionaries: the words of each input's language, for libFuzzer's mutations.
dictionary() {
    case "$1" in
        proto_decode|grant) echo "$here/dict/json.dict" ;;
        fz_file) echo "$here/dict/fz.dict" ;;
        cedar_file) echo "$here/dict/cedar.dict" ;;
    esac
}

failed=()
for target in "${targets[@]}"; do
    binary="$CARGO_TARGET_DIR/$host/release/$target"
    work="$CARGO_TARGET_DIR/work/$target"
    mkdir -p "$work/corpus" "$work/crashes" "$here/corpus/$target"
    corpora=("$work/corpus" "$here/corpus/$target")
    [ -d "$here/regressions/$target" ] && corpora+=("$here/regressions/$target")
    options=(
        -artifact_prefix="$work/crashes/"
        -max_total_time="$seconds"
        # An input slower than this is a finding (a hang), not a flake of a busy machine.
        -timeout=30
        -rss_limit_mb=4096
        -print_final_stats=1
    )
    [ "$seconds" -eq 0 ] && options+=(-runs=0)
    [ -n "$seed" ] && options+=(-seed="$seed")
    dict="$(dictionary "$target")"
    [ -n "$dict" ] && options+=(-dict="$dict")
    log="$work/last-run.log"
    echo "== fuzzing $target for ${seconds}s (log: $log)"
    before="$(ls -1 "$work/crashes" | wc -l)"
    started=$SECONDS
    if "$binary" "${options[@]}" "${corpora[@]}" >"$log" 2>&1; then
        execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
        coverage="$(grep -Eo 'cov: [0-9]+' "$log" | tail -1)"
        echo "   ok: ${execs:-?} inputs in $((SECONDS - started))s, ${coverage:-cov: ?} edges"
    else
        failed+=("$target")
        echo "   FAILED: $target crashed; the end of its log:"
        grep -v '^#[0-9]' "$log" | tail -40 | sed 's/^/   | /'
        crash="$(ls -1t "$work/crashes" | head -1)"
        if [ "$(ls -1 "$work/crashes" | wc -l)" -gt "$before" ] && [ -n "$crash" ]; then
            echo "   the input was saved as $work/crashes/$crash"
            echo "   replay it:  $binary $work/crashes/$crash"
            echo "   keep it:    cp $work/crashes/$crash $here/regressions/$target/"
        else
            echo "   a committed input crashed it (see the log above for which)"
        fi
    fi
    if $merge && [ "$seconds" -gt 0 ]; then
        # A smallest set of inputs that reaches every edge (hit counts aside), so that the
        # committed corpus stays small.
        "$binary" -set_cover_merge=1 -use_counters=0 "$here/corpus/$target" "$work/corpus" \
            >"$work/merge.log" 2>&1
        echo "   merged new coverage into $here/corpus/$target"
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
