#!/usr/bin/env bash
# Prepare LMCache 0.5.3 for the GPU machine (issue 30), next to the vLLM of ../shared/gpu-vllm/prepare.sh.
#
# Why 0.5.3: on the H200 image (torch 2.11.0+cu130) its compiled ops (lmcache/c_ops) load; the cuda_ops
# of 0.5.4-0.5.6 do not (built against another torch). vLLM 0.24's LMCacheConnectorV1 imports
# lmcache.integration.vllm.vllm_v1_adapter (the default, use_native=False), which 0.5.3 ships.
# Run from the project's root after the vLLM kit (downloads ~20 MB from PyPI):
#
#     bash benchmarks/gpu_lmcache/prepare.sh
#
# It writes .gpu-lmcache/ (git-ignored through .git/info/exclude), ~20 MB, one carry path:
#   wheels/     installed always: lmcache 0.5.3 (the wheel as published, 15 MB) and the packages it
#               imports at module level on the LMCacheConnectorV1 path that neither the image nor
#               .gpu-vllm/deps has: sortedcontainers, aiofile (+ caio, which aiofile imports);
#   fallback/   wheels installed only if their module does not import on the device (vLLM itself
#               imports them, so the image should have them): py-cpuinfo, pyyaml, psutil, requests
#               (+ urllib3, certifi, charset-normalizer, idna), prometheus_client, aiohttp (+ its deps);
#               fallback/MODULES says which import name goes with which wheel;
#   stubs/numba a 10-line stand-in for numba, copied only if `import numba` fails on the device:
#               lmcache.v1.platform.torch_ops does `from numba import njit` at module level, but uses
#               it only for CacheGen's CPU encode/decode, which local_cpu/local_disk never call
#               (numba + llvmlite would be ~60 MB: a device call of their own);
#   bin/stage.sh  GPU side: copies .gpu-lmcache/ to /tmp/lmc-stage.
# What LMCache 0.5.3 really imports on this path (traced on the CPU box: vLLM 0.24's VllmConfig with
# LMCacheConnectorV1, the scheduler-role connector built, an LMCacheEngine with local_cpu + local_disk
# built; the module-level imports of the 153 lmcache modules reachable from the adapter read statically):
#   carried here:        sortedcontainers, aiofile (+ caio), lmcache itself;
#   in .gpu-vllm/deps:   cachetools, fastapi, starlette, uvicorn, pydantic, msgspec, pyzmq, opentelemetry;
#   the image's (vLLM imports them too; fallback wheels above): torch, numpy, transformers, psutil,
#                        py-cpuinfo, pyyaml, requests, prometheus_client, aiohttp;
#   numba:               `from numba import njit` at module level only (stand-in above).
# Not carried, although LMCache declares them: cupy-cuda13x (imported only by the multiprocess
# mode's GPU cache contexts and CUDA IPC wrapper), nvtx (optional import with a no-op fallback),
# awscrt (S3 connector only), cufile-python (GDS backend only), google-cloud-* (Bigtable connector
# only), nixl, cryptography (serde encryption only), aiofiles, httpx, huggingface_hub, safetensors
# (not imported on this path); the traced import ran with cupy, nvtx, awscrt, cufile, google, nixl
# and cryptography blocked.
#
# On the GPU machine, one extra device call while it is up (it keeps /tmp in between), any time
# before the first LMCache run:
#   with .gpu-lmcache (carry [".gpu-lmcache"]):   bash .gpu-lmcache/bin/stage.sh
# then in every later call, after the vLLM kit's env:
#   source .gpu-vllm/bin/env.sh && source benchmarks/gpu_lmcache/env.sh && python3 ...
# (benchmarks/gpu_session.sh sources benchmarks/gpu_lmcache/env.sh itself when /tmp/lmc-stage exists.)
set -euo pipefail
V=${LMCACHE_VERSION:-0.5.3}
D=.gpu-lmcache
[ -d .git ] || { echo "run from the repository root"; exit 1; }
grep -qx "/$D/" .git/info/exclude 2>/dev/null || echo "/$D/" >> .git/info/exclude
rm -rf "$D" && mkdir -p "$D/wheels" "$D/fallback" "$D/stubs/numba" "$D/bin"
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@" 2>&1 | grep -v "^WARNING" || true
}
dl "$D/wheels" "lmcache==$V" sortedcontainers==2.4.0 aiofile==3.12.3 caio==0.12.10
# import name, then the wheel's name as pip writes it
cat > "$D/fallback/MODULES" <<'EOM'
cpuinfo py_cpuinfo
yaml pyyaml
psutil psutil
requests requests
urllib3 urllib3
certifi certifi
charset_normalizer charset_normalizer
idna idna
prometheus_client prometheus_client
aiohttp aiohttp
aiohappyeyeballs aiohappyeyeballs
aiosignal aiosignal
attr attrs
frozenlist frozenlist
multidict multidict
propcache propcache
yarl yarl
EOM
dl "$D/fallback" py-cpuinfo==9.0.0 pyyaml==6.0.4 psutil==7.2.2 requests==2.34.2 urllib3==2.8.0 \
  certifi==2026.10.19.post1 charset-normalizer==3.5.3 idna==3.20 prometheus_client==0.26.0 aiohttp==3.14.5 \
  aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 \
  yarl==1.25.1
cat > "$D/stubs/numba/__init__.py" <<'EOS'
"""Stand-in for numba, installed by benchmarks/gpu_lmcache/env.sh only where numba does not import.

LMCache 0.5.3 imports ``njit`` at module level (lmcache.v1.platform.torch_ops) for CacheGen's CPU
encode/decode, which the local_cpu / local_disk backends never call. The decorated functions run
as plain Python here if anything ever does call them (slow, still correct)."""
__version__ = "0+kvtier-stub"


def njit(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda f: f


jit = njit
EOS
cat > "$D/bin/stage.sh" <<'EOS'
mkdir -p /tmp/lmc-stage && cp -r .gpu-lmcache/wheels .gpu-lmcache/fallback .gpu-lmcache/stubs /tmp/lmc-stage/ \
  && rm -f /tmp/site/.lmcache-ok && du -sh /tmp/lmc-stage/* && ls /tmp/lmc-stage/wheels
EOS
n=$(ls "$D/wheels" | wc -l); m=$(ls "$D/fallback"/*.whl | wc -l)
[ "$n" = 4 ] && [ "$m" = 17 ] || { echo "prepare: expected 4 wheels and 17 fallbacks, got $n and $m"; exit 1; }
size=$(du -sb "$D" | cut -f1)
[ "$size" -lt 60000000 ] || { echo "prepare: $D is $size bytes, over one carry"; exit 1; }
du -sh "$D"/*
echo "prepare: done ($size bytes); see the header of this script for the device call"
