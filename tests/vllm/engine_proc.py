"""A vLLM engine in a child process, driven by JSON lines (test helper).

Each engine runs in its own process: vLLM keeps the worker-side KV connector in
a process-wide global, so two engines (one with kvtier, one without) must never
share a process. The child runs the engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) unless asked for vLLM's default
multi-process mode, and then instruments it:

- counts preemptions (the real ``Scheduler._preempt_request``);
- checks, around every copy of a kvtier load (one per layer, during the forward), that
  no slot of a token below its load's ``start`` is written (those blocks may be shared
  with running requests): they hold sentinels while the copy runs, and get their
  contents back after;
- can inject faults: ``align_down_load`` makes loads start at their chunk's
  boundary (the known overlap bug); ``evict_before_load`` deletes a load's chunks from every
  tier just before the worker fetches them (evicted between lookup and load);
  ``lose_chunks`` turns chunks the worker's ``Store.get`` returns into misses, at random
  (``p``, ``seed``) or by chunk index (``index``, ``times``), and writes noise into the
  blocks of a failed load (a torn load: what the cache holds there is never right);
  ``slow_saves`` (GPU) starts every save copy ``cycles`` GPU clock cycles after the forward
  that wrote its KV, on a stream of its own, so the engine runs ahead of its saves;
  ``no_fence`` turns ``KVWorker.fence_saves`` off (the bug it prevents, to show it is caught);
- runs LMCache (0.5.3, vLLM's ``LMCacheConnectorV1``) instead of kvtier when given its ``LMCACHE_*``
  settings, with the same ``lose_chunks`` fault (:func:`_lossy_lmcache`), for side-by-side runs;
- runs vLLM's async scheduler on CPU when the engine config asks for
  ``async_scheduling=True`` (vLLM's CPU platform turns it off; its engine runs it fine).

Parent side: :class:`EngineProc`. Child side: ``python engine_proc.py CONFIG_JSON``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvtier.vllm.phases import kill_process_group, reset_prefix_cache, shutdown_engine

MARK = "@@KVT@@"
SENTINEL = -12345.0  # written below a load's start while it runs; no KV value is ever this

# Totals across the test session, printed at its end by conftest.
SUMMARY: dict[str, int] = {"scenarios": 0, "preemptions": 0, "hit_tokens": 0, "load_errors": 0}


class EngineProc:
    """Parent-side handle of one engine process."""

    def __init__(self, model: str, engine: dict, kvtier: dict | None, multiprocess: bool = False,
                 log_path: str | None = None, env: dict | None = None, timeout: float = 300.0,
                 wait: bool = True, sync_loads: bool = False, wrap: list[str] | None = None,
                 lmcache: dict[str, str] | None = None) -> None:
        """``wrap``: a command prefix for the child (``ip netns exec NS``: an engine on another host).
        ``lmcache``: LMCache's ``LMCACHE_*`` settings; LMCache is then the connector (``kvtier`` None), with
        ``engine["kv_transfer_config"]``'s other keys (``kv_load_failure_policy``) if given."""
        if lmcache is not None:
            if kvtier is not None:
                raise ValueError("one connector per engine: kvtier or lmcache, not both")
            engine = dict(engine, kv_transfer_config={"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both",
                                                      **(engine.get("kv_transfer_config") or {})})
            env = {**(env or {}), **lmcache}
        cfg = {"model": model, "engine": engine, "kvtier": kvtier, "sync_loads": sync_loads,
               "lmcache": lmcache is not None}
        e = dict(os.environ)
        e.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                  "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocess else "0",
                  "PYTHONPATH": str(Path(__file__).resolve().parents[2]) + os.pathsep + e.get("PYTHONPATH", "")})
        e.update(env or {})
        self.log_path = log_path or os.devnull
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*(wrap or []), sys.executable, __file__, json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, env=e, text=True, bufsize=1, start_new_session=True,
        )
        self.timeout = timeout
        self.ready: dict | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> dict:
        """Block until the engine started; raises :class:`EngineError` if it failed to."""
        if self.ready is None:
            self.ready = self._read()
        return self.ready

    def _read(self) -> dict:
        result: dict = {}

        def reader() -> None:
            for line in self.proc.stdout:
                if line.startswith(MARK):
                    result.update(json.loads(line[len(MARK):]))
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(self.timeout)
        if not result:
            rc = self.proc.poll()
            raise RuntimeError(f"engine process gave no answer (exit code {rc}); see {self.log_path}")
        if "error" in result:
            raise EngineError(result["error"], result.get("type", ""))
        return result

    def send(self, cmd: str, **kw) -> None:
        self.wait_ready()
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict:
        return self._read()

    def call(self, cmd: str, **kw) -> dict:
        self.send(cmd, **kw)
        return self._read()

    def generate(self, prompts: list[list[int]], max_tokens: int | list[int] = 8, reset: bool = False) -> dict:
        return self.call("generate", prompts=prompts, max_tokens=max_tokens, reset=reset)

    def stats(self) -> dict:
        st = self.call("stats")
        # Every layer's load was waited for by its attention (layer-wise hooks ran): the
        # worker's safety net (fail the step's loads, recompute) never had to fire.
        unready = st.get("worker", {}).get("unready_layer_loads", 0)
        assert unready == 0, f"{unready} steps had layers whose attention ran without wait_for_layer_load"
        return st

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        kill_process_group(self.proc.pid)  # an engine core left behind (multi-process mode)
        self._log.close()


def same_as_vllm(base: EngineProc, kv: EngineProc, prompts: list[list[int]], max_tokens: int | list[int] = 8,
                 reset: bool = True) -> dict:
    """Run ``prompts`` on vLLM alone and with kvtier (side by side); assert equal greedy outputs.
    Returns kvtier's answer (outputs, cached tokens); counts one scenario."""
    base.send("generate", prompts=prompts, max_tokens=max_tokens, reset=reset)
    got = kv.generate(prompts, max_tokens, reset=reset)
    assert got["outputs"] == base.recv()["outputs"]
    SUMMARY["scenarios"] += 1
    return got


class EngineError(RuntimeError):
    def __init__(self, message: str, type_name: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.message = message
        self.type_name = type_name


# ---------------------------------------------------------------------------------- child
_OUT = None


def _reply(obj: dict) -> None:
    _OUT.write(MARK + json.dumps(obj) + "\n")
    _OUT.flush()


def _child(cfg: dict) -> None:
    import torch

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.core.sched.scheduler import Scheduler

    counters = {"preemptions": 0, "overlap_checks": 0, "overlap_violations": 0, "faults_injected": 0,
                "mid_chunk_loads": 0, "slowed_loads": 0, "slowed_saves": 0, "save_fences": 0}
    faults: set[str] = set()
    fault_args: dict = {}
    loss: dict = {"rnd": None}  # lose_chunks' random generator, seeded at the first load

    orig_preempt = Scheduler._preempt_request

    # (prompt length, num_computed_tokens) at each preemption; (prompt length,
    # num_computed_tokens, answer) of each kvtier lookup -- the last 400.
    events: dict[str, list] = {"preempted_at": [], "matched": []}

    def preempt(self, request, *a, **kw):
        counters["preemptions"] += 1
        events["preempted_at"].append((len(request.prompt_token_ids), request.num_computed_tokens))
        return orig_preempt(self, request, *a, **kw)

    Scheduler._preempt_request = preempt

    kw = dict(cfg["engine"])
    if kw.get("async_scheduling"):  # keep it on: vLLM's CPU platform switches it off
        from vllm.platforms.cpu import CpuPlatform

        cpu_check = CpuPlatform.check_and_update_config.__func__

        def keep_async(cls, vllm_config):
            cpu_check(cls, vllm_config)
            vllm_config.scheduler_config.async_scheduling = True

        CpuPlatform.check_and_update_config = classmethod(keep_async)
    if kw.get("kv_transfer_config") is not None:  # a full config (MultiConnector tests)
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(**kw["kv_transfer_config"])
    if cfg["kvtier"] is not None or kw.get("kv_transfer_config") is not None:
        from vllm.config import KVTransferConfig

        from kvtier.transfer import gather as kv_gather
        from kvtier.transfer import scatter as kv_scatter
        from kvtier.vllm import worker as kv_worker

        from kvtier.vllm.connector import KVTierConnector

        orig_match = KVTierConnector.get_num_new_matched_tokens

        def match(self, request, num_computed_tokens):
            n, async_ = orig_match(self, request, num_computed_tokens)
            events["matched"] = events["matched"][-399:] + [(len(request.prompt_token_ids), num_computed_tokens, n)]
            return n, async_

        KVTierConnector.get_num_new_matched_tokens = match
        if cfg.get("sync_loads"):  # the old behaviour, to show what vLLM does with it
            from kvtier.vllm import connector as kv_connector

            kv_connector.parks_loads = lambda config, vllm_config: False
        if cfg["kvtier"] is not None:
            kw["kv_transfer_config"] = KVTransferConfig(
                kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm", kv_role="kv_both",
                kv_connector_extra_config=cfg["kvtier"],
            )

        orig_start_load = kv_worker.KVWorker.start_load
        orig_finish_load = kv_worker.KVWorker.finish_load
        orig_run_parked = kv_worker.KVWorker._run_parked
        orig_plan = kv_worker.KVWorker._plan_loads_now
        guard: dict = {"slots": None}  # the step's guarded slots, while its loads run (main thread)
        by_keys: dict = {}  # id(spec.keys) -> spec, for lose_chunks by index
        starts: dict = {}  # id(spec) -> its start as planned by the scheduler (before align_down_load)
        loss_lock = threading.Lock()

        def slots_of(s, lo, hi, bs):
            t = torch.arange(lo, hi)
            return torch.as_tensor(s.block_ids, dtype=torch.int64)[t // bs] * bs + t % bs

        def before_load(self, specs):
            """Faults that change a load before the worker plans it; the specs' keys for lose_chunks."""
            counters["mid_chunk_loads"] += sum(1 for s in specs if s.start % self.chunk_size)
            by_keys.update({id(s.keys): s for s in specs})
            starts.update({id(s): s.start for s in specs})
            if "slow_background_load" in faults and threading.current_thread() is not threading.main_thread():
                counters["slowed_loads"] += 1
                time.sleep(float(fault_args.get("secs", 0.5)))  # the load stays in flight meanwhile
            if "kill_before_load" in faults and specs:
                import signal

                os.kill(int(fault_args["pid"]), signal.SIGKILL)
                counters["faults_injected"] += 1
                faults.discard("kill_before_load")
            if "evict_before_load" in faults:
                for s in specs:
                    if s.keys:
                        for tier in self.store.tiers:
                            tier.delete(list(s.keys))
                        counters["faults_injected"] += 1
            if "align_down_load" in faults:  # the known bug, to show the checks catch it
                for s in specs:
                    s.start = s.start // self.chunk_size * self.chunk_size
                counters["faults_injected"] += 1
            if not getattr(self.store, "_lossy", False):
                real_get = self.store.get

                def get(keys):
                    """``lose_chunks``: some chunks ``Store.get`` returns become misses."""
                    got = list(real_get(keys))
                    if "lose_chunks" not in faults:
                        return got
                    spec = by_keys.get(id(keys))
                    with loss_lock:
                        for i, ref in enumerate(got):
                            index = None if spec is None else spec.first_chunk + i
                            if "index" in fault_args:
                                hit = index == fault_args["index"] and fault_args.get("times", 1) > 0
                                if hit:
                                    fault_args["times"] = fault_args.get("times", 1) - 1
                            else:
                                hit = _lose_next(loss, fault_args)
                            if hit and ref is not None:
                                ref.release()
                                got[i] = None
                                counters["faults_injected"] += 1
                    return got

                self.store.get = get
                self.store._lossy = True

        def torn(self, failed_blocks):
            """A failed load's blocks hold noise, never the right KV (a torn load)."""
            if failed_blocks and "lose_chunks" in faults:
                bs = self.block_size
                slots = torch.tensor([b * bs + i for b in sorted(failed_blocks) for i in range(bs)])
                noise = torch.randn(self.paged.chunk_shape(slots.numel()), dtype=self.paged.dtype)
                kv_scatter(self.paged, slots, [noise]).wait()

        def checked_plan(self, specs):
            """Every planned load writes only slots of its own range [start, end): never below."""
            specs = list(specs)
            result = orig_plan(self, specs)
            ld = result[2]
            if ld is not None and specs:
                bs = self.block_size
                owned = torch.cat([slots_of(s, starts.get(id(s), s.start), s.end, bs) for s in specs])
                mapped = ld.mapping[ld.mapping >= 0].cpu()
                counters["overlap_checks"] += 1
                if not torch.isin(mapped, owned).all():
                    counters["overlap_violations"] += 1
                    print(f"kvtier overlap violation (plan): slots {mapped[~torch.isin(mapped, owned)][:16].tolist()}",
                          file=sys.stderr, flush=True)
            return result

        def guard_below(self, specs):
            """Sentinels go in every slot below some load's start that no load of this step owns
            (a request admitted in the same step may share another's freshly loaded blocks)."""
            bs = self.block_size
            owned = torch.cat([slots_of(s, s.start, s.end, bs) for s in specs]) if specs else torch.zeros(0)
            below = [slots_of(s, 0, s.start, bs) for s in specs if s.start > 0]
            guarded = torch.unique(torch.cat(below)) if below else torch.zeros(0, dtype=torch.int64)
            guarded = guarded[~torch.isin(guarded, owned)]
            guard["slots"] = guarded if guarded.numel() else None

        def checked_start_load(self, specs):
            specs = list(specs)
            guard_below(self, specs)
            before_load(self, specs)
            failed_blocks, failed_reqs = orig_start_load(self, specs)
            torn(self, failed_blocks)
            return failed_blocks, failed_reqs

        def checked_run_parked(self, specs, after=None, batched=False):
            """Parked loads: inline ones run here (main thread, guarded); background ones in the
            load thread, beside the forward: no sentinels there (the forward may read those
            slots), the plan check above still holds."""
            specs = list(specs)
            main = threading.current_thread() is threading.main_thread()
            if main:
                guard_below(self, specs)
            before_load(self, specs)
            try:
                reqs, failed_blocks, ld = orig_run_parked(self, specs, after, batched)
            finally:
                if main:
                    guard["slots"] = None
            torn(self, failed_blocks)
            return reqs, failed_blocks, ld

        def checked_finish_load(self):
            guard["slots"] = None
            return orig_finish_load(self)

        def checked_scatter(paged, mapping, chunks, skip=0, **kw):
            """Every copy of a guarded load: sentinels in the step's guarded slots around it,
            their contents restored after. Safe: the engine runs in-process on CPU and this
            is the main thread, so nothing reads the cache while the copy runs."""
            guarded = guard["slots"]
            if (guarded is None or paged.device.type == "cuda"
                    or threading.current_thread() is not threading.main_thread()):
                return kv_scatter(paged, mapping, chunks, skip, **kw)
            snap = torch.zeros(paged.chunk_shape(guarded.numel()), dtype=paged.dtype)
            kv_gather(paged, guarded, [snap]).wait()
            kv_scatter(paged, guarded, [torch.full_like(snap, SENTINEL)]).wait()
            try:
                return kv_scatter(paged, mapping, chunks, skip, **kw)
            finally:
                now = torch.zeros_like(snap)
                kv_gather(paged, guarded, [now]).wait()
                counters["overlap_checks"] += 1
                if not (now == SENTINEL).all():
                    counters["overlap_violations"] += 1
                    changed = (now != SENTINEL).reshape(-1, guarded.numel()).any(0)
                    print(f"kvtier overlap violation: slots {guarded[changed].tolist()} (layers "
                          f"{kw.get('layers')})", file=sys.stderr, flush=True)
                kv_scatter(paged, guarded, [snap]).wait()

        orig_gather = kv_worker.gather
        orig_fence = kv_worker.KVWorker.fence_saves
        delay_streams: dict = {}

        def slow_gather(paged, mapping, chunks, skip=0, **kw):
            if "slow_saves" not in faults or paged.device.type != "cuda":
                return orig_gather(paged, mapping, chunks, skip, **kw)
            s = delay_streams.get(str(paged.device))
            if s is None:
                s = delay_streams[str(paged.device)] = torch.cuda.Stream(paged.device)
            s.wait_stream(torch.cuda.current_stream(paged.device))
            with torch.cuda.stream(s):  # the copy waits for this stream: the forward is not slowed
                torch.cuda._sleep(int(fault_args.get("cycles", 50_000_000)))
                counters["slowed_saves"] += 1
                return orig_gather(paged, mapping, chunks, skip, **kw)

        def counted_fence(self, kept=None, fresh=None):
            if "no_fence" in faults and (kept, fresh) != (None, None):  # drain_saves still drains
                return None
            pending = [fut for _, fut in self._saving if not fut.done()]
            orig_fence(self, kept, fresh)
            left = {id(fut) for _, fut in self._saving}
            counters["save_fences"] += sum(1 for fut in pending if id(fut) not in left)

        kv_worker.gather = slow_gather
        kv_worker.KVWorker.fence_saves = counted_fence
        kv_worker.KVWorker.start_load = checked_start_load
        kv_worker.KVWorker._run_parked = checked_run_parked
        kv_worker.KVWorker._plan_loads_now = checked_plan
        kv_worker.KVWorker.finish_load = checked_finish_load
        kv_worker.scatter = checked_scatter
    if cfg.get("lmcache"):
        _lossy_lmcache(faults, fault_args, loss, counters)
    try:
        opts = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="float32", disable_log_stats=True)
        opts.update(kw)  # a GPU run may turn CUDA graphs on (enforce_eager=False)
        llm = LLM(model=cfg["model"], **opts)
    except Exception as e:  # report start-up failures to the parent (bad config tests)
        _reply({"error": str(e), "type": type(e).__name__})
        return
    _reply({"ok": True})
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "quit":
            shutdown_engine(llm)
            break
        try:
            if cmd == "generate":
                if req.get("reset"):
                    reset_prefix_cache(llm)
                mt = req["max_tokens"]
                mts = mt if isinstance(mt, list) else [mt] * len(req["prompts"])
                sps = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in mts]
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], sps,
                                    use_tqdm=False)
                _reply({"outputs": [list(o.outputs[0].token_ids) for o in outs],
                        "cached": [o.num_cached_tokens for o in outs],
                        "finish": [str(o.outputs[0].finish_reason) for o in outs]})
            elif cmd == "stats":
                from kvtier.vllm.connector import INSTANCES

                st = {"counters": counters, "events": events, "ledger": {}, "worker": {}, "store": {}}
                for c in INSTANCES:
                    if c.ledger is not None:
                        st["ledger"] = dict(c.ledger.stats)
                        # What the worker's save fence goes by (KVWorker.fence_saves).
                        st["fence_rule"] = "fresh blocks" if c._sees_all_allocations else "kept requests"
                    if c.worker is not None:
                        st["worker"] = dict(c.worker.stats)
                    m = c.store.metrics
                    st["store"] = {"load_errors": m.value("kvtier_load_errors_total"),
                                   "saved_chunks": m.value("kvtier_saved_chunks_total"),
                                   "writer": getattr(c.store, "writer", None)}
                    for tier in c.store.tiers:
                        s = tier.stats()
                        st["store"][f"{s.name}_corrupt"] = s.corrupt
                        st["store"][f"{s.name}_errors"] = s.errors
                        st["store"][f"{s.name}_evictions"] = s.evictions
                        st["store"][f"{s.name}_chunks"] = s.chunks
                        st["store"][f"{s.name}_puts"] = s.puts
                        st["store"][f"{s.name}_hits"] = s.hits
                _reply(st)
            elif cmd == "fault":
                loss["rnd"] = None
                fault_args.clear()
                faults.clear()
                faults.update(req.get("faults", []))
                fault_args.update(req.get("args", {}))
                _reply({"ok": True})
            elif cmd == "staggered":
                _reply(_staggered(llm, req["prompts"], req["max_tokens"], req["after_tokens"]))
            elif cmd == "reset_while_held":
                _reply(_reset_while_held(llm, req["prompt"]))
            elif cmd == "abort_while_loading":
                _reply(_abort_while_loading(llm, req["prompts"], req["abort"], req["max_tokens"]))
            elif cmd == "flush":
                from kvtier.vllm.connector import INSTANCES

                for c in INSTANCES:
                    if c.worker is not None:
                        c.worker.drain_saves()
                    c.store.flush(30)
                _reply({"ok": True})
            else:
                _reply({"error": f"unknown command {cmd}", "type": "ValueError"})
        except Exception as e:
            import traceback

            traceback.print_exc()
            _reply({"error": str(e), "type": type(e).__name__})


def _lose_next(loss: dict, fault_args: dict) -> bool:
    """``lose_chunks`` at random: whether the next chunk is lost (probability ``p``), from the
    generator seeded with ``seed`` at the first draw after the fault was set. The caller holds its lock."""
    if loss["rnd"] is None:
        loss["rnd"] = random.Random(fault_args.get("seed", 0))
    return loss["rnd"].random() < fault_args.get("p", 0.15)


def _lossy_lmcache(faults: set[str], fault_args: dict, loss: dict, counters: dict) -> None:
    """``lose_chunks`` for LMCache 0.5.3, as for kvtier: chunks its ``StorageManager.batched_get``
    returns become misses, at random (``p``, ``seed``), which is LMCache's own path for a chunk it
    found at lookup and cannot read at load ("in the storage, but it can't be retrieved"): its retrieve
    stops at the first such chunk and its adapter reports the blocks after it to vLLM as invalid. Those
    blocks then get noise (a torn load), so a block reported but not recomputed shows in the output."""
    import torch
    from lmcache.v1.cache_engine import LMCacheEngine
    from lmcache.v1.storage_backend.storage_manager import StorageManager

    real_get, real_retrieve = StorageManager.batched_get, LMCacheEngine.retrieve
    lock = threading.Lock()

    def batched_get(self, keys, location=None):
        got = real_get(self, keys, location)
        if "lose_chunks" not in faults:
            return got
        got = list(got)
        with lock:
            for i, obj in enumerate(got):
                if obj is not None and _lose_next(loss, fault_args):
                    obj.ref_count_down()  # what LMCache does with a chunk it will not use
                    got[i] = None
                    counters["faults_injected"] += 1
        return got

    def retrieve(self, tokens, mask=None, **kw):
        got = real_retrieve(self, tokens, mask, **kw)
        if "lose_chunks" in faults:
            wanted = torch.ones(len(tokens), dtype=torch.bool) if mask is None else mask.cpu().bool()
            lost = wanted & ~got.cpu().bool()
            if lost.any():
                slots = kw["slot_mapping"][lost.to(kw["slot_mapping"].device)]
                for kv in kw["kvcaches"]:  # vLLM's layouts: (2, blocks, block size, ...) or (blocks, 2, ...)
                    bs = kv.shape[2]
                    blocks, offsets = slots // bs, slots % bs
                    if kv.shape[0] == 2:
                        kv[:, blocks, offsets] = torch.randn_like(kv[:, blocks, offsets])
                    else:
                        kv[blocks, :, offsets] = torch.randn_like(kv[blocks, :, offsets])
                counters["torn_tokens"] = counters.get("torn_tokens", 0) + int(lost.sum())
        return got

    StorageManager.batched_get = batched_get
    LMCacheEngine.retrieve = retrieve


def _staggered(llm, prompts: list[list[int]], max_tokens: list[int], after_tokens: list[int]) -> dict:
    """Step the in-process engine by hand, adding prompt i once prompt i-1 has generated
    ``after_tokens[i]`` tokens (a request arriving while others decode); outputs in prompt order."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    reset_prefix_cache(llm)
    ids = [str(10**9 + time.monotonic_ns() % 10**6 * 100 + i) for i in range(len(prompts))]
    outputs: dict[str, list[int]] = {}
    added = 0
    deadline = time.monotonic() + 300
    while (added < len(prompts) or eng.has_unfinished_requests()) and time.monotonic() < deadline:
        while added < len(prompts) and (added == 0 or len(outputs.get(ids[added - 1], ())) >= after_tokens[added]):
            sp = SamplingParams(max_tokens=max_tokens[added], temperature=0.0, ignore_eos=True)
            eng.add_request(ids[added], TokensPrompt(prompt_token_ids=prompts[added]), sp)
            added += 1
        for o in eng.step():
            outputs[o.request_id.split("-")[0]] = list(o.outputs[0].token_ids)
    return {"outputs": [outputs.get(i) for i in ids]}


def _reset_while_held(llm, prompt: list[int]) -> dict:
    """Reset vLLM's prefix cache while a request holds blocks: vLLM refuses, reset_prefix_cache
    steps the engine until it agrees; then ``prompt`` again finds nothing cached."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)  # its blocks are cached
    eng = llm.llm_engine
    eng.add_request(str(10**9 + 7), TokensPrompt(prompt_token_ids=prompt[: len(prompt) // 2]),
                    SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    while not any(o.outputs and o.outputs[0].token_ids for o in eng.step()):
        pass
    refused = llm.reset_prefix_cache()
    tries = reset_prefix_cache(llm)
    (again,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)
    return {"plain_reset": refused, "tries": tries, "cached_after": again.num_cached_tokens}


def _abort_while_loading(llm, prompts: list[list[int]], abort: int, max_tokens: int) -> dict:
    """Step the in-process engine by hand: add ``prompts``, abort prompt ``abort`` once vLLM
    parked it for its kvtier load, finish the others. Returns their outputs and what the
    aborted request held (vLLM's free blocks and kvtier's free host slots) before and after."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.request import RequestStatus

    from kvtier.vllm.connector import INSTANCES

    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    stores = {id(c.store): c.store for c in INSTANCES}
    host = lambda: sum(st.pool.free_slots for st in stores.values())  # noqa: E731
    reset_prefix_cache(llm)
    before = {"free_blocks": pool.get_num_free_blocks(), "free_host_slots": host()}
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [str(10**9 + time.monotonic_ns() % 10**6 * 100 + i) for i in range(len(prompts))]  # LLM parses ids as ints
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, TokensPrompt(prompt_token_ids=p), sp)
    victim, parked, steps = ids[abort], False, 0
    outputs: dict[str, list[int]] = {}

    def step() -> None:
        for o in eng.step():
            if o.finished:
                outputs[o.request_id.split("-")[0]] = list(o.outputs[0].token_ids)

    while steps < 500:
        r = next((q for i, q in sched.requests.items() if i == victim or i.startswith(victim + "-")), None)
        if r is not None and r.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            parked = True
            break
        step()
        steps += 1
    eng.abort_request([victim])
    deadline = time.monotonic() + 120
    while eng.has_unfinished_requests() and time.monotonic() < deadline:
        step()
        steps += 1
    workers = [c.worker for c in INSTANCES if c.worker is not None]
    for w in workers:
        w.drain_parked()
    # The engine hears of the aborted request's finished load at its next step.
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:8])], SamplingParams(max_tokens=1), use_tqdm=False)
    llm.reset_prefix_cache()
    after = {"free_blocks": pool.get_num_free_blocks(), "free_host_slots": host()}
    return {"parked": parked, "before": before, "after": after,
            "outputs": [outputs.get(i) for i in ids], "finished_ids": sorted(outputs), "steps": steps,
            "jobs_left": sum(len(w._jobs) + len(w._landing) for w in workers),
            "pending_left": sum(len(w._pending) for w in workers),
            "leases": sum(len(st._leases) for st in stores.values())}


if __name__ == "__main__":
    # Replies go to the original stdout; everything else the engine prints goes to stderr.
    _OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _child(json.loads(sys.argv[1]))
    os._exit(0)  # do not wait on engine threads at exit
