#!/usr/bin/env bash
# The GPU runs of one device session, one step per device call (each under its 10-minute limit),
# on the machine staged with ../shared/gpu-vllm/prepare.sh. From the repo root:
#   source .gpu-vllm/bin/env.sh && bash benchmarks/gpu_session.sh STEP [STEP...]
# LMCache (issue 30) needs one extra device call on that machine, any time before its first run (the
# kit: bash benchmarks/gpu_lmcache/prepare.sh here, which writes .gpu-lmcache/, ~20 MB, one carry):
#   carry [".gpu-lmcache"]:  bash .gpu-lmcache/bin/stage.sh
# after which this script sources benchmarks/gpu_lmcache/env.sh itself (it installs LMCache into
# /tmp/site once); gpu_docs checks that LMCache's compiled ops load before its first LMCache engine,
# and where they do not, records the lmcache_* configurations as skipped with the exact error and runs
# the others.
# STEP: tests (tests/gpu), async1 (gpu_async auto,async; ASYNC1_MODES=auto: auto only), async2 (sync,native), async3 (alone: vLLM with no
# connector, and lmcache: LMCache's local_cpu, issue 30),
# vllm1 / vllm2 (gpu_vllm parts; vllm1_short: part 1 without the cpu-tier-only engine; vllm1_nosave: the same plus kvtier's cold runs as a consumer that saves nothing (issue 28), both kvtier engines traced; vllm1_uva: part 1 with KVTIER_TRANSFER_MODE=uva; vllm1_ring8: vllm1_nosave untraced with KVTIER_STAGING_MB=8; vllm_lmcache: LMCache's engine, between vllm1 and vllm2; vllm_lmcache_v1: the same on vLLM's V1 model runner), writer (bench_writer_gil: the disk tier's writers vs the engine thread), writer_ab (its variants: one thread, a writer process), writer_process (that one only), random (gpu_engine_random, with the save-fence check and its control), random_disk (the same over a disk tier), docs_A+B (gpu_docs configurations A and B; LMCache's: lmcache_cpu, lmcache_cpu4g_disk, lmcache_cpu4g_disk_dropped), lmcache_check (LMCache's import check alone), disk_read (bench_disk_read), sched_hooks (bench_sched_hooks: kvtier's scheduler hooks per decode step vs vLLM's own, on this host's CPU), remote (bench_remote: the remote tiers on this host's cores; the kit of benchmarks/gpu_remote/prepare.sh staged first), pd_single / pd_pd (gpu_pd: one engine, then prefill/decode through kvtier; two calls), faults_lmcache (gpu_engine_faults with LMCache under vLLM's default failure policy, FAULTS_FAIL=0: not, and under 'recompute', then kvtier), faults (kvtier's run only), save_tail (bench_save_tail), save_tail_conn32 (the same with CUDA_DEVICE_MAX_CONNECTIONS=32). Results land in $OUT (default /tmp/kvtier-gpu).
set -uo pipefail
OUT=${OUT:-/tmp/kvtier-gpu}
mkdir -p "$OUT"
# Everything printed also goes to $OUT/session.log: a call stopped at its limit returns nothing it
# piped, but what is under $OUT comes back (a lease lost a whole step's figures that way).
exec > >(tee -a "$OUT/session.log") 2>&1
# The device returns 8 files at most: a step's traces travel as one archive, and the cost model's
# decisions (kvtier.trace "sched.cost" lines) as one small file beside it.
pack() {  # pack NAME DIR: $OUT/NAME.tgz of DIR's files, sched.cost lines to $OUT/NAME_costs.jsonl
  zcat -f "$2"/trace_*.jsonl* 2>/dev/null | grep '"sched.cost"' > "$OUT/$1_costs.jsonl"
  tar czf "$OUT/$1.tgz" -C "$(dirname "$2")" "$(basename "$2")" && rm -rf "$2"
}
export PYTHONUNBUFFERED=1
rm -rf /tmp/kvtier-gpu-vllm/async-disk  # what a killed run left (the disk holds 64 GiB)
if [ -d /tmp/lmc-stage ]; then  # LMCache staged on this machine (issue 30): installed once; gpu_docs checks it
  LMC_NO_CHECK=1 source "$(dirname "$0")/gpu_lmcache/env.sh" || echo "== LMCache did not install (see above)"
fi
for step in "$@"; do
[[ "$step" = vllm1* ]] && rm -rf /tmp/kvtier-gpu-vllm/disk
# gpu_vllm's engines log vLLM's INFO lines, whose timed start-up parts its JSON keeps (startup_log)
if [[ "$step" = vllm* ]]; then export VLLM_LOGGING_LEVEL=INFO; else unset VLLM_LOGGING_LEVEL; fi
echo "== $step ($(date -u +%T))"
case "$step" in
  tests)
    nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
    python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests_h200_vllm024.txt" | tail -6 ;;
  async1)
    python3 benchmarks/gpu_async.py --modes "${ASYNC1_MODES:-auto,async}" --trace "$OUT/async_trace" \
      --out "$OUT/gpu_async_h200_part1.json"
    python3 benchmarks/async_causes.py "$OUT/async_trace" --out "$OUT/async_causes_h200.json" > /dev/null
    pack async1_trace "$OUT/async_trace" ;;
  async2) python3 benchmarks/gpu_async.py --modes sync,native --trace "$OUT/async2_trace" \
            --out "$OUT/gpu_async_h200_part2.json"; pack async2_trace "$OUT/async2_trace" ;;
  async3) python3 benchmarks/gpu_async.py --modes alone,lmcache --trace "$OUT/async3_trace" \
            --out "$OUT/gpu_async_h200_part3.json"; pack async3_trace "$OUT/async3_trace" ;;
  faults_lmcache)  # gpu_engine_faults with LMCache (issue 30), then kvtier: 15 % of the chunks lost at load
    [ "${FAULTS_FAIL:-1}" = 1 ] && timeout 300 python3 benchmarks/gpu_engine_faults.py --connector lmcache \
      --out "$OUT/gpu_engine_faults_lmcache_h200.json"
    timeout 300 python3 benchmarks/gpu_engine_faults.py --connector lmcache --policy recompute \
      --out "$OUT/gpu_engine_faults_lmcache_recompute_h200.json"
    python3 benchmarks/gpu_engine_faults.py --out "$OUT/gpu_engine_faults_h200.json" ;;
  faults) python3 benchmarks/gpu_engine_faults.py --out "$OUT/gpu_engine_faults_h200.json" ;;  # kvtier's run only
  random)
    python3 benchmarks/gpu_engine_random.py --scenarios 24 --out "$OUT/gpu_engine_random_h200.json" ;;
  random_disk)  # the same over a disk tier written by the writer process
    python3 benchmarks/gpu_engine_random.py --scenarios 24 --disk --out "$OUT/gpu_engine_random_disk_h200.json" ;;
  writer) python3 benchmarks/bench_writer_gil.py --chunks ${CHUNKS:-32} --reps ${REPS:-5} --out "$OUT/writer_gil_h200.json" ;;
  writer_ab|writer_process)  # which writer setup leaves the engine's thread alone: one thread, or a child process
    variants=("threads1 --write-threads 1" "process --writer process")
    [ "$step" = writer_process ] && variants=("process --writer process")
    for v in "${variants[@]}"; do
      read -r name flags <<< "$v"
      python3 benchmarks/bench_writer_gil.py --chunks ${CHUNKS:-32} --reps ${REPS:-5} $flags --out "$OUT/writer_gil_h200_$name.json"
    done ;;
  docs_*)  # gpu_docs configurations, a few per call: docs_vllm_alone+kvtier_cpu runs those two
    # under the call's limit, so that the configurations done come back even when the last one cannot finish
    timeout "${DOCS_LIMIT:-570}" python3 benchmarks/gpu_docs.py --configs "$(echo "${step#docs_}" | tr + ,)" \
      --out "$OUT/gpu_docs_h200.json"
    cp "${GPU_VLLM_STATE:-/tmp/kvtier-gpu-vllm}/docs.json" "$OUT/docs_state.json" ;;
  lmcache_check) python3 benchmarks/gpu_lmcache/phase.py --check ;;
  disk_read) python3 benchmarks/bench_disk_read.py --chunks 128 --json "$OUT/disk_read_h200.json" --label gpu_host ;;
  sched_hooks)  # kvtier's scheduler-side hooks per step on this host's CPU (issue 28), vLLM 0.24's Scheduler
    python3 benchmarks/bench_sched_hooks.py --json "$OUT/sched_hooks_gpu_host.json" --label gpu_host ;;
  remote)  # bench_remote on the GPU host (issue 26.4); needs the remote kit staged on this machine:
    # bash benchmarks/gpu_remote/prepare.sh here, then carry [".gpu-remote"]: bash .gpu-remote/bin/stage.sh
    ( source "$(dirname "$0")/gpu_remote/env.sh" && \
      python3 benchmarks/bench_remote.py --out "$OUT/remote_tiers_gpu_host.json" ) ;;
  pd_single|pd_pd)  # gpu_pd (issue 27): one engine at 0.8 of the GPU, then P/D (two at 0.4, kvtier serve, the proxy)
    python3 benchmarks/gpu_pd.py --configs "${step#pd_}" --out "$OUT/gpu_pd_h200.json" ;;
  vllm1) python3 benchmarks/gpu_vllm.py --part 1 --out "$OUT/gpu_vllm_h200.json" ;;
  vllm1_short) python3 benchmarks/gpu_vllm.py --part 1 --no-cpu-only --out "$OUT/gpu_vllm_h200.json" ;;
  vllm1_nosave) python3 benchmarks/gpu_vllm.py --part 1 --no-cpu-only --nosave --trace "$OUT/vllm1_trace" \
                  --out "$OUT/gpu_vllm_h200.json"
                python3 benchmarks/cold_causes.py "$OUT/vllm1_trace" --out "$OUT/cold_causes_h200.json"
                pack vllm1_trace "$OUT/vllm1_trace" ;;
  vllm1_uva)  # kvtier's transfers in its uva path (the kernels write host memory: no copy engine), issue 28
    KVTIER_TRANSFER_MODE=uva python3 benchmarks/gpu_vllm.py --part 1 --no-cpu-only --out "$OUT/gpu_vllm_h200.json" ;;
  vllm1_ring8)  # the cold rows with 8 MiB staging slots, which bench_save_tail found to leave the step's tail alone
    KVTIER_STAGING_MB=8 python3 benchmarks/gpu_vllm.py --part 1 --no-cpu-only --nosave --out "$OUT/gpu_vllm_h200.json" ;;
  save_tail)  # what a step's save costs the end of that step, per transfer path (issue 28)
    python3 benchmarks/bench_save_tail.py --out "$OUT/save_tail_h200.json" ;;
  save_tail_conn32)  # the same with 32 hardware queues instead of CUDA's 8: does a stream of the save's share
    # one with the token copy's (4 ring slots put the token copy behind the whole save)?
    CUDA_DEVICE_MAX_CONNECTIONS=32 python3 benchmarks/bench_save_tail.py --out "$OUT/save_tail_conn32_h200.json" ;;
  vllm_lmcache) python3 benchmarks/gpu_vllm.py --part lmcache ;;  # kept in /tmp/kvtier-gpu-vllm for vllm2's table
  vllm_lmcache_v1) python3 benchmarks/gpu_vllm.py --part lmcache_v1 ;;  # the same on vLLM's V1 runner (vllm2 reports it)
  vllm2) python3 benchmarks/gpu_vllm.py --part 2 --out "$OUT/gpu_vllm_h200.json" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
done
