# Shared helpers for scripts/servers/*.sh (sourced, not run).

# A free TCP port on 127.0.0.1.
free_port() {
    .venv/bin/python - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

# Wait until 127.0.0.1:$1 accepts connections, at most $2 seconds.
wait_port() {
    local port=$1 limit=${2:-30} i
    for ((i = 0; i < limit * 10; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "test-servers: nothing listens on 127.0.0.1:$port after ${limit}s" >&2
    return 1
}

# Install Debian packages when a command is missing (root only).
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "test-servers: missing $*; install it (Debian package) or run as root" >&2
        return 1
    fi
    if [ ! -f /var/lib/apt/lists/.gpufleet-updated ]; then
        apt-get update -qq && touch /var/lib/apt/lists/.gpufleet-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

usage() {
    echo "usage: $0 start|stop STATE_DIR" >&2
    exit 2
}

# Every server script takes `start|stop STATE_DIR`; sets action, state and
# mine (STATE_DIR/<name>, the server's own files).
server_args() {
    local name=$1
    shift
    [ $# -eq 2 ] || usage
    action=$1
    state=$(realpath -m "$2")
    mine=$state/$name
}

# The pid in pid file $1 if that process is alive and its command line
# contains $2: a stale pid file must never make us signal whatever reused the
# number.
live_pid() {
    local pidfile=$1 pattern=$2 pid
    [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern" || return 1
    echo "$pid"
}

# SIGTERM process $1, and SIGKILL it if it is still there after 5 s.
terminate() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}
