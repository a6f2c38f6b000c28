#!/usr/bin/env bash
# The data-plane benchmark of issue 17, run by hand, never by CI: fz's own tunnel beside its
# userspace WireGuard anchors, wireguard-go and boringtun's own device (boringtun-cli), and the
# direct path, between the same three network namespaces, with iperf3:
#
#   client (10.201.1.1) --veth-- gateway (10.201.1.2 | 10.201.2.1) --veth-- host (10.201.2.2)
#
# Direct: the client routes the host's network through the gateway's namespace. Through an
# anchor: the client's tunnel address is 10.202.0.1, the gateway's 10.202.0.2, and the client
# routes the host (10.201.2.2/32) into the tunnel; the gateway forwards to the host, and the
# host's answers come back to 10.202.0.0/24 through the gateway (no NAT).
#
# Through fz: fz-portal runs in the gateway's namespace on 10.201.1.2:8080 (the client reaches
# it over its veth); fz-gateway listens on 10.201.1.2:51820 for site `bench`, and fz-client,
# granted resource 10.201.2.0/24 (all ports) by policy, routes that network into its TUN
# device from its tunnel address (100.64.0.0/11); the gateway masquerades toward the host, as
# it does toward any resource. The portal takes no part once the grant is in force.
#
# Each measurement: iperf3 TCP with one stream and with four, and UDP sent at a fixed rate: the
# rate the host received, the loss iperf3 reports and the datagrams the host received out of
# order within their flow (the receiver's count, from iperf3's server); for the tunnels, CPU
# seconds (user + system, both ends: for fz the two agents, not the portal) per gigabyte
# carried. Then each tunnel's ratios to the direct path, and fz's to each anchor.
#
# With CLIENTS=N, issue 17's many-client goal too (aggregate TCP throughput of 8 concurrent
# clients at least 0.9x a single client's, through one gateway): after the fz row, its client
# leaves and N more fz-clients join the same gateway and portal, each in a namespace of its own
#
#   client i (10.201.3.i) --veth-- bridge fzbr in the gateway's namespace (10.201.3.254)
#
# reaching the portal and fz-gateway at 10.201.1.2 through that bridge (a host route: nothing
# but fz's own route leads them to the host's network), each with its own token (client
# bench-client-<i>, the same user, so the same policy), key, state, resolver file and TUN
# device fzbm<i>. Once every one has its grant, all N run one TCP stream each at once for the
# test's duration, client i to its own iperf3 server on the host (port 5300+i). Reported
# after the table: each client's rate, their sum, the sum over the fz row's single-client
# TCP 1-stream rate from the same run, how evenly the clients shared, and CPU seconds (the
# gateway and all N clients) per gigabyte beside the single client's, split into the
# gateway's and the clients' (on one machine the N clients and their iperf3s share its cores
# with the gateway), with the share of one core the gateway's event loop kept busy. The
# direct path and the anchors never touch 10.201.3.0/24.
#
# Usage: sudo tests/benches/tunnel_anchors.sh [seconds per test, default 10]
# Environment: ONLY (a comma- or space-separated choice of direct, wireguard-go,
# boringtun-cli and fz; default all four), CLIENTS (unset: no many-client run; else a count
# from 1 to 200, and ONLY must include fz), UDP_RATE (default 500M), BORINGTUN_CLI,
# FZ_BIN_DIR (fz-portal, fz-gateway and fz-client; default target/release of the repository
# this script is in: `cargo build --release -p fz-portal -p fz-gateway -p fz-client`).
# Needs: iperf3, python3, ip; for the anchors wireguard-go and wg (wireguard-tools), and
# boringtun-cli on PATH or in $BORINGTUN_CLI (`cargo install boringtun-cli --locked`); for fz
# nft (the gateway's masquerade).
set -euo pipefail

SECONDS_PER_TEST="${1:-10}"
UDP_RATE="${UDP_RATE:-500M}"
ONLY="${ONLY:-direct wireguard-go boringtun-cli fz}"
ONLY="${ONLY//,/ }"
CLIENTS="${CLIENTS:-}"
BORINGTUN_CLI="${BORINGTUN_CLI:-$(command -v boringtun-cli || true)}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FZ_BIN_DIR="${FZ_BIN_DIR:-$REPO/target/release}"
PREFIX="fzbench-$$"
CLIENT="$PREFIX-client"
GATEWAY="$PREFIX-gw"
HOST="$PREFIX-host"
# The many-client run's namespaces (none without CLIENTS), named now so that the cleanup
# knows them whatever point a failure reaches.
MANY=()
# wireguard-go refuses to run where the kernel has WireGuard unless told this.
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1

die() { echo "tunnel_anchors: $*" >&2; exit 2; }

for row in $ONLY; do
    case "$row" in
        direct | wireguard-go | boringtun-cli | fz) ;;
        *) die "ONLY names no row \`$row\` (direct, wireguard-go, boringtun-cli, fz)" ;;
    esac
done
chosen() { [[ " $ONLY " == *" $1 "* ]]; }
if [ -n "$CLIENTS" ]; then
    # 200: the clients' addresses 10.201.3.1-200 and iperf3 ports 5301-5500 stay clear of
    # the bridge's 10.201.3.254 and of iperf3's own 5201.
    [[ "$CLIENTS" =~ ^[1-9][0-9]*$ ]] && [ "$CLIENTS" -le 200 ] ||
        die "CLIENTS is a count of clients from 1 to 200, not \`$CLIENTS\`"
    chosen fz || die "CLIENTS measures fz beside its single client: ONLY must include fz"
    for i in $(seq "$CLIENTS"); do MANY+=("$PREFIX-c$i"); done
fi

needed=(iperf3 python3 ip)
if chosen wireguard-go || chosen boringtun-cli; then needed+=(wg); fi
if chosen wireguard-go; then needed+=(wireguard-go); fi
if chosen fz; then needed+=(nft); fi
for tool in "${needed[@]}"; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
if chosen boringtun-cli; then
    [ -x "$BORINGTUN_CLI" ] ||
        die "boringtun-cli is missing (set BORINGTUN_CLI, or leave it out with ONLY)"
fi
if chosen fz; then
    for binary in fz-portal fz-gateway fz-client; do
        [ -x "$FZ_BIN_DIR/$binary" ] || die "$FZ_BIN_DIR/$binary is missing (set FZ_BIN_DIR," \
            "or \`cargo build --release -p fz-portal -p fz-gateway -p fz-client\`)"
    done
fi
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"

in_ns() { local ns="$1"; shift; ip netns exec "$ns" "$@"; }

# Made only now, so that a refusal above leaves nothing behind.
WORK="$(mktemp -d)"

cleanup() {
    set +e
    # SIGTERM: fz-client puts its resolver file back and fz-gateway takes its masquerade out
    # on the way down (the namespaces go anyway).
    jobs -p | xargs -r kill 2>/dev/null
    wait 2>/dev/null
    # The iperf3 server daemonised, so it is no job of ours, and deleting its namespace does
    # not stop it.
    # The many-client run's servers (iperf3-<i>.pid) likewise. SIGTERM only asks; waited
    # for within a bound (no `wait`: not our children), so none outlives the script. A zombie
    # counts as gone: it holds nothing, and only its parent (init) can reap it.
    local daemons=() pidfile pid
    for pidfile in "$WORK"/iperf3*.pid; do
        [ -s "$pidfile" ] && daemons+=("$(cat "$pidfile")")
    done
    if [ ${#daemons[@]} -gt 0 ]; then
        kill "${daemons[@]}" 2>/dev/null
        for _ in $(seq 100); do
            for pid in "${daemons[@]}"; do
                [[ "$(ps -o stat= -p "$pid")" =~ ^[^Z] ]] && break
                pid=
            done
            [ -z "$pid" ] && break
            sleep 0.05
        done
    fi
    for ns in "$CLIENT" "$GATEWAY" "$HOST" "${MANY[@]}"; do ip netns del "$ns" 2>/dev/null; done
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
# --json: the server's own account of each test (the receiver's out-of-order count), which
# the client fetches with --get-server-output; the daemon's output goes nowhere.
in_ns "$HOST" iperf3 --server --daemon --json --pidfile "$WORK/iperf3.pid" >/dev/null

# The many-client run's own network: a bridge in the gateway's namespace, apart from c0/g0, so
# the direct path and the anchors are measured over exactly what they were without CLIENTS.
# The clients get no route to the host's network, only to the portal and gateway's address:
# were fz's routes missing, their tests would fail instead of passing directly.
if [ -n "$CLIENTS" ]; then
    in_ns "$GATEWAY" ip link add fzbr type bridge
    in_ns "$GATEWAY" ip addr add 10.201.3.254/24 dev fzbr
    in_ns "$GATEWAY" ip link set fzbr up
    for i in $(seq "$CLIENTS"); do
        ns="$PREFIX-c$i"
        ip netns add "$ns"
        in_ns "$ns" ip link set lo up
        ip link add c0 netns "$ns" type veth peer name "gm$i" netns "$GATEWAY"
        in_ns "$GATEWAY" ip link set "gm$i" master fzbr up
        in_ns "$ns" ip addr add "10.201.3.$i/24" dev c0
        in_ns "$ns" ip link set c0 up
        in_ns "$ns" ip route add 10.201.1.2/32 via 10.201.3.254
        # One server per client: an iperf3 server runs one test at a time.
        in_ns "$HOST" iperf3 --server --daemon --port $((5300 + i)) \
            --pidfile "$WORK/iperf3-$i.pid" >/dev/null
    done
fi

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
# "bits/s bytes loss% out-of-order datagrams" (UDP at UDP_RATE). For UDP the rate and bytes
# are those the host received, since every path sends at UDP_RATE; the sender never sees
# reordering: the count is the host's, per stream, summed.
iperf() {
    local mode="$1" streams="$2"
    local args=(--client 10.201.2.2 --time "$SECONDS_PER_TEST" --json --parallel "$streams"
        --connect-timeout 10000)
    [ "$mode" = udp ] && args+=(--udp --bitrate "$UDP_RATE" --length 1300 --get-server-output)
    in_ns "$CLIENT" iperf3 "${args[@]}" | python3 -c '
import json, sys
result = json.load(sys.stdin)
end = result["end"]
if sys.argv[1] == "udp":
    s = end["sum_received"]
    host = result["server_output_json"]["end"]
    reordered = sum(stream["udp"]["out_of_order"] for stream in host["streams"])
    print(s["bits_per_second"], s["bytes"], s["lost_percent"], reordered)
else:
    s = end["sum_received"]
    print(s["bits_per_second"], s["bytes"])' "$mode"
}

# One line per test: label, test, CPU seconds of the tunnel's processes (- for none), then
# iperf's figures.
RESULTS="$WORK/results"
: >"$RESULTS"
# And for the tunnels, one line per test: label, test, wall seconds, then the CPU seconds of
# each process in the order given (for fz: client, gateway); the many-client report sets the
# gateway's share of the single client's cost beside its own.
CPU_EACH="$WORK/cpu-each"
: >"$CPU_EACH"

# Runs the three tests; `label` names the row, pids (if any) are the tunnel's processes.
measure() {
    local label="$1"; shift
    local pids=("$@") before after figures cpu started each pid index
    for test in tcp1 tcp4 udp; do
        if [ ${#pids[@]} -gt 0 ]; then
            before=()
            for pid in "${pids[@]}"; do before+=("$(cpu_seconds "$pid")"); done
            started=$(date +%s.%N)
        fi
        case "$test" in
            tcp1) figures=$(iperf tcp 1) ;;
            tcp4) figures=$(iperf tcp 4) ;;
            udp) figures=$(iperf udp 1) ;;
        esac
        cpu=-
        if [ ${#pids[@]} -gt 0 ]; then
            each="$(python3 -c "import time; print(time.time() - $started)")"
            cpu=0
            for index in "${!pids[@]}"; do
                after=$(cpu_seconds "${pids[index]}")
                each+=" $(python3 -c "print($after - ${before[index]})")"
                cpu=$(python3 -c "print($cpu + $after - ${before[index]})")
            done
            echo "$label $test $each" >>"$CPU_EACH"
        fi
        echo "$label $test $cpu $figures" >>"$RESULTS"
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

# ---- fz ----

FZ="$WORK/fz"
FZ_PORTAL_URL="ws://10.201.1.2:8080"
FZ_ACCOUNT=bench
FZ_USER="bench@fz.example"

# Waits until the log `name` (in $FZ) has a line containing `text`, polling within a
# deadline; fails with the log at once if the process `pid` has exited. Every fz process
# says in its log when it is ready, so nothing here waits by sleeping a guessed time.
wait_log() {
    local name="$1" pid="$2" text="$3"
    for _ in $(seq 600); do
        grep -qsF -- "$text" "$FZ/$name.log" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    grep -qsF -- "$text" "$FZ/$name.log" && return 0
    echo "tunnel_anchors: $name never said \`$text\`; its log:" >&2
    cat "$FZ/$name.log" >&2
    exit 1
}

# `fz-portal <args> --config …`: an admin command on the portal's store, beside the running
# portal as an operator would run it.
fz_admin() { "$FZ_BIN_DIR/fz-portal" "$@" --config "$FZ/portal.toml"; }

# The secret `fz-portal token create` prints, into `file`, mode 0600: the agents refuse a
# token file others can read.
token_file() {
    local file="$1"; shift
    local created
    created=$(fz_admin token create --account "$FZ_ACCOUNT" "$@" 2>&1) ||
        die "fz-portal token create $*: $created"
    (umask 077; sed -n 's/^secret //p' <<<"$created" >"$file")
    [ -s "$file" ] || die "no secret in: $created"
}

# The portal, fz-gateway and fz-client as the end-to-end world (tests/src/world.rs) starts
# them, with a policy that grants the client's user the host's network, and the grant in
# force; the agents' process ids in FZ_PIDS. (Not for a `$(...)`, as tunnel_up.)
fz_up() {
    mkdir -p "$FZ/tree"
    cat >"$FZ/tree/bench.fz" <<EOF
site bench
# No ports: every protocol and port, so iperf3's TCP and UDP alike.
resource bench-host { address "10.201.2.0/24"; site bench }
group benchers { members "$FZ_USER" }
allow benchers -> bench-host as bench
EOF
    cat >"$FZ/portal.toml" <<EOF
listen = "10.201.1.2:8080"
allow_plain_http = true
data_dir = "$FZ/portal-data"

[[accounts]]
slug = "$FZ_ACCOUNT"
policy = "$FZ/tree"
EOF
    # The client points this file at its DNS stub and back at exit; it needs a nameserver to
    # pass other names on to, and must never be the host's /etc/resolv.conf.
    echo "nameserver 10.201.1.2" >"$FZ/resolv.conf"
    # The direct route goes: were fz's own missing, the tests must fail, not pass directly.
    in_ns "$CLIENT" ip route del 10.201.2.0/24 via 10.201.1.2 2>/dev/null || true

    RUST_LOG=info ip netns exec "$GATEWAY" "$FZ_BIN_DIR/fz-portal" serve \
        --config "$FZ/portal.toml" >"$FZ/portal.log" 2>&1 &
    local portal=$!
    wait_log portal "$portal" "fz-portal listening on"
    local portal_key
    portal_key=$(fz_admin public-key)
    token_file "$FZ/gateway.token" --gateway bench-gw --site bench
    token_file "$FZ/client.token" --client bench-client --user "$FZ_USER"

    RUST_LOG=info ip netns exec "$GATEWAY" "$FZ_BIN_DIR/fz-gateway" \
        --portal-url "$FZ_PORTAL_URL" --account "$FZ_ACCOUNT" \
        --token-file "$FZ/gateway.token" --portal-key "$portal_key" \
        --listen 10.201.1.2:51820 --tun fzbg3 --key-file "$FZ/gateway.key" \
        --metrics 127.0.0.1:9101 >"$FZ/gateway.log" 2>&1 &
    local gateway=$!
    wait_log gateway "$gateway" "gateway up"
    wait_log gateway "$gateway" "the portal says ready"

    RUST_LOG=info ip netns exec "$CLIENT" "$FZ_BIN_DIR/fz-client" \
        --portal-url "$FZ_PORTAL_URL" --account "$FZ_ACCOUNT" \
        --token-file "$FZ/client.token" --portal-key "$portal_key" \
        --tun fzbc3 --key-file "$FZ/client.key" --state-dir "$FZ/client-state" \
        --resolv-conf "$FZ/resolv.conf" >"$FZ/client.log" 2>&1 &
    local client=$!
    # Said once its routes are in.
    wait_log client "$client" "the portal says ready"
    local route
    route=$(in_ns "$CLIENT" ip route get 10.201.2.2)
    [[ "$route" == *" dev fzbc3 "* ]] || die "fz-client routes 10.201.2.2 elsewhere: $route"

    # The grant: the client asks on the first packet to the resource (and holds it until the
    # tunnel is up), so a short run opens it and is not counted.
    in_ns "$CLIENT" iperf3 --client 10.201.2.2 --time 1 --connect-timeout 10000 >/dev/null || {
        echo "tunnel_anchors: nothing passed through fz; the logs:" >&2
        tail -n 30 "$FZ/client.log" "$FZ/gateway.log" "$FZ/portal.log" >&2
        exit 1
    }
    wait_log client "$client" "access granted"
    wait_log client "$client" "path: direct"
    wait_log gateway "$gateway" "grant in force"
    FZ_PIDS=("$client" "$gateway")
    FZ_PORTAL_PID=$portal
}

# What fz-gateway counted (it publishes its metrics each second): the WireGuard bytes it
# carried, which say the figures above went through fz, and what it dropped and why.
fz_gateway_counts() {
    in_ns "$GATEWAY" python3 -c '
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9101/metrics", timeout=5).read().decode()
lines = [line for line in text.splitlines()
         if line.startswith(("fz_gateway_wireguard_bytes", "fz_gateway_dropped_packets"))
         and not line.endswith(" 0")]
print("fz-gateway counted:", "; ".join(lines) or "nothing")' >&2 || true
}

# The many-client run's clients, as fz_up starts its one, all in their namespaces at once (as
# many devices coming up together would), each waited for in turn until its grant is in force
# at both ends; their process ids in MANY_PIDS. Needs fz_up's portal and gateway running.
fz_many_up() {
    local portal_key i ns route granted grant
    portal_key=$(fz_admin public-key)
    MANY_PIDS=()
    for i in $(seq "$CLIENTS"); do
        ns="$PREFIX-c$i"
        token_file "$FZ/client-$i.token" --client "bench-client-$i" --user "$FZ_USER"
        echo "nameserver 10.201.3.254" >"$FZ/resolv-$i.conf"
        RUST_LOG=info ip netns exec "$ns" "$FZ_BIN_DIR/fz-client" \
            --portal-url "$FZ_PORTAL_URL" --account "$FZ_ACCOUNT" \
            --token-file "$FZ/client-$i.token" --portal-key "$portal_key" \
            --tun "fzbm$i" --key-file "$FZ/client-$i.key" --state-dir "$FZ/client-$i-state" \
            --resolv-conf "$FZ/resolv-$i.conf" >"$FZ/client-$i.log" 2>&1 &
        MANY_PIDS+=("$!")
    done
    for i in $(seq "$CLIENTS"); do
        ns="$PREFIX-c$i"
        local client="${MANY_PIDS[i - 1]}"
        wait_log "client-$i" "$client" "the portal says ready"
        route=$(in_ns "$ns" ip route get 10.201.2.2)
        [[ "$route" == *" dev fzbm$i "* ]] ||
            die "fz-client $i routes 10.201.2.2 elsewhere: $route"
        # The warm-up, as the single client's: its first packet asks for the grant.
        in_ns "$ns" iperf3 --client 10.201.2.2 --port $((5300 + i)) --time 1 \
            --connect-timeout 10000 >/dev/null || {
            echo "tunnel_anchors: nothing passed through fz from client $i; the logs:" >&2
            tail -n 30 "$FZ/client-$i.log" "$FZ/gateway.log" "$FZ/portal.log" >&2
            exit 1
        }
        wait_log "client-$i" "$client" "access granted"
        wait_log "client-$i" "$client" "path: direct"
        # The gateway logs every client's grant alike; the grant's id tells this one's apart.
        granted=$(grep -F -m1 "access granted" "$FZ/client-$i.log")
        grant=$(sed -n 's/.*access granted grant=\([^ ]*\).*/\1/p' <<<"$granted")
        [ -n "$grant" ] || die "no grant id in client $i's line: $granted"
        wait_log gateway "${FZ_PIDS[1]}" "grant in force grant=$grant "
    done
}

# All the many-client run's clients at once, one TCP stream each to its own server, for the
# test's duration: a line per client "many <i> bits/s bytes retransmits" in $RESULTS, and
# "many cpu <seconds> <gateway's seconds> <wall seconds>" (CPU: the gateway and all the
# clients, over the whole run).
measure_many() {
    local pids=() i before after gateway_before gateway_after started wall
    before=$(cpu_seconds "${FZ_PIDS[1]}" "${MANY_PIDS[@]}")
    gateway_before=$(cpu_seconds "${FZ_PIDS[1]}")
    started=$(date +%s.%N)
    # Each iperf3 is started without a subshell of ours (that would run the cleanup trap on
    # its exit) and its JSON kept apart, to be read once all are done.
    for i in $(seq "$CLIENTS"); do
        ip netns exec "$PREFIX-c$i" iperf3 --client 10.201.2.2 --port $((5300 + i)) \
            --time "$SECONDS_PER_TEST" --json --connect-timeout 10000 \
            >"$WORK/many-$i.json" 2>&1 &
        pids+=("$!")
    done
    local failed=()
    for i in $(seq "$CLIENTS"); do
        wait "${pids[i - 1]}" || failed+=("$i")
    done
    gateway_after=$(cpu_seconds "${FZ_PIDS[1]}")
    after=$(cpu_seconds "${FZ_PIDS[1]}" "${MANY_PIDS[@]}")
    wall=$(python3 -c "import time; print(time.time() - $started)")
    if [ ${#failed[@]} -gt 0 ]; then
        for i in "${failed[@]}"; do
            echo "tunnel_anchors: iperf3 from client $i failed:" >&2
            cat "$WORK/many-$i.json" >&2
            tail -n 20 "$FZ/client-$i.log" >&2
        done
        exit 1
    fi
    for i in $(seq "$CLIENTS"); do
        python3 -c '
import json, sys
end = json.load(open(sys.argv[1]))["end"]
print("many", sys.argv[2], end["sum_received"]["bits_per_second"], end["sum_received"]["bytes"],
      end["sum_sent"].get("retransmits", 0))' "$WORK/many-$i.json" "$i" >>"$RESULTS"
    done
    echo "many cpu $(python3 -c "print($after - $before, $gateway_after - $gateway_before)")" \
        "$wall" >>"$RESULTS"
}

# Datagrams the kernel dropped for want of socket receive buffer, summed over the namespaces
# given (/proc/net/snmp is per namespace): loss that fz-gateway's own counters cannot see.
udp_buffer_drops() {
    local ns total=0 drops
    for ns in "$@"; do
        drops=$(in_ns "$ns" awk '$1 == "Udp:" && $2 ~ /^[0-9]/ { print $6 }' /proc/net/snmp)
        total=$((total + drops))
    done
    echo "$total"
}

# SIGTERM to every client of the many-client run; each puts its resolver file back.
fz_many_down() {
    kill "${MANY_PIDS[@]}" 2>/dev/null || true
    for pid in "${MANY_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}

# The single client alone, so that the many-client run has the gateway to itself.
fz_client_down() {
    kill "${FZ_PIDS[0]}" 2>/dev/null || true
    wait "${FZ_PIDS[0]}" 2>/dev/null || true
}

# SIGTERM, client first: it puts the resolver file back; the gateway takes its masquerade out.
fz_down() {
    kill "${FZ_PIDS[0]}" 2>/dev/null || true
    wait "${FZ_PIDS[0]}" 2>/dev/null || true
    kill "${FZ_PIDS[1]}" "$FZ_PORTAL_PID" 2>/dev/null || true
    wait 2>/dev/null || true
}

# ---- the runs ----

in_ns "$CLIENT" ip route add 10.201.2.0/24 via 10.201.1.2
if chosen direct; then
    echo "direct ..." >&2
    measure direct
fi
if chosen wireguard-go; then
    echo "wireguard-go ..." >&2
    tunnel_up go 1
    measure wireguard-go "${TUNNEL_PIDS[@]}"
    tunnel_down 1
fi
if chosen boringtun-cli; then
    echo "boringtun-cli ..." >&2
    tunnel_up boringtun 2
    measure boringtun-cli "${TUNNEL_PIDS[@]}"
    tunnel_down 2
fi
if chosen fz; then
    echo "fz ..." >&2
    fz_up
    measure fz "${FZ_PIDS[@]}"
    fz_gateway_counts
    if [ -n "$CLIENTS" ]; then
        echo "fz, $CLIENTS clients at once ..." >&2
        fz_client_down
        fz_many_up
        gateway_drops=$(udp_buffer_drops "$GATEWAY"); client_drops=$(udp_buffer_drops "${MANY[@]}")
        measure_many
        echo "UDP datagrams dropped for want of receive buffer during the $CLIENTS-client run:" \
            "gateway $(($(udp_buffer_drops "$GATEWAY") - gateway_drops))," \
            "clients $(($(udp_buffer_drops "${MANY[@]}") - client_drops))" >&2
        # The gateway's counters run on from the fz row's: these are both runs together.
        fz_gateway_counts
        fz_many_down
    fi
    fz_down
fi

# ---- report ----
python3 - "$SECONDS_PER_TEST" "$UDP_RATE" "$RESULTS" <<'EOF'
import sys
seconds, rate, results = sys.argv[1], sys.argv[2], sys.argv[3]
rows = {}
for line in open(results):
    label, test, cpu, *figures = line.split()
    if label == "many":
        continue
    rows[label, test] = [float(f) for f in figures]
    rows[label, test, "cpu"] = None if cpu == "-" else float(cpu)
order = [label for label in ("direct", "wireguard-go", "boringtun-cli", "fz")
         if (label, "tcp1") in rows]

def per_gb(label, test):
    cpu = rows[label, test, "cpu"]
    return None if cpu is None else cpu / (rows[label, test][1] / 1e9)

print(f"{seconds} s per test; UDP sent at {rate}bit/s, 1300-byte datagrams;"
      " CPU: both ends of the tunnel")
print(f"{'path':<15}{'TCP 1 stream':>16}{'TCP 4 streams':>16}{'UDP received':>16}{'UDP loss':>10}"
      f"{'UDP reordered':>15}{'CPU s/GB (TCP 1)':>18}{'(TCP 4)':>9}")
for label in order:
    one, four, udp = rows[label, "tcp1"], rows[label, "tcp4"], rows[label, "udp"]
    cpu1, cpu4 = per_gb(label, "tcp1"), per_gb(label, "tcp4")
    print(f"{label:<15}{one[0]/1e9:>11.2f} Gb/s{four[0]/1e9:>11.2f} Gb/s"
          f"{udp[0]/1e9:>11.2f} Gb/s{udp[2]:>9.2f}%{int(udp[3]):>15d}"
          f"{'-' if cpu1 is None else f'{cpu1:.2f}':>18}"
          f"{'-' if cpu4 is None else f'{cpu4:.2f}':>9}")

# Throughput ratios are higher-is-better; CPU per GB lower-is-better.
pairs = [(a, b) for a in order for b in order
         if a != b and a != "direct" and (b == "direct" or a == "fz")]
if pairs:
    print()
    print(f"{'ratio':<28}{'TCP 1 stream':>14}{'TCP 4 streams':>15}{'UDP received':>14}"
          f"{'CPU s/GB (TCP 1)':>18}{'(TCP 4)':>9}")
for a, b in pairs:
    def ratio(test):
        return f"{rows[a, test][0] / rows[b, test][0]:.2f}x"
    def cpu_ratio(test):
        x, y = per_gb(a, test), per_gb(b, test)
        return "-" if x is None or y is None else f"{x / y:.2f}x"
    print(f"{a + ' / ' + b:<28}{ratio('tcp1'):>14}{ratio('tcp4'):>15}{ratio('udp'):>14}"
          f"{cpu_ratio('tcp1'):>18}{cpu_ratio('tcp4'):>9}")
EOF

if [ -n "$CLIENTS" ]; then
    python3 - "$SECONDS_PER_TEST" "$CLIENTS" "$RESULTS" "$CPU_EACH" <<'EOF'
import sys
seconds, count, results, cpu_each = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
clients, cpu, single = {}, None, None
for line in open(cpu_each):
    label, test, wall, *each = line.split()
    if (label, test) == ("fz", "tcp1"):
        single_wall, single_gateway = float(wall), float(each[1])  # fz_up: client, gateway
for line in open(results):
    label, test, *rest = line.split()
    if label == "many" and test == "cpu":
        cpu, gateway, wall = (float(f) for f in rest)
    elif label == "many":
        clients[int(test)] = [float(f) for f in rest]
    elif (label, test) == ("fz", "tcp1"):
        single = [float(f) for f in rest]  # CPU seconds, bits/s, bytes
rates = [clients[i][0] for i in sorted(clients)]
total_rate = sum(rates)
total_bytes = sum(clients[i][1] for i in clients)
mean = total_rate / len(rates)
# Jain's fairness index: 1 when all clients got the same rate, 1/N when one got everything.
jain = total_rate ** 2 / (len(rates) * sum(r * r for r in rates))

print()
print(f"fz, {count} clients at once through one gateway: TCP, 1 stream each, {seconds} s;"
      " CPU: the gateway and all the clients")
print(f"{'client':<18}{'TCP 1 stream':>16}{'share':>8}{'retransmits':>13}")
for i in sorted(clients):
    rate, _, retransmits = clients[i]
    print(f"{'bench-client-' + str(i):<18}{rate/1e9:>11.2f} Gb/s{rate/total_rate:>7.1%}"
          f"{int(retransmits):>13d}")
print(f"fairness: slowest / fastest {min(rates)/max(rates):.2f},"
      f" slowest / mean {min(rates)/mean:.2f}, Jain's index {jain:.3f}")

# CPU per gigabyte: all the agents, the gateway alone, the clients alone; and the share of
# one core the gateway used over the test's wall time (its event loop is one thread).
many = [total_rate, cpu, gateway, cpu - gateway, total_bytes, wall]
one = [single[1], single[0], single_gateway, single[0] - single_gateway, single[2], single_wall]
def figures(row):
    rate, every, gw, cl, carried, wall = row
    gb = carried / 1e9
    return [rate / 1e9, every / gb, gw / gb, cl / gb, gw / wall]

print()
print(f"{'':<28}{'TCP 1 stream':>16}{'CPU s/GB':>10}{'gateway':>9}{'clients':>9}"
      f"{'gateway busy':>14}")
for name, row in ((f"aggregate of {count}", many), ("single client (fz row)", one)):
    rate, every, gw, cl, busy = figures(row)
    print(f"{name:<28}{rate:>11.2f} Gb/s{every:>10.2f}{gw:>9.2f}{cl:>9.2f}{busy:>13.0%}")
ratios = [a / b for a, b in zip(figures(many), figures(one))]
print(f"{'aggregate / single':<28}{ratios[0]:>15.2f}x"
      + "".join(f"{r:>{w - 1}.2f}x" for r, w in zip(ratios[1:], (10, 9, 9, 14))))
print(f"issue 17's goal, aggregate at least 0.90x single: {'met' if ratios[0] >= 0.9 else 'NOT met'}")
EOF
fi
