#!/usr/bin/env bash
# Two throwaway OCI registries for the tests: `start|stop STATE_DIR`.
#
# Debian's `docker-registry` (CNCF distribution 2.x) on loopback, twice: one
# anonymous, one behind htpasswd (basic) auth with a user and password made up
# here. Each keeps its config, pid, port, log and filesystem storage in
# STATE_DIR/registry/{anon,auth}/; the storage is emptied on every fresh start.
# Deletes are enabled, blob GETs are served directly (no redirects) and the
# blob-descriptor cache is off, so a byte flipped in storage reaches the client
# (the tampering tests need that). It appends to STATE_DIR/env:
#   GPUFLEET_TEST_REGISTRY=127.0.0.1:PORT        the anonymous registry
#   GPUFLEET_TEST_REGISTRY_DATA=DIR              its storage root (docker/registry/v2/... below it)
#   GPUFLEET_TEST_REGISTRY_AUTH=127.0.0.1:PORT   the htpasswd registry
#   GPUFLEET_TEST_REGISTRY_AUTH_USER, GPUFLEET_TEST_REGISTRY_AUTH_PASSWORD
#   GPUFLEET_TEST_REGISTRY_AUTH_DATA=DIR         its storage root
#   GPUFLEET_TEST_REGISTRY_BIN=/usr/bin/docker-registry, for tests that run a registry of their own
# The prefix keeps these facts apart from distribution's own REGISTRY_*
# configuration overrides (REGISTRY_AUTH=... would be read as its auth section).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../servers-lib.sh
source scripts/servers-lib.sh

server_args registry "$@"

bin=/usr/bin/docker-registry
instances=(anon auth)

# The pid of INSTANCE's registry, if it is alive and still that registry.
running_pid() {
    live_pid "$mine/$1/pid" "docker-registry serve $mine/$1/config.yml"
}

stop_one() {
    local dir=$mine/$1 pid
    if pid=$(running_pid "$1"); then terminate "$pid"; fi
    rm -f "$dir/pid" "$dir/port"
}

unpublish() {
    if [ -f "$state/env" ]; then sed -i '/^GPUFLEET_TEST_REGISTRY[A-Z_]*=/d' "$state/env"; fi
}

stop() {
    local name
    for name in "${instances[@]}"; do stop_one "$name"; done
    # A stopped registry's address must not linger for the tests to find.
    unpublish
}

publish() {
    # A restart replaces this server's facts rather than adding a second set.
    touch "$state/env"
    unpublish
    cat >>"$state/env" <<EOF
GPUFLEET_TEST_REGISTRY=127.0.0.1:$(cat "$mine/anon/port")
GPUFLEET_TEST_REGISTRY_DATA=$mine/anon/data
GPUFLEET_TEST_REGISTRY_AUTH=127.0.0.1:$(cat "$mine/auth/port")
GPUFLEET_TEST_REGISTRY_AUTH_USER=$(cat "$mine/auth/user")
GPUFLEET_TEST_REGISTRY_AUTH_PASSWORD=$(cat "$mine/auth/password")
GPUFLEET_TEST_REGISTRY_AUTH_DATA=$mine/auth/data
GPUFLEET_TEST_REGISTRY_BIN=$bin
EOF
}

# INSTANCE's config.yml on PORT; a second argument adds htpasswd auth.
write_config() {
    local dir=$mine/$1 port=$2 htpasswd=${3:-}
    cat >"$dir/config.yml" <<EOF
# gpufleet test registry ($1)
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
  secret: $(random_secret)
health:
  storagedriver:
    enabled: false
EOF
    if [ -n "$htpasswd" ]; then
        cat >>"$dir/config.yml" <<EOF
auth:
  htpasswd:
    realm: gpufleet-test
    path: $htpasswd
EOF
    fi
}

random_secret() {
    .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(18))'
}

start_one() {
    local dir=$mine/$1 port pid
    port=$(free_port)
    echo "$port" >"$dir/port"
    write_config "$1" "$port" "${2:-}"
    # A clean environment: distribution reads any REGISTRY_* variable in its
    # environment as a config override, whoever set it.
    nohup env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$bin" serve "$dir/config.yml" \
        >"$dir/server.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$dir/pid"
}

start() {
    local name port ok=1
    mkdir -p "$mine"
    # Idempotent: live registries are kept (their content too) and re-published.
    for name in "${instances[@]}"; do
        if running_pid "$name" >/dev/null && [ -f "$mine/$name/port" ]; then
            port=$(cat "$mine/$name/port")
            wait_port "$port" 5 || ok=0
        else
            ok=0
        fi
    done
    if [ "$ok" = 1 ]; then
        publish
        echo "test-servers: registries already on $(grep -E '^GPUFLEET_TEST_REGISTRY(_AUTH)?=' "$state/env" | cut -d= -f2 | xargs)"
        return 0
    fi
    stop
    if [ ! -x "$bin" ] || ! command -v htpasswd >/dev/null; then
        echo "test-servers: installing Debian docker-registry and apache2-utils"
        # The package's service must not start: we run our own instances.
        apt_install docker-registry apache2-utils
    fi
    for name in "${instances[@]}"; do
        rm -rf "${mine:?}/$name"
        mkdir -p "$mine/$name/data"
    done
    echo gpufleet >"$mine/auth/user"
    random_secret >"$mine/auth/password"
    htpasswd -Bbn "$(cat "$mine/auth/user")" "$(cat "$mine/auth/password")" >"$mine/auth/htpasswd"
    start_one anon
    start_one auth "$mine/auth/htpasswd"
    for name in "${instances[@]}"; do
        wait_port "$(cat "$mine/$name/port")" 30 || {
            cat "$mine/$name/server.log" >&2
            stop
            return 1
        }
    done
    publish
    echo "test-servers: registries ($("$bin" --version | awk '{print $NF}')) on" \
        "127.0.0.1:$(cat "$mine/anon/port") (anonymous), 127.0.0.1:$(cat "$mine/auth/port") (htpasswd)"
}

case "$action" in
start) start ;;
stop) stop ;;
*) usage ;;
esac
