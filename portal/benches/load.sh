#!/usr/bin/env bash
# Load benchmark of the portal over real WebSockets, run by hand (never from CI); what it does
# and its options are in portal/benches/load.rs (`--help`-like usage on a bad option).
#   portal/benches/load.sh [OPTIONS]            server and load generator share both cores
#   PINNED=1 portal/benches/load.sh [OPTIONS]   then again with the server on CPU 0 and the
#                                               generator on CPU 1 (`--pin`, needs taskset)
# 10,000 clients hold about 10,100 sockets in each process: the bench raises its soft limit
# of open files to the hard one, so make the hard one large enough first.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo bench -p fz-portal --bench load -- "$@"
if [ "${PINNED:-0}" = 1 ]; then
    cargo bench -p fz-portal --bench load -- --pin "$@"
fi
