#!/usr/bin/env bash
# Install the system packages the tests need: redis-server (the Redis tests start their own on
# 127.0.0.1). Debian/Ubuntu, as root or with sudo. Does nothing when it is already there.
set -euo pipefail
command -v redis-server >/dev/null && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
  echo "system-deps: redis-server is missing; install it (apt-get install -y redis-server) and run again"; exit 1
fi
echo "system-deps: installing redis-server with apt"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
command -v redis-server >/dev/null
