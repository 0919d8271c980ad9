#!/usr/bin/env bash
# Prepare the remote tiers' servers for the GPU host (issue 26.4: remote-tier throughput "also on the
# GPU host", 16 cores, where loopback TCP moves 4.5-21.9 GB/s with 1-8 streams).
#
# The device has Python 3.12 and no package registry; redis-py and hiredis come with the vLLM kit
# (.gpu-vllm/deps). This writes .gpu-remote/ (git-ignored), one carry path under 64 MiB:
#   remote.tar.xz  site/  Mooncake's CPU wheel for cp312 (mooncake-transfer-engine-non-cuda, the
#                          version in .venv), unpacked, without its 41 MB transfer_engine_bench;
#                   bin/   redis-server from this machine;
#                   lib/   the shared libraries store.so, mooncake_master, mooncake_client and
#                          redis-server load, less glibc and libstdc++ (libibverbs, libcurl, libnuma,
#                          libjemalloc, libssl... : ldd's closure here; none needs past GLIBC_2.34;
#                          benchmarks/gpu_remote/env.sh puts on the loader's path only those the
#                          device lacks, so its own libssl, libz... stay in use);
#   bin/stage.sh    GPU side: unpacks it to /tmp/remote.
# Run from the project's root (downloads ~46 MB from PyPI):
#
#     bash benchmarks/gpu_remote/prepare.sh
#
# On the GPU machine, one device call with carry [".gpu-remote"] (the vLLM kit staged or not):
#     bash .gpu-remote/bin/stage.sh && source benchmarks/gpu_remote/env.sh && \
#         python3 benchmarks/bench_remote.py --out benchmarks/results/remote_tiers_h100.json
# (env.sh sources .gpu-vllm/bin/env.sh first when /tmp/site is missing redis-py.)
set -euo pipefail
D=.gpu-remote
[ -d .git ] || { echo "run from the repository root"; exit 1; }
grep -qx "/$D/" .git/info/exclude 2>/dev/null || echo "/$D/" >> .git/info/exclude
command -v redis-server >/dev/null || { echo "redis-server is not installed here (bash scripts/system-deps.sh)"; exit 1; }
V=$(.venv/bin/python -c "from importlib.metadata import version; print(version('mooncake-transfer-engine-non-cuda'))")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$D" && mkdir -p "$D/bin" "$tmp/whl" "$tmp/k/site" "$tmp/k/lib" "$tmp/k/bin"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$tmp/whl" "mooncake-transfer-engine-non-cuda==$V"
.venv/bin/python -m zipfile -e "$tmp"/whl/*.whl "$tmp/k/site"
rm -f "$tmp/k/site/mooncake/transfer_engine_bench"
chmod +x "$tmp/k/site/mooncake/mooncake_master" "$tmp/k/site/mooncake/mooncake_client"
cp "$(command -v redis-server)" "$tmp/k/bin/"
# The libraries they load that this machine resolves from its system (the wheel's own .libs stay).
for f in "$tmp/k/site/mooncake/store.so" "$tmp/k/site/mooncake/mooncake_master" \
         "$tmp/k/site/mooncake/mooncake_client" "$tmp/k/bin/redis-server"; do
  LD_LIBRARY_PATH="$tmp/k/site/mooncake_transfer_engine_non_cuda.libs" ldd "$f"
done | awk '/=> \//{print $3}' | sort -u \
  | grep -v -E '/(libc|libm|libpthread|libdl|librt|libresolv|libutil|libanl|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' \
  | grep -v "$tmp" | while read -r lib; do cp -L "$lib" "$tmp/k/lib/"; done
tar -C "$tmp/k" -c site lib bin | xz -9 -T0 > "$D/remote.tar.xz"  # xz: Python's tarfile reads it, no package needed
cat > "$D/bin/stage.sh" <<'EOS'
# GPU side: unpack the remote tiers' kit to /tmp/remote (kept while the machine stays warm).
set -e
rm -rf /tmp/remote && mkdir -p /tmp/remote
python3 -c "import tarfile; tarfile.open('.gpu-remote/remote.tar.xz', 'r:xz').extractall('/tmp/remote')"
du -sh /tmp/remote/*
EOS
du -sh "$D"/* && echo "wrote $D (carry [\"$D\"]; then: bash $D/bin/stage.sh)"
