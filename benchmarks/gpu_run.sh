#!/usr/bin/env bash
# Every GPU step of one device lease: the GPU tests, the transfer benchmark (flash layout, then
# vLLM 0.32's kv_split layout), the host-side
# profile of a 256-token call, and the layer-wise worker benchmark. Run from the repo root on
# a CUDA machine; wheels missing there (blake3, redis, msgspec, pyzmq) travel in .whl/.
# Results land in $OUT (default /tmp/kvtier-gpu). SWEEP=1 adds the staging-size sweep; REPEAT=N
# runs the 256/2048-token sizes N-1 more times.
set -uo pipefail
OUT=${OUT:-/tmp/kvtier-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,pcie.link.gen.current,pcie.link.width.current --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== tests/gpu"
python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/transfer_gpu_tests.txt" | tail -4
echo "== bench_transfer"
python3 benchmarks/bench_transfer.py ${SWEEP:+--sweep} --out "$OUT/transfer.json" > "$OUT/bench.log" 2>&1
tail -45 "$OUT/bench.log"
for i in $(seq 2 "${REPEAT:-1}"); do  # repeats of the small sizes, for the run-to-run spread
  python3 benchmarks/bench_transfer.py --tokens 256,2048 --out "$OUT/transfer_rep$i.json" > "$OUT/bench_rep$i.log" 2>&1
  grep -E "^ +256 .*(copy|kvtier-staged) " "$OUT/bench_rep$i.log"
done
echo "== bench_transfer --layout kv_split (vLLM 0.32's GPU layout)"
python3 benchmarks/bench_transfer.py --layout kv_split --out "$OUT/transfer_kv_split.json" > "$OUT/bench_kv_split.log" 2>&1
grep -E "^ +[0-9]+ (save|load) +(copy|kvtier-staged) " "$OUT/bench_kv_split.log"
echo "== profile"
python3 benchmarks/bench_transfer.py --profile --out /dev/null > "$OUT/profile.txt" 2>&1
grep "host time" "$OUT/profile.txt"
echo "== bench_layerwise"
python3 benchmarks/bench_layerwise.py --out "$OUT/layerwise.json" 2>&1 | tee "$OUT/layerwise.log"
