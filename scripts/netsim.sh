#!/usr/bin/env bash
# Simulated hosts on this machine: N network namespaces on a private test subnet, joined by a bridge, so that an
# MPI job can run one rank per "host" and its traffic really crosses a (virtual) link. Needs root and iproute2.
#
#   scripts/netsim.sh up N [--rate 100mbit] [--rate-of I=10mbit ...]
#                                             namespaces spmd-h0..h{N-1} (10.213.0.1..N/24 on their eth0), a
#                                             bridge spmd-br0, optional tbf bandwidth cap on both directions of
#                                             every host's link (--rate-of: host I's own cap, e.g. one machine on
#                                             slow Wi-Fi); writes hostfiles/netsim.txt and a launcher wrapper
#   scripts/netsim.sh run -- MPIEXEC-ARGS     mpiexec over those hosts, e.g.
#                                             scripts/netsim.sh run -- -n 3 python -m spmd.run --model m.gguf
#                                             (without -n: one rank per host)
#   scripts/netsim.sh launch -- LAUNCH-ARGS  python -m spmd.launch over those hosts, supervised, e.g.
#                                             scripts/netsim.sh launch -- -- --model m.gguf --ratios 1:1:1
#                                             (the hostfile is given; each host answers on port 22 as sshd would)
#   scripts/netsim.sh status                  hosts, caps, link byte counters, and a check that an MPI job's
#                                             bytes do cross the links (not shared memory)
#   scripts/netsim.sh down                    removes everything (also after a partial `up`)
#
# How a job spans the namespaces: mpiexec itself runs inside spmd-h0 (rank 0's host); MPICH's hydra starts the
# other hosts' proxies through `-launcher ssh -launcher-exec WRAPPER`, where WRAPPER maps a host address to
# `ip netns exec spmd-hI` (and a UTS namespace whose hostname is spmd-hI, so each rank reports its own host).
# UCX_TLS=tcp,self and UCX_NET_DEVICES=eth0 keep MPICH's UCX from using shared memory between the namespaces.
# The host's own addresses and routes are left alone: the subnet exists only inside the namespaces.
#
# Latency: this kernel has no netem, so the links add no delay of their own. For a simulated one-way link latency,
# set SPMD_TEST_LINK_DELAY_MS (see spmd/comm.py): a test-only sleep per communication step, not a network delay.
set -Eeuo pipefail  # -E: the ERR trap of a failed `up` also fires inside functions

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=spmd
BRIDGE=${PREFIX}-br0
SUBNET=10.213.0           # /24, addresses .1 .. .N
STATE=/run/${PREFIX}-netsim
HOSTFILE=$ROOT/hostfiles/netsim.txt
WRAPPER=$STATE/launch-host
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
MPIEXEC=${MPIEXEC:-$ROOT/.venv/bin/mpiexec}
MAX_HOSTS=64

PORT22='
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 22))
s.listen(64)
while True:
    s.accept()[0].close()
'

die() { echo "netsim: $*" >&2; exit 1; }

need_root_and_ip() {
    [ "$(id -u)" = 0 ] || die "must run as root (it creates network namespaces); try: sudo $0 $*"
    command -v ip >/dev/null || die "'ip' not found: install iproute2 (apt-get install -y iproute2)"
}

namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}-h[0-9]+$" | sort -V || true; }
host_links() { ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' \
               | grep -E "^${PREFIX}-v[0-9]+$" | sort -V || true; }

cmd_down() {
    need_root_and_ip
    local ns link
    [ -f "$STATE/port22.pids" ] && xargs -r kill <"$STATE/port22.pids" 2>/dev/null || true
    for ns in $(namespaces); do ip netns del "$ns"; done      # takes the veth ends inside with it
    for link in $(host_links); do ip link del "$link" 2>/dev/null || true; done
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
    rm -rf "$STATE"
    rm -f "$HOSTFILE"
    echo "netsim: down (namespaces, links, bridge, $HOSTFILE and $STATE removed)"
}

write_wrapper() {
    # hydra's ssh launcher calls: WRAPPER [ssh options] HOST COMMAND...; the command is meant for a remote shell
    cat >"$WRAPPER" <<EOF
#!/bin/sh
# Written by scripts/netsim.sh up: hydra's "ssh" into a simulated host = enter its namespaces.
while [ \$# -gt 0 ]; do case "\$1" in -[opliF]) shift 2 ;; -*) shift ;; *) break ;; esac; done
host=\$1; shift
case "\$host" in
    ${SUBNET}.*) i=\$(( \${host##*.} - 1 )) ;;
    ${PREFIX}-h*) i=\${host#${PREFIX}-h} ;;
    *) echo "netsim launcher: \$host is not a simulated host" >&2; exit 255 ;;
esac
# its network namespace, and a UTS namespace named after it (so MPI_Get_processor_name tells the hosts apart)
exec ip netns exec ${PREFIX}-h\$i unshare --uts \\
    /bin/sh -c 'hostname "\$1" && exec /bin/sh -c "\$2"' sh ${PREFIX}-h\$i "\$*"
EOF
    chmod +x "$WRAPPER"
}

cap_link() {  # tbf on one interface (inside namespace $2 if given): a full-duplex link is capped both ways
    local dev=$1 ns=${2:-} rate=$3
    ${ns:+ip netns exec "$ns"} tc qdisc replace dev "$dev" root tbf rate "$rate" burst 32kbit latency 400ms
}

cmd_up() {
    need_root_and_ip
    local n=${1:-} rate="" i ns own="" r
    local -A rate_of=()
    [ -n "$n" ] && shift || die "usage: $0 up N [--rate 100mbit] [--rate-of I=10mbit ...]"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le $MAX_HOSTS ] || die "N must be 1..$MAX_HOSTS (got '$n')"
    while [ $# -gt 0 ]; do
        case "$1" in
            --rate) rate=${2:-}; [ -n "$rate" ] || die "--rate needs a value such as 100mbit"; shift 2 ;;
            --rate=*) rate=${1#--rate=}; shift ;;
            --rate-of) own=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
            --rate-of=*) own=${1#--rate-of=}; shift ;;
            *) die "unknown argument '$1' (usage: $0 up N [--rate 100mbit] [--rate-of I=10mbit ...])" ;;
        esac
        if [ -n "$own" ]; then
            [[ "$own" =~ ^([0-9]+)=([0-9]+(\.[0-9]+)?[kmgt]?(bit|bps))$ ]] && [ "${BASH_REMATCH[1]}" -lt "$n" ] \
                || die "--rate-of '$own': expected I=RATE with I a host 0..$((n - 1)), such as 2=10mbit"
            rate_of[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
            own=""
        fi
    done
    if [ -n "$(namespaces)" ] || [ -n "$(host_links)" ] || ip link show "$BRIDGE" >/dev/null 2>&1; then
        die "already up ($(namespaces | tr '\n' ' ')): run '$0 down' first"
    fi
    [ -z "$rate" ] || [[ "$rate" =~ ^[0-9]+(\.[0-9]+)?[kmgt]?(bit|bps)$ ]] \
        || die "--rate '$rate': expected a rate such as 100mbit, 1gbit or 500kbit"
    command -v tc >/dev/null || [ -z "$rate${rate_of[*]}" ] || die "'tc' not found (needed for --rate): install iproute2"
    trap 'echo "netsim: up failed; cleaning up" >&2; cmd_down >/dev/null 2>&1 || true' ERR
    mkdir -p "$STATE" "$(dirname "$HOSTFILE")"
    ip link add "$BRIDGE" type bridge
    ip link set "$BRIDGE" up
    for i in $(seq 0 $((n - 1))); do
        ns=${PREFIX}-h$i
        ip netns add "$ns"
        ip link add "${PREFIX}-v$i" type veth peer name eth0 netns "$ns"
        ip link set "${PREFIX}-v$i" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        # an sshd stand-in on port 22 (spmd.launch checks each host there, its supervisor probes it)
        ip netns exec "$ns" "$PYTHON" -c "$PORT22" >/dev/null 2>&1 &
        echo $! >>"$STATE/port22.pids"
        r=${rate_of[$i]:-$rate}
        if [ -n "$r" ]; then
            cap_link eth0 "$ns" "$r"                 # host i -> bridge (its upload)
            cap_link "${PREFIX}-v$i" "" "$r"         # bridge -> host i (its download)
        fi
    done
    write_wrapper
    own=""
    for i in "${!rate_of[@]}"; do own="$own $i=${rate_of[$i]}"; done
    {
        echo "# netsim: written by scripts/netsim.sh up $n${rate:+ --rate $rate}${own:+ --rate-of${own}}; removed by 'down'."
        echo "# MPICH format HOST:SLOTS; run jobs on these hosts with: scripts/netsim.sh run -- MPIEXEC-ARGS"
        for i in $(seq 1 "$n"); do echo "$SUBNET.$i:1"; done
    } >"$HOSTFILE"
    echo "n=$n rate=${rate:-none} rate_of='${own# }'" >"$STATE/config"
    trap - ERR
    if command -v ping >/dev/null; then  # the bridge forwards once its ports are up; `status` checks MPI itself
        for i in $(seq 2 "$n"); do
            ip netns exec ${PREFIX}-h0 ping -c 1 -W 2 "$SUBNET.$i" >/dev/null 2>&1 \
                || echo "netsim: warning: $SUBNET.$i does not answer ping from ${PREFIX}-h0" >&2
        done
    fi
    echo "netsim: up: $n hosts ${PREFIX}-h0..$((n - 1)) at $SUBNET.1..$n on $BRIDGE, link cap ${rate:-none};" \
         "hostfile $HOSTFILE"
}

mpi_env() {  # the environment that keeps MPICH on TCP over eth0
    echo UCX_TLS=tcp,self UCX_NET_DEVICES=eth0 MPIR_CVAR_NOLOCAL=1
}

cmd_launch() {  # spmd.launch in rank 0's host, its mpirun going through the wrapper
    need_root_and_ip
    [ -f "$STATE/config" ] && [ -x "$WRAPPER" ] || die "not up: run '$0 up N' first"
    [ "${1:-}" = "--" ] && shift
    exec ip netns exec ${PREFIX}-h0 unshare --uts /bin/sh -c 'hostname "$0" && exec "$@"' ${PREFIX}-h0 \
        env $(mpi_env) PATH="$(dirname "$MPIEXEC"):$PATH" HYDRA_LAUNCHER=ssh HYDRA_LAUNCHER_EXEC="$WRAPPER" \
        HYDRA_IFACE=eth0 "$PYTHON" -m spmd.launch -f "$HOSTFILE" "$@"
}

cmd_run() {
    need_root_and_ip
    [ -f "$STATE/config" ] && [ -x "$WRAPPER" ] || die "not up: run '$0 up N' first"
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || die "usage: $0 run -- [-n N] PROGRAM ARGS..."
    # mpiexec runs in rank 0's host; the working directory and environment (PATH, PYTHONPATH, SPMD_*) carry over
    exec ip netns exec ${PREFIX}-h0 unshare --uts /bin/sh -c 'hostname "$0" && exec "$@"' ${PREFIX}-h0 \
        env $(mpi_env) PATH="$(dirname "$MPIEXEC"):$PATH" \
        "$MPIEXEC" -launcher ssh -launcher-exec "$WRAPPER" -iface eth0 -f "$HOSTFILE" "$@"
}

link_bytes() {  # "tx rx" of host i's eth0, read from the bridge side of its veth (whose rx is the host's tx)
    local d=/sys/class/net/${PREFIX}-v$1/statistics
    echo "$(cat $d/rx_bytes) $(cat $d/tx_bytes)"
}

cmd_status() {
    need_root_and_ip
    local i n rate rate_of ns
    if [ ! -f "$STATE/config" ]; then
        [ -z "$(namespaces)$(host_links)" ] || die "partly up ($(namespaces | tr '\n' ' ')): run '$0 down'"
        echo "netsim: down"; return 0
    fi
    eval "$(cat "$STATE/config")"
    echo "netsim: up: $n hosts, link cap $rate${rate_of:+ (own: $rate_of)}, hostfile $HOSTFILE"
    for i in $(seq 0 $((n - 1))); do
        ns=${PREFIX}-h$i
        read -r tx rx < <(link_bytes "$i")
        printf '  %s  %-12s eth0 tx %12d B  rx %12d B  qdisc %s\n' "$ns" "$SUBNET.$((i + 1))" "$tx" "$rx" \
            "$(ip netns exec "$ns" tc qdisc show dev eth0 | head -1 | awk '{print $2}')"
    done
    [ "${1:-}" = "--no-check" ] && return 0
    [ "$n" -ge 2 ] || { echo "  (one host: no link to check)"; return 0; }
    # the check: an Allreduce of 1M floats (4 MB) at one rank per host must move at least that much over each link
    local before after moved ok=1 payload=4194304
    before=$(for i in $(seq 0 $((n - 1))); do link_bytes "$i" | cut -d' ' -f1; done)
    "$0" run -- -n "$n" "$PYTHON" -c '
from mpi4py import MPI; import numpy as np
x = np.ones(1 << 20, np.float32); MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, x)
assert x[0] == MPI.COMM_WORLD.size' || die "check: the MPI job over the simulated hosts failed"
    after=$(for i in $(seq 0 $((n - 1))); do link_bytes "$i" | cut -d' ' -f1; done)
    moved=$(paste <(echo "$before") <(echo "$after") | awk '{printf "%d ", $2 - $1}')
    for b in $moved; do [ "$b" -ge $((payload * (n - 1) / n)) ] || ok=0; done
    if [ $ok = 1 ]; then
        echo "  check: OK, a 4 MB Allreduce over $n ranks sent [ $moved] bytes over the links (host 0..$((n - 1)))"
    else
        die "check FAILED: a 4 MB Allreduce sent only [ $moved] bytes over the links: MPI is not using TCP over eth0"
    fi
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down ;;
    run) shift; cmd_run "$@" ;;
    launch) shift; cmd_launch "$@" ;;
    status) shift; cmd_status "$@" ;;
    *) echo "usage: $0 up N [--rate 100mbit] | run -- MPIEXEC-ARGS | launch -- LAUNCH-ARGS | status [--no-check]" \
            "| down" >&2; exit 2 ;;
esac
