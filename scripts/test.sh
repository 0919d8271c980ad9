#!/usr/bin/env bash
# Set up (redis-server, .venv) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "test: installing redis-server (the Redis tests start their own on 127.0.0.1)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "test: redis-server is missing; install it (sudo apt-get install -y redis-server) and run again"; exit 1
  fi
fi
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test: pytest collected no tests: that is a failure"; exit 1; fi
exit $rc
