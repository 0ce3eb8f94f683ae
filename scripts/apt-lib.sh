#!/usr/bin/env bash
# Sourced by the scripts that install a missing Debian package before `make test`
# needs it (scripts/ensure-kubectl.sh, scripts/image/ensure-tools.sh).

# apt_ensure WHO RERUN PACKAGE...: install PACKAGEs with apt-get, quietly.
# Each failure is one line on stderr that starts with WHO and says what to do
# (RERUN is the script to run again with sudo); when apt itself fails, its own
# words come first. Returns 1 on any failure.
apt_ensure() {
    local who=$1 rerun=$2 log
    shift 2
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$who: $* missing and there is no apt-get; install them yourself" >&2
        return 1
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "$who: $* missing; installing needs root:" \
            "run 'sudo $rerun' or 'sudo apt-get install $*'" >&2
        return 1
    fi
    log=$(mktemp)
    # Quiet on success; on failure show apt's own words (e.g. a file conflict).
    if ! { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } \
        >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "$who: installing $* failed (apt output above)" >&2
        return 1
    fi
    rm -f "$log"
}
