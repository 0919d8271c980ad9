#!/usr/bin/env bash
# Install the system packages the tests need: redis-server (the Redis tests start their own on
# 127.0.0.1) and libibverbs1 (Mooncake's transfer engine loads it, even for TCP). Debian/Ubuntu,
# as root or with sudo. Does nothing when they are already there.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
has_ibverbs() {  # grep without -q: an early exit would fail the pipe under pipefail
  { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep 'libibverbs\.so\.1 ' >/dev/null
}
has_ibverbs || missing+=(libibverbs1)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
  echo "system-deps: ${missing[*]} missing; install them (apt-get install -y ${missing[*]}) and run again"; exit 1
fi
echo "system-deps: installing ${missing[*]} with apt"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
command -v redis-server >/dev/null && has_ibverbs
