#!/usr/bin/env bash
# Compile-time benchmark, run by hand (never from CI):
#   1. builds `fzc` and the `gen_tree` example in release mode;
#   2. generates a tree of RULES rules (default 100,000: 10,000 resources, 1,000 groups) and
#      checks that `fzc check` accepts it;
#   3. runs `fzc compile` on it RUNS times (default 3) under `/usr/bin/time -v`, printing wall
#      time and peak RSS of each run (goal: under 2 s and 1 GiB);
#   4. times `fzc check CHECK_DIR` (default policies/; goal: under 100 ms) with hyperfine if
#      installed, else a plain loop.
# Usage: compiler/benches/compile.sh [CHECK_DIR]   (env: RULES, RUNS)
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
rules=${RULES:-100000}
runs=${RUNS:-3}
check_dir=${1:-policies}
target=${CARGO_TARGET_DIR:-$root/target}
fzc=$target/release/fzc

cargo build --release --quiet -p fz-compiler --bin fzc --example gen_tree

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree=$work/tree
"$target/release/examples/gen_tree" "$tree" "$rules"
"$fzc" check "$tree" | tail -n 1

echo "== fzc compile ($rules rules), $runs runs"
for run in $(seq "$runs"); do
    /usr/bin/time -v "$fzc" compile "$tree" -o "$work/bundle.json" >"$work/out" 2>"$work/time"
    wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$work/time")
    rss_kib=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$work/time")
    echo "run $run: wall $wall (m:ss), peak RSS $((rss_kib / 1024)) MiB; $(cat "$work/out")"
done

echo "== fzc check $check_dir"
if ! find "$check_dir" -name '*.fz' 2>/dev/null | grep -q .; then
    echo "no *.fz files under $check_dir: pass a tree to time" >&2
    exit 2
fi
"$fzc" check "$check_dir" | tail -n 1
if command -v hyperfine >/dev/null; then
    hyperfine --warmup 3 --runs 50 -N "$fzc check $check_dir"
else
    loops=50
    start=$(date +%s%N)
    for _ in $(seq "$loops"); do "$fzc" check "$check_dir" >/dev/null; done
    end=$(date +%s%N)
    echo "mean over $loops runs: $(((end - start) / loops / 1000)) us"
fi
