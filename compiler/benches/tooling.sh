#!/usr/bin/env bash
# The editor and CI tooling of `fzc` on the generated 100k-rule tree and on the example tree, run
# by hand (never from CI). Issue 18's goals: `fzc fmt --check` under 1 s on the 100k tree; the
# language server's diagnostics for an edit under 100 ms on the example tree and under 1 s on
# the 100k tree; `fzc diff` of two revisions that differ in 100 rules under 3 s and 1 GiB. Builds `fzc`, `gen_tree` and `lsp_latency` in release mode, generates the tree
# (RULES rules, default 100,000), then times, RUNS times each (default 5):
#   1. `fzc fmt --check` on the tree as generated;
#   2. `fzc fmt` on a copy whose every line has extra spaces, so that every file is rewritten;
#   3. `fzc check` on the same tree, beside them, as the anchor of what reading the tree costs;
#   4. `fzc lsp`: an edit to one rules file, answered with its diagnostics (EDITS edits,
#      default 20, half adding an error and half taking it away), on policies/ and on the
#      100k tree;
#   5. `fzc diff` between the tree and a copy that differs in 100 rules (the third
#      `allow team-N -> ...` of each of 100 rules files now names team-0001), and between the
#      tree and itself; the goal is under 3 s and 1 GiB.
# Prints each run's wall time and peak RSS, and the number of files and lines.
# Usage: compiler/benches/tooling.sh   (env: RULES, RUNS, EDITS)
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
rules=${RULES:-100000}
runs=${RUNS:-5}
edits=${EDITS:-20}
target=${CARGO_TARGET_DIR:-$root/target}
fzc=$target/release/fzc

cargo build --release --quiet -p fz-compiler --bin fzc --example gen_tree --example lsp_latency

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree=$work/tree
"$target/release/examples/gen_tree" "$tree" "$rules"
files=$(find "$tree" -name '*.fz' | wc -l)
lines=$(find "$tree" -name '*.fz' -exec cat {} + | wc -l)
echo "tree: $rules rules, $files .fz files, $lines lines"

timed() {
    local label=$1
    shift
    /usr/bin/time -v "$@" >"$work/out" 2>"$work/time" || true
    local wall rss_kib
    wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$work/time")
    rss_kib=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$work/time")
    echo "$label: wall $wall (m:ss), peak RSS $((rss_kib / 1024)) MiB, $(wc -l <"$work/out") lines printed"
}

echo "== fzc fmt --check (tree as generated), $runs runs"
for run in $(seq "$runs"); do timed "run $run" "$fzc" fmt --check "$tree"; done

echo "== fzc fmt (every line disturbed, so every file is rewritten), $runs runs"
for run in $(seq "$runs"); do
    rm -rf "$work/messy"
    cp -r "$tree" "$work/messy"
    find "$work/messy" -name '*.fz' -exec sed -i 's/ -> /  ->   /; s/^/ /' {} +
    timed "run $run" "$fzc" fmt "$work/messy"
done

echo "== fzc check (the same tree, for comparison), $runs runs"
for run in $(seq "$runs"); do timed "run $run" "$fzc" check "$tree"; done

echo "== fzc lsp: diagnostics for an edit, example tree (policies/)"
"$target/release/examples/lsp_latency" "$fzc" policies access/engineering.fz "$edits"
rules_file=$(cd "$tree" && find . -name '*.fz' -path '*rules*' | sort | head -n 1)
rules_file=${rules_file:-$(cd "$tree" && find . -name '*.fz' | sort | head -n 1)}
echo "== fzc lsp: diagnostics for an edit, the $rules-rule tree ($rules_file)"
"$target/release/examples/lsp_latency" "$fzc" "$tree" "${rules_file#./}" "$edits"

echo "== fzc diff: the tree against a copy with 100 rules changed, $runs runs"
cp -r "$tree" "$work/changed"
for file in $(find "$work/changed" -name '*.fz' -path '*rules*' | sort | head -n 100); do
    awk '/^allow team-[0-9]+ -> / && ++seen == 3 { sub(/team-[0-9]+/, "team-0001") } { print }' \
        "$file" >"$file.new"
    mv "$file.new" "$file"
done
echo "changed lines: $(diff -r "$tree" "$work/changed" | grep -c '^>' || true)"
for run in $(seq "$runs"); do timed "run $run" "$fzc" diff "$tree" "$work/changed"; done
echo "summary: $(tail -n 1 "$work/out")"
echo "== fzc diff: the tree against itself, $runs runs"
for run in $(seq "$runs"); do timed "run $run" "$fzc" diff "$tree" "$tree"; done
