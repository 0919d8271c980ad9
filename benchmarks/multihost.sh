#!/usr/bin/env bash
# Three hosts on one machine with a node of the shared store lost (issue 26.3): a Redis Cluster
# without and with replicas (a node killed, then a host's network lost), then Mooncake; one JSON.
#   sudo bash benchmarks/multihost.sh [extra arguments for multihost.py]
# Each run holds the engine lock (one set of engines on the box at a time); the namespaces,
# bridge and servers are removed on exit, also when a run fails or is interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${MULTIHOST_JSON:-benchmarks/results/multihost_cpu2.json}
trap '.venv/bin/python -c "from kvtier.local_netns import cleanup; cleanup(\"kvtmh\")"' EXIT
run() { flock /tmp/kvtier-engine.lock .venv/bin/python benchmarks/multihost.py --json "$out" "$@"; }
rc=0
run --tier redis --replicas 0 "$@" || rc=1
run --tier redis --replicas 1 "$@" || rc=1
# Host C's network lost instead of a process (without replicas: back after 4 s; B, at misses, runs
# fast, so a longer stream keeps it serving past that).
run --tier redis --replicas 0 --loss link --prefixes 240 --down-s 4 "$@" || rc=1
run --tier redis --replicas 1 --loss link "$@" || rc=1
if .venv/bin/python -c "import mooncake" 2>/dev/null; then
  run --tier mooncake "$@" || rc=1
  run --tier mooncake --loss link --prefixes 240 --down-s 4 "$@" || rc=1  # reads from C's segment hang
else echo "multihost: Mooncake not installed (pip install 'kvtier[mooncake]'): its run skipped"; fi
exit $rc
