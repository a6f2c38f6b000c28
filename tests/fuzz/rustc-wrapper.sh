#!/usr/bin/env bash
# rustc for the fuzz build (run.sh sets it as RUSTC_WRAPPER): the crates of the curve and
# hash arithmetic are built without libFuzzer's coverage instrumentation. Their code is
# branch-free arithmetic that says nothing about the input, and its comparison callbacks
# were half of every gateway input's time.
set -euo pipefail
rustc="$1"; shift
crate=""
previous=""
for arg in "$@"; do
    [ "$previous" = "--crate-name" ] && crate="$arg"
    previous="$arg"
done
case "$crate" in
    curve25519_dalek|ed25519_dalek|x25519_dalek|blake2|chacha20poly1305|chacha20|poly1305|\
    sha2|ring|subtle|digest|block_buffer|aead|cipher|universal_hash|hmac)
        args=()
        for arg in "$@"; do
            case "$arg" in
                -Cpasses=sancov-module|-Cllvm-args=-sanitizer-coverage-*) ;;
                *) args+=("$arg") ;;
            esac
        done
        exec "$rustc" "${args[@]}"
        ;;
esac
exec "$rustc" "$@"
