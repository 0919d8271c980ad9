#!/usr/bin/env bash
# Three hosts on one machine with a Redis node lost (issue 26.3): both cluster layouts, one JSON.
#   sudo bash benchmarks/multihost.sh [extra arguments for multihost.py]
# Runs inside the engine lock (one set of engines on the box at a time); the namespaces, bridge
# and servers are removed on exit, also when a run fails or is interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${MULTIHOST_JSON:-benchmarks/results/multihost_cpu2.json}
trap '.venv/bin/python -c "from kvtier.local_netns import cleanup; cleanup(\"kvtmh\")"' EXIT
for replicas in 0 1; do
  flock /tmp/kvtier-engine.lock .venv/bin/python benchmarks/multihost.py --replicas "$replicas" --json "$out" "$@"
done
