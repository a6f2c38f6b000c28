#!/usr/bin/env bash
# The userspace WireGuard anchors of the data-plane benchmark (issue 17), run by hand, never by
# CI: wireguard-go and boringtun's own device (boringtun-cli) between the same three network
# namespaces, beside the direct path, with iperf3:
#
#   client (10.201.1.1) --veth-- gateway (10.201.1.2 | 10.201.2.1) --veth-- host (10.201.2.2)
#
# Direct: the client routes the host's network through the gateway's namespace. Through a
# tunnel: the client's tunnel address is 10.202.0.1, the gateway's 10.202.0.2, and the client
# routes the host (10.201.2.2/32) into the tunnel; the gateway forwards to the host, and the
# host's answers come back to 10.202.0.0/24 through the gateway (no NAT).
#
# Each measurement: iperf3 TCP with one stream and with four, and UDP at a fixed rate with the
# loss iperf3 reports; for the tunnels, CPU seconds (user + system, both ends) per gigabyte
# carried. fz's own tunnel joins this run next (`fz` column), on the same topology.
#
# Usage: sudo tests/benches/tunnel_anchors.sh [seconds per test, default 10]
# Needs: iperf3, wireguard-go, wg (wireguard-tools), python3; boringtun-cli on PATH or in
# $BORINGTUN_CLI (`cargo install boringtun-cli --locked`).
set -euo pipefail

SECONDS_PER_TEST="${1:-10}"
UDP_RATE="${UDP_RATE:-500M}"
BORINGTUN_CLI="${BORINGTUN_CLI:-$(command -v boringtun-cli || true)}"
PREFIX="fzbench-$$"
CLIENT="$PREFIX-client"
GATEWAY="$PREFIX-gw"
HOST="$PREFIX-host"
WORK="$(mktemp -d)"
# wireguard-go refuses to run where the kernel has WireGuard unless told this.
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1

for tool in iperf3 wireguard-go wg python3 ip; do
    command -v "$tool" >/dev/null || { echo "tunnel_anchors: $tool is missing" >&2; exit 2; }
done
[ -x "$BORINGTUN_CLI" ] || { echo "tunnel_anchors: boringtun-cli is missing (set BORINGTUN_CLI)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "tunnel_anchors: needs root (network namespaces)" >&2; exit 2; }

in_ns() { local ns="$1"; shift; ip netns exec "$ns" "$@"; }

cleanup() {
    set +e
    jobs -p | xargs -r kill 2>/dev/null
    wait 2>/dev/null
    for ns in "$CLIENT" "$GATEWAY" "$HOST"; do ip netns del "$ns" 2>/dev/null; done
    rm -f /var/run/wireguard/fzb[cg][12].sock
    rm -rf "$WORK"
}
trap cleanup EXIT

# ---- topology ----
for ns in "$CLIENT" "$GATEWAY" "$HOST"; do
    ip netns add "$ns"
    in_ns "$ns" ip link set lo up
done
ip link add c0 netns "$CLIENT" type veth peer name g0 netns "$GATEWAY"
ip link add g1 netns "$GATEWAY" type veth peer name h0 netns "$HOST"
in_ns "$CLIENT" ip addr add 10.201.1.1/24 dev c0
in_ns "$GATEWAY" ip addr add 10.201.1.2/24 dev g0
in_ns "$GATEWAY" ip addr add 10.201.2.1/24 dev g1
in_ns "$HOST" ip addr add 10.201.2.2/24 dev h0
in_ns "$CLIENT" ip link set c0 up
in_ns "$GATEWAY" ip link set g0 up
in_ns "$GATEWAY" ip link set g1 up
in_ns "$HOST" ip link set h0 up
in_ns "$GATEWAY" sysctl -q -w net.ipv4.ip_forward=1
in_ns "$HOST" ip route add default via 10.201.2.1
in_ns "$HOST" iperf3 --server --daemon --pidfile "$WORK/iperf3.pid" >/dev/null

# ---- measuring ----

# CPU seconds (user + system) of the processes whose ids are given.
cpu_seconds() {
    python3 - "$@" <<'EOF'
import os, sys
ticks = os.sysconf("SC_CLK_TCK")
total = 0
for pid in sys.argv[1:]:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])
print(total / ticks)
EOF
}

# iperf3 from the client to the host: "bits/s bytes" (TCP, `streams` streams) or
# "bits/s bytes loss%" (UDP at UDP_RATE).
iperf() {
    local mode="$1" streams="$2"
    local args=(--client 10.201.2.2 --time "$SECONDS_PER_TEST" --json --parallel "$streams")
    [ "$mode" = udp ] && args+=(--udp --bitrate "$UDP_RATE" --length 1300)
    in_ns "$CLIENT" iperf3 "${args[@]}" | python3 -c '
import json, sys
end = json.load(sys.stdin)["end"]
if sys.argv[1] == "udp":
    s = end["sum"]
    print(s["bits_per_second"], s["bytes"], s["lost_percent"])
else:
    s = end["sum_received"]
    print(s["bits_per_second"], s["bytes"])' "$mode"
}

declare -A RESULT

# Runs the three tests; `label` names the row, pids (if any) are the tunnel's processes.
measure() {
    local label="$1"; shift
    local pids=("$@") before after one four udp
    for test in tcp1 tcp4 udp; do
        [ ${#pids[@]} -gt 0 ] && before=$(cpu_seconds "${pids[@]}")
        case "$test" in
            tcp1) one=$(iperf tcp 1); RESULT[$label,tcp1]="$one" ;;
            tcp4) four=$(iperf tcp 4); RESULT[$label,tcp4]="$four" ;;
            udp) udp=$(iperf udp 1); RESULT[$label,udp]="$udp" ;;
        esac
        if [ ${#pids[@]} -gt 0 ]; then
            after=$(cpu_seconds "${pids[@]}")
            RESULT[$label,$test,cpu]=$(python3 -c "print($after - $before)")
        fi
    done
}

# A WireGuard device of `kind` (go, boringtun) in the client and gateway namespaces, up and
# configured; their process ids in TUNNEL_PIDS. (Not printed for a `$(...)`: that subshell's
# exit would run the cleanup trap.)
tunnel_up() {
    local kind="$1" client_if="fzbc$2" gateway_if="fzbg$2"
    local client_key gateway_key
    client_key=$(wg genkey); gateway_key=$(wg genkey)
    for side in client gateway; do
        local ns="$CLIENT" ifname="$client_if"
        [ "$side" = gateway ] && ns="$GATEWAY" ifname="$gateway_if"
        # Both daemons keep their control socket in this one directory, whatever the
        # namespace; one left by a killed run would stop the next.
        rm -f "/var/run/wireguard/$ifname.sock"
        case "$kind" in
            go) ip netns exec "$ns" wireguard-go --foreground "$ifname" \
                >"$WORK/$ifname.log" 2>&1 & ;;
            boringtun) ip netns exec "$ns" "$BORINGTUN_CLI" --foreground \
                --disable-drop-privileges "$ifname" >"$WORK/$ifname.log" 2>&1 & ;;
        esac
        echo $! >"$WORK/$ifname.pid"
    done
    for ifname in "$client_if" "$gateway_if"; do
        local ns="$CLIENT"
        [ "$ifname" = "$gateway_if" ] && ns="$GATEWAY"
        # A poll: the device appears when the daemon made it; nothing says so otherwise.
        for _ in $(seq 100); do in_ns "$ns" ip link show "$ifname" >/dev/null 2>&1 && break; sleep 0.05; done
        in_ns "$ns" ip link show "$ifname" >/dev/null 2>&1 || {
            echo "tunnel_anchors: $ifname did not come up:" >&2
            cat "$WORK/$ifname.log" >&2
            exit 1
        }
    done
    in_ns "$GATEWAY" wg set "$gateway_if" listen-port 51820 private-key <(echo "$gateway_key") \
        peer "$(echo "$client_key" | wg pubkey)" allowed-ips 10.202.0.1/32
    in_ns "$CLIENT" wg set "$client_if" private-key <(echo "$client_key") \
        peer "$(echo "$gateway_key" | wg pubkey)" endpoint 10.201.1.2:51820 \
        allowed-ips 10.202.0.0/24,10.201.2.2/32
    in_ns "$CLIENT" ip addr add 10.202.0.1/24 dev "$client_if"
    in_ns "$GATEWAY" ip addr add 10.202.0.2/24 dev "$gateway_if"
    in_ns "$CLIENT" ip link set "$client_if" mtu 1420 up
    in_ns "$GATEWAY" ip link set "$gateway_if" mtu 1420 up
    in_ns "$CLIENT" ip route replace 10.201.2.2/32 dev "$client_if"
    TUNNEL_PIDS=("$(cat "$WORK/$client_if.pid")" "$(cat "$WORK/$gateway_if.pid")")
}

# The processes `ip netns exec` started are the devices themselves (it execs).
tunnel_down() {
    local index="$1"
    for ifname in "fzbc$index" "fzbg$index"; do
        kill "$(cat "$WORK/$ifname.pid")" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    in_ns "$CLIENT" ip route del 10.201.2.2/32 2>/dev/null || true
}

in_ns "$CLIENT" ip route add 10.201.2.0/24 via 10.201.1.2
echo "direct ..." >&2
measure direct
echo "wireguard-go ..." >&2
tunnel_up go 1
measure wireguard-go "${TUNNEL_PIDS[@]}"
tunnel_down 1
echo "boringtun-cli ..." >&2
tunnel_up boringtun 2
measure boringtun-cli "${TUNNEL_PIDS[@]}"
tunnel_down 2

# ---- report ----
python3 - "$SECONDS_PER_TEST" "$UDP_RATE" <<EOF
import sys
seconds, rate = sys.argv[1], sys.argv[2]
rows = {
$(for label in direct wireguard-go boringtun-cli; do
    for test in tcp1 tcp4 udp; do
        echo "    ('$label', '$test'): '${RESULT[$label,$test]}',"
        echo "    ('$label', '$test', 'cpu'): '${RESULT[$label,$test,cpu]:-}',"
    done
done)
}
print(f"{seconds} s per test; UDP at {rate}bit/s, 1300-byte datagrams")
print(f"{'path':<15}{'TCP 1 stream':>16}{'TCP 4 streams':>16}{'UDP':>16}{'UDP loss':>10}{'CPU s/GB (TCP 1)':>18}")
for label in ("direct", "wireguard-go", "boringtun-cli"):
    one = rows[(label, "tcp1")].split()
    four = rows[(label, "tcp4")].split()
    udp = rows[(label, "udp")].split()
    cpu = rows[(label, "tcp1", "cpu")]
    per_gb = f"{float(cpu) / (int(one[1]) / 1e9):.2f}" if cpu else "-"
    print(f"{label:<15}{float(one[0])/1e9:>12.2f} Gb/s{float(four[0])/1e9:>11.2f} Gb/s"
          f"{float(udp[0])/1e9:>11.2f} Gb/s{float(udp[2]):>9.2f}%{per_gb:>18}")
EOF
