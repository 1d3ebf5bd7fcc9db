#!/usr/bin/env bash
# A local multi-node Ray cluster on loopback: one head plus N extra Ray nodes on this machine, each
# a separate `ray start` with its own CPUs and ports. Jobs API (orderlab submit) on the head's
# dashboard, token authentication on, everything bound to 127.0.0.1.
#
#   cluster/local.sh up [NUM_EXTRA_NODES]   # default 1 extra node
#   cluster/local.sh status
#   cluster/local.sh down                   # stops only the nodes this script started
#
# Settings (environment variables, all optional):
#   ORDERLAB_CLUSTER_DIR      state, logs and Ray's temp dir (default /tmp/orderlab-cluster-$UID);
#                             keep it short: Ray's socket paths live below it (limit 107 bytes)
#   ORDERLAB_RAY_PORT         the head's GCS port (default 6379)
#   ORDERLAB_DASHBOARD_PORT   dashboard and Jobs API port (default 8265)
#   ORDERLAB_HEAD_CPUS        CPUs the head advertises (default 1)
#   ORDERLAB_NODE_CPUS        CPUs each extra node advertises (default 1)
#   ORDERLAB_NODE_GPUS        GPUs each extra node advertises (default 0)
#   ORDERLAB_OBJECT_STORE_BYTES  object store per node (default 200000000)
#   ORDERLAB_RAY              the `ray` executable (default: this repo's .venv/bin/ray, else `ray`)
#   ORDERLAB_DATA             passed on to every node (the tasks' data directory)
#
# Every node is a `ray start --block` process in its own process group: `down` sends it SIGTERM and
# Ray stops that node's processes (raylet, workers, ...) at once (no 30 s drain: the drain is for
# Ray Serve). Nothing else on the machine is touched: no `ray stop`, which would stop every Ray
# instance of this user.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${ORDERLAB_CLUSTER_DIR:-/tmp/orderlab-cluster-$(id -u)}"
if [[ -n "${ORDERLAB_RAY:-}" ]]; then
    RAY="$ORDERLAB_RAY"
elif [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY="$REPO/.venv/bin/ray"
else
    RAY="$(command -v ray || true)"
fi
[[ -n "$RAY" && -x "$RAY" ]] || { echo "local.sh: no ray executable; run 'make setup' or set ORDERLAB_RAY" >&2; exit 2; }
PYTHON="$(dirname "$RAY")/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

# Token authentication for every node and every client started from here (ray-notes.md: keep it
# on). The token is Ray's default one (~/.ray/auth_token) unless RAY_AUTH_TOKEN(_PATH) names another.
export RAY_AUTH_MODE=token
# A job's entrypoint (`python -m orderlab ...`) runs in the head's environment: the venv first.
export PATH="$(dirname "$RAY"):$PATH"

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_in_use() {  # port_in_use PORT: something on this machine listens on it
    ! "$PYTHON" -c 'import socket, sys; s = socket.socket(); s.bind(("0.0.0.0", int(sys.argv[1])))' "$1" 2>/dev/null
}

alive() {  # alive PIDFILE: the node's `ray start --block` process is running
    [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_started() {  # wait_started PIDFILE LOG: until Ray reports the node started, or it dies / 120 s pass
    local deadline=$((SECONDS + 120))
    until grep -q "Ray runtime started" "$2" 2>/dev/null; do
        if ! alive "$1" || ((SECONDS > deadline)); then
            echo "local.sh: node did not start; its output ($2):" >&2
            tail -n 30 "$2" >&2
            return 1
        fi
        sleep 0.5
    done
}

# Ports every node needs for itself; two nodes on one machine must not share them. Each node also
# gets its own --temp-dir: nodes sharing one would share runtime_resources/, and one node's
# runtime-env cleanup would delete a job's working_dir under another node's running driver.
node_ports() {
    echo "--node-manager-port $(free_port) --object-manager-port $(free_port)" \
        "--dashboard-agent-listen-port $(free_port) --dashboard-agent-grpc-port $(free_port)" \
        "--runtime-env-agent-port $(free_port) --metrics-export-port $(free_port)" \
        "--min-worker-port 0 --max-worker-port 0"
}

up() {
    local num_extra="${1:-1}"
    [[ "$num_extra" =~ ^[0-9]+$ ]] || usage
    if alive "$DIR/head.pid"; then
        echo "local.sh: a cluster is already up (pid $(cat "$DIR/head.pid")); run 'cluster/local.sh down' first" >&2
        exit 1
    fi
    mkdir -p "$DIR"
    rm -f "$DIR"/node-*.pid "$DIR"/*.log
    local port="${ORDERLAB_RAY_PORT:-6379}" dashboard_port="${ORDERLAB_DASHBOARD_PORT:-8265}"
    local object_store="${ORDERLAB_OBJECT_STORE_BYTES:-200000000}"
    if port_in_use "$port"; then
        echo "local.sh: port $port is in use (another Ray?); choose another with ORDERLAB_RAY_PORT=PORT" >&2
        exit 1
    fi
    if port_in_use "$dashboard_port"; then
        echo "local.sh: port $dashboard_port is in use (another Ray?); choose another with ORDERLAB_DASHBOARD_PORT=PORT" >&2
        exit 1
    fi
    printf 'PORT=%s\nDASHBOARD_PORT=%s\n' "$port" "$dashboard_port" >"$DIR/ports"
    # creates ~/.ray/auth_token when there is no token yet; prints nothing here
    "$RAY" get-auth-token --generate >/dev/null 2>&1

    # shellcheck disable=SC2046  # node_ports is a list of flags
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 setsid "$RAY" start --head --block \
        --node-ip-address 127.0.0.1 --port "$port" \
        --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
        --ray-client-server-port "$(free_port)" \
        --num-cpus "${ORDERLAB_HEAD_CPUS:-1}" --num-gpus 0 --resources '{"orderlab_head": 1}' \
        --object-store-memory "$object_store" --temp-dir "$DIR/tmp-head" --disable-usage-stats \
        $(node_ports) >"$DIR/head.log" 2>&1 </dev/null &
    echo $! >"$DIR/head.pid"
    wait_started "$DIR/head.pid" "$DIR/head.log" || { down >/dev/null; exit 1; }

    local i
    for ((i = 1; i <= num_extra; i++)); do
        # shellcheck disable=SC2046
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 setsid "$RAY" start --block \
            --address "127.0.0.1:$port" --node-ip-address 127.0.0.1 \
            --num-cpus "${ORDERLAB_NODE_CPUS:-1}" --num-gpus "${ORDERLAB_NODE_GPUS:-0}" \
            --object-store-memory "$object_store" --temp-dir "$DIR/tmp-$i" --disable-usage-stats \
            $(node_ports) >"$DIR/node-$i.log" 2>&1 </dev/null &
        echo $! >"$DIR/node-$i.pid"
        wait_started "$DIR/node-$i.pid" "$DIR/node-$i.log" || { down >/dev/null; exit 1; }
    done
    echo "local Ray cluster up: head + $num_extra node(s); state in $DIR"
    echo "  Jobs API:  http://127.0.0.1:$dashboard_port   (orderlab submit CONFIG --address http://127.0.0.1:$dashboard_port)"
    echo "  GCS:       127.0.0.1:$port                   (RAY_ADDRESS for ray.init / orderlab sweep --address)"
}

stop_node() {  # stop_node PIDFILE: SIGTERM the node's `ray start --block`, then its process group
    local pidfile="$1" pid deadline
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    # setsid made the node its own process group: whatever is left of it goes too
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

down() {
    [[ -d "$DIR" ]] || { echo "local.sh: no cluster state in $DIR"; return 0; }
    local pidfile
    for pidfile in "$DIR"/node-*.pid; do
        [[ -e "$pidfile" ]] && stop_node "$pidfile"
    done
    [[ -e "$DIR/head.pid" ]] && stop_node "$DIR/head.pid"
    echo "local Ray cluster down (logs kept in $DIR)"
}

status() {
    alive "$DIR/head.pid" || { echo "local.sh: no cluster up (state dir $DIR)"; exit 1; }
    # shellcheck disable=SC1091
    source "$DIR/ports"
    local pidfile
    for pidfile in "$DIR"/head.pid "$DIR"/node-*.pid; do
        [[ -e "$pidfile" ]] || continue
        if alive "$pidfile"; then state=running; else state=dead; fi
        echo "$(basename "$pidfile" .pid): pid $(cat "$pidfile") $state"
    done
    echo "Jobs API: http://127.0.0.1:$DASHBOARD_PORT   GCS: 127.0.0.1:$PORT"
    "$RAY" status --address "127.0.0.1:$PORT"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    status) status ;;
    *) usage ;;
esac
