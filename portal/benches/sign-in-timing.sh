#!/usr/bin/env bash
# The email sign-in's promise of "the same answer and timing for an unknown address as for a
# known one", measured: a real `fz-portal serve` (built by cargo, in a temporary home on the
# example tree), N known addresses (users with a service-account token each) and N unknown
# ones, each asked for a code once from a sign-in of its own (a different source address per
# request through a trusted proxy header, so no rate limit gets in the way), alternating, and
# curl's total time of each form post. Run by hand, never by CI:
#
#   portal/benches/sign-in-timing.sh [N=40] [--release]
#
# Prints, for known and unknown addresses, the status codes and the median, p10 and p90 times.
set -euo pipefail
cd "$(dirname "$0")/../.."
count="${1:-40}"
profile=debug
if [ "${2:-}" = "--release" ]; then profile=release; cargo build -q --release -p fz-portal; else cargo build -q -p fz-portal; fi
portal="$PWD/target/$profile/fz-portal"
home="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null; rm -rf "$home"' EXIT
cp -r policies "$home/"
port=$((20000 + RANDOM % 20000))
cat > "$home/portal.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "data"
trusted_proxy_header = "x-forwarded-for"
[[accounts]]
slug = "default"
policy = "policies"
TOML
cd "$home"
# The admin commands make no keys or store of their own: `init` does.
"$portal" --config portal.toml init >/dev/null
for i in $(seq 1 "$count"); do
    "$portal" --config portal.toml token create --account default --client "d$i" --user "known$i@acme.example" >/dev/null 2>&1
done
"$portal" --config portal.toml serve >/dev/null 2>&1 &
pid=$!
until curl -s -o /dev/null "http://127.0.0.1:$port/healthz"; do sleep 0.1; done

# One timed post of the email form for address $1, from source $2, in a sign-in of its own.
ask() {
    local jar nonce state csrf
    jar="$(mktemp)"
    nonce="$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=' | head -c 43)"
    state="$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=' | head -c 43)"
    curl -s -o /dev/null -c "$jar" -b "$jar" -H "X-Forwarded-For: $2" \
        "http://127.0.0.1:$port/default?as=client&nonce=$nonce&state=$state&callback=http%3A%2F%2F127.0.0.1%3A9%2Fcallback"
    csrf="$(curl -s -c "$jar" -b "$jar" -H "X-Forwarded-For: $2" "http://127.0.0.1:$port/default" \
        | grep -o 'name="csrf" value="[^"]*"' | head -1 | sed 's/.*value="//;s/"//')"
    curl -s -o /dev/null -w '%{http_code} %{time_total}\n' -c "$jar" -b "$jar" -H "X-Forwarded-For: $2" \
        --data-urlencode "csrf=$csrf" --data-urlencode "email=$1" "http://127.0.0.1:$port/default/sign-in/email"
    rm -f "$jar"
}
: > known.txt
: > unknown.txt
for i in $(seq 1 "$count"); do
    ask "known$i@acme.example" "10.1.$((i / 250)).$((i % 250))" >> known.txt
    ask "unknown$i@acme.example" "10.2.$((i / 250)).$((i % 250))" >> unknown.txt
done
for kind in known unknown; do
    codes="$(cut -d' ' -f1 "$kind.txt" | sort | uniq -c | awk '{printf "%s x%s ", $2, $1}')"
    cut -d' ' -f2 "$kind.txt" | sort -n | awk -v kind="$kind" -v codes="$codes" '{a[NR]=$1} END {
        printf "%-8s %s median %.1f ms  p10 %.1f ms  p90 %.1f ms  (n=%d)\n", kind, codes,
            a[int((NR+1)/2)]*1000, a[int(NR*0.1)+1]*1000, a[int(NR*0.9)]*1000, NR }'
done
echo "mails written (known addresses only): $(ls data/mail | wc -l)"
