#!/usr/bin/env bash
# Set up (redis-server, .venv) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test: pytest collected no tests: that is a failure"; exit 1; fi
exit $rc
