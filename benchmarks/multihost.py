"""Three hosts on one machine share one store (Redis Cluster or Mooncake); a node is lost mid-run (issue 26.3).

Three network namespaces (hosts A, B, C) on a bridge (:mod:`kvtier.local_netns`), a shared store
spread over them (multihost_stores.py), and a vLLM CPU engine with kvtier (``tiers: [cpu, redis]``
or ``[cpu, mooncake]``) on each host, all on the same tiny random-weight Llama:

1. reference: every request on vLLM alone (root namespace), greedy;
2. host A computes ``--prefixes`` prompts of 4 chunks each (their chunks go to the shared store);
3. B and C serve a stream of requests, one at a time each: prefix ``i`` with a suffix of their
   own, so every prefix is new to the engine (its cpu tier does not hold it) and its hit is what
   came from the shared store; C serves prefix ``i`` only once B has served prefix ``i + --lag`` (B is
   always the first of the two to read a prefix);
4. when B has served ``--kill-after`` requests, a node on host C gets SIGKILL. ``--tier redis``: a
   primary. With ``--replicas 0`` (3 primaries) its slots are lost: the tier answers misses for them and the
   engines recompute; after ``--down-s`` seconds the node comes back, empty, and what B recomputes
   from then on is saved again, so C (behind B) finds it whole. With ``--replicas 1`` (3 primaries
   + 3 replicas, each replica on another host than its primary) the cluster fails over and the
   hit rate comes back by itself. ``--loss link`` takes host C's network down instead (its node
   unanswered rather than refused, host C's engine cut off; back after ``--down-s`` without
   replicas, whole). ``--tier mooncake``: host C's segment holder (the engines hold
   no segment); its chunks fail to load (recomputed) until the master drops the segment after
   ``--client-ttl-s``, then they are misses, and what B recomputes is saved to the other segments.
   With ``--loss link`` a read from C's segment hangs (Mooncake's calls take no timeout): kvtier's
   store stops waiting after ``op_timeout_s`` and skips the tier until the call returns.

Every output is compared token for token with the reference; each request's hit (prompt tokens
vLLM took from kvtier, its prefix cache reset before each request) and the shared tier's chunk
hits are recorded with their times relative to the kill (a request straddling the kill counts
after it). A request's hit is what kvtier's worker loaded into the paged cache: vLLM's own count
(``num_cached_tokens``) includes tokens whose load failed and were recomputed (``promised_tokens``
here). ``load_policy: always``: on this CPU engine recomputing a tiny model's prefix is cheaper
than a Redis read, and the run is about which chunks are found, not whether loading them pays.

Run as root, one engine at a time on the box (three engines inside one lock):

    flock /tmp/kvtier-engine.lock .venv/bin/python benchmarks/multihost.py --tier redis --replicas 0 \\
        --json benchmarks/results/multihost_cpu2.json

(benchmarks/multihost.sh runs every layout.)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, merge_json

sys.path.insert(0, str(ROOT / "tests" / "vllm"))
from engine_proc import EngineProc  # noqa: E402

from multihost_stores import MooncakeStore, RedisStore  # noqa: E402

from kvtier.local_netns import Hosts, namespaces_supported  # noqa: E402
from kvtier.local_redis import redis_server_binary  # noqa: E402
from kvtier.models import make_random_llama  # noqa: E402

CHUNK = 256
PREFIX_CHUNKS = 4
SUFFIX = 16
MAX_TOKENS = 8
ENGINE = dict(block_size=32, enable_prefix_caching=True, max_num_batched_tokens=512, num_gpu_blocks_override=256,
              max_model_len=2048, seed=0)


def make_workload(n: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Prefixes, and the prompts of A (one per prefix) and of B's and C's streams (prefix + own suffix)."""
    rnd = random.Random(seed)
    toks = lambda k: [rnd.randrange(10, 1000) for _ in range(k)]  # noqa: E731
    prefixes = [toks(CHUNK * PREFIX_CHUNKS) for _ in range(n)]
    return {host: [p + toks(SUFFIX) for p in prefixes] for host in ("A", "B", "C")}


def divergent(got: list[int] | None, ref: list[int]) -> int:
    """Tokens of ``got`` that differ from ``ref`` (a missing answer: all of them)."""
    if got is None:
        return len(ref)
    return sum(a != b for a, b in zip(got, ref)) + abs(len(got) - len(ref))


class Stream(threading.Thread):
    """One host serving its prompts one request at a time; a row per request."""

    def __init__(self, name: str, engine: EngineProc, tier: str, prompts: list[list[int]], refs: list[list[int]],
                 t0: float, follow: "Stream | None" = None, lag: int = 0) -> None:
        """``tier``: the shared tier whose hits are counted. ``follow``, ``lag``: request ``i`` waits
        until ``follow`` has served ``i + lag`` requests."""
        super().__init__(name=name, daemon=True)
        self.engine, self.prompts, self.refs, self.t0 = engine, prompts, refs, t0
        self.hits_key = f"{tier}_hits"
        self.follow, self.lag = follow, lag
        self.rows: list[dict] = []
        self.served = threading.Condition()
        self.error: str | None = None

    def run(self) -> None:
        before = self._counts()
        for i, prompt in enumerate(self.prompts):
            if self.follow is not None:
                self.follow.wait_served(min(i + self.lag, len(self.follow.prompts)))
            t = time.monotonic()
            try:
                got = self.engine.generate([prompt], MAX_TOKENS, reset=True)
                out, cached = got["outputs"][0], got["cached"][0]
            except Exception as e:  # noqa: BLE001 - an unanswered request is counted, not fatal here
                out, cached, self.error = None, 0, f"{type(e).__name__}: {e}"
            end = time.monotonic()
            now = self._counts()
            row = {"i": i, "start_s": round(t - self.t0, 3), "end_s": round(end - self.t0, 3),
                   "hit_tokens": now["loaded_tokens"] - before["loaded_tokens"], "promised_tokens": cached,
                   "failed_chunks": now["failed_chunks"] - before["failed_chunks"],
                   "shared_chunks": now["shared"] - before["shared"],
                   "divergent_tokens": divergent(out, self.refs[i]), "answered": out is not None}
            before = now
            with self.served:
                self.rows.append(row)
                self.served.notify_all()

    def _counts(self) -> dict:
        st = self.engine.stats()
        return {"loaded_tokens": st["worker"]["loaded_tokens"], "failed_chunks": st["worker"]["failed_chunks"],
                "shared": st["store"][self.hits_key]}

    def wait_served(self, n: int) -> None:
        """Until ``n`` requests are served, or the thread ended (polled: it may end without notifying)."""
        with self.served:
            while not self.served.wait_for(lambda: len(self.rows) >= n or not self.is_alive(), timeout=1.0):
                pass


def full_hit(row: dict) -> bool:
    """The whole prefix loaded, no chunk failed."""
    return row["hit_tokens"] >= CHUNK * PREFIX_CHUNKS and not row["failed_chunks"]


def summarize(rows: list[dict], lo: float, hi: float) -> dict:
    """Counts of the requests that ended in [lo, hi) seconds (one that ran across the kill counts after it)."""
    sel = [r for r in rows if lo <= r["end_s"] < hi]
    lat = [round(r["end_s"] - r["start_s"], 3) for r in sel]
    prefix = CHUNK * PREFIX_CHUNKS
    return {"requests": len(sel), "answered": sum(r["answered"] for r in sel),
            "prefix_tokens": prefix * len(sel), "hit_tokens": sum(r["hit_tokens"] for r in sel),
            "shared_tier_hit_tokens": CHUNK * sum(r["shared_chunks"] for r in sel),
            "promised_tokens": sum(r["promised_tokens"] for r in sel),
            "failed_chunks": sum(r["failed_chunks"] for r in sel),
            "hit_rate": round(sum(r["hit_tokens"] for r in sel) / (prefix * len(sel)), 3) if sel else None,
            "full_hits": sum(full_hit(r) for r in sel),
            "divergent_tokens": sum(r["divergent_tokens"] for r in sel),
            "median_s": round(statistics.median(lat), 3) if lat else None, "max_s": max(lat, default=None)}


def recovered_at(rows: list[dict], after: float, min_streak: int = 8) -> float | None:
    """Start time of the first request from which on every request (started after ``after``) hit in
    full, if at least ``min_streak`` did (a prefix whose chunks all live on other nodes hits in full
    by chance: 4 chunks, 2 of 3 nodes left: 20 %; 8 in a row: 3e-6)."""
    later = sorted((r for r in rows if r["start_s"] >= after), key=lambda r: r["start_s"])
    streak: list[dict] = []
    for r in later:
        streak = streak + [r] if full_hit(r) else []
    return streak[0]["start_s"] if len(streak) >= min_streak else None


def refill(rows: dict[str, list[dict]], since: float) -> dict:
    """C's requests from ``since`` on (the node back, or the lost segment dropped), split by whether
    B read the same prefix before or after ``since``: a chunk lost with the node comes back when
    a host recomputes it and the store takes the write again."""
    b_start = {r["i"]: r["start_s"] for r in rows["B"]}
    out = {}
    for name, after in (("b_read_before", False), ("b_read_after", True)):
        sel = [r for r in rows["C"] if r["start_s"] >= since and (b_start.get(r["i"], -1) >= since) == after]
        out[name] = {"requests": len(sel), "full_hits": sum(full_hit(r) for r in sel)}
    return out


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kvtier-multihost-"))
    model = make_random_llama(work / "model", "tiny")
    prompts = make_workload(args.prefixes)
    logs = work / "logs"
    logs.mkdir()
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "tier": args.tier,
                    "prefixes": args.prefixes, "prefix_tokens": CHUNK * PREFIX_CHUNKS, "suffix_tokens": SUFFIX,
                    "max_tokens": MAX_TOKENS, "engine": ENGINE, "cpu_count": os.cpu_count(), "logs": str(logs)}

    t = time.monotonic()
    ref = EngineProc(model, ENGINE, None, log_path=str(logs / "reference.log"), timeout=900)
    refs: dict[str, list[list[int]]] = {"A": []}
    for i in range(0, args.prefixes, args.batch):  # A's prompts in A's batches, B's and C's one by one
        refs["A"] += ref.generate(prompts["A"][i:i + args.batch], MAX_TOKENS, reset=True)["outputs"]
    for host in ("B", "C"):
        refs[host] = [ref.generate([p], MAX_TOKENS, reset=True)["outputs"][0] for p in prompts[host]]
    ref.close()
    result["reference"] = {"s": round(time.monotonic() - t, 1), "requests": sum(len(v) for v in refs.values())}
    print(f"reference: {result['reference']}", flush=True)

    with Hosts(3, tag="kvtmh", subnet="10.77.0") as hosts:
        if args.tier == "redis":
            store = RedisStore(hosts, args.replicas, args.node_timeout_ms, args.down_s, args.loss)
        else:
            store = MooncakeStore(hosts, args.segment_mib << 20, args.client_ttl_s, args.down_s, args.loss)
        engines: dict[str, EngineProc] = {}
        try:
            result["store"] = store.describe()
            kvtier = {"chunk_size": CHUNK, "tiers": ["cpu", store.tier], "cpu_bytes": "256MiB",
                      "load_policy": "always", **store.kvtier()}
            result["kvtier"] = kvtier
            t = time.monotonic()
            for i, host in enumerate("ABC"):
                engines[host] = EngineProc(model, ENGINE, kvtier, log_path=str(logs / f"host{host}.log"),
                                           wait=False, timeout=900, wrap=hosts.wrap(i),
                                           env={"VLLM_HOST_IP": hosts.addr(i)})
            for e in engines.values():
                e.wait_ready()
            result["engines_up_s"] = round(time.monotonic() - t, 1)
            result.update(serve(args, store, engines, prompts, refs))
        finally:
            for e in engines.values():
                e.close()
            store.close()
    return result


def serve(args: argparse.Namespace, store: RedisStore | MooncakeStore, engines: dict[str, EngineProc],
          prompts: dict[str, list[list[int]]], refs: dict[str, list[list[int]]]) -> dict:
    out: dict = {}
    a = engines["A"]
    t = time.monotonic()
    div = 0
    for i in range(0, args.prefixes, args.batch):
        got = a.generate(prompts["A"][i:i + args.batch], MAX_TOKENS, reset=True)["outputs"]
        div += sum(divergent(g, r) for g, r in zip(got, refs["A"][i:i + args.batch]))
    a.call("flush")  # A's chunks written behind: all in the shared store before B and C ask
    st = a.stats()["store"]
    out["host_a"] = {"s": round(time.monotonic() - t, 2), "requests": args.prefixes, "divergent_tokens": div,
                     "saved_chunks": st["saved_chunks"], "shared_tier_puts": st[f"{store.tier}_puts"]}
    print(f"host A: {out['host_a']}", flush=True)

    t0 = time.monotonic()
    b = Stream("B", engines["B"], store.tier, prompts["B"], refs["B"], t0)
    c = Stream("C", engines["C"], store.tier, prompts["C"], refs["C"], t0, follow=b, lag=args.lag)
    b.start()
    c.start()
    b.wait_served(args.kill_after)
    lost = store.lose()
    killed = time.monotonic() - t0
    events: dict = {"killed": lost, "kill_s": round(killed, 3)}
    print(f"killed {lost} at {killed:.1f} s", flush=True)
    events.update(store.after_loss(t0))
    print(f"after the loss: {events}", flush=True)
    b.join()
    c.join()
    rows = {"B": b.rows, "C": c.rows}
    both = b.rows + c.rows
    back = events.get("failover_s") or events.get("back_s") or events.get("segment_dropped_s") or killed
    rec = {h: recovered_at(r, killed) for h, r in rows.items()}
    events["recovered_s"] = rec
    events["recovery_after_kill_s"] = {h: None if t is None else round(t - killed, 3) for h, t in rec.items()}
    end = max(r["end_s"] for r in both) + 1
    out["hit_rate_by_2s"] = {h: [summarize(r, lo, lo + 2)["hit_rate"] for lo in range(0, int(end) + 1, 2)]
                             for h, r in rows.items()}
    out["events"] = events
    if events.get("back_s") or events.get("segment_dropped_s"):
        out["refill"] = refill(rows, events.get("back_s") or events["segment_dropped_s"])
    out["phases"] = {
        "before_loss": {h: summarize(r, 0, killed) for h, r in rows.items()},
        "node_down": {h: summarize(r, killed, back) for h, r in rows.items()},
        "after": {h: summarize(r, back, end) for h, r in rows.items()},
    }
    out["totals"] = {"requests": len(both), "answered": sum(r["answered"] for r in both),
                     "divergent_tokens": sum(r["divergent_tokens"] for r in both),
                     "load_errors": {h: e.stats()["store"]["load_errors"] for h, e in engines.items()},
                     "stream_errors": [s.error for s in (b, c) if s.error]}
    out["stats"] = {h: e.stats()["store"] for h, e in engines.items()}
    out["timeline"] = rows
    return out


def replicated(args: argparse.Namespace) -> bool:
    return args.tier == "redis" and args.replicas > 0


def check(result: dict, args: argparse.Namespace) -> list[str]:
    """What the run must show; each line a failure."""
    bad = []
    tot = result["totals"]
    if tot["answered"] != tot["requests"]:
        bad.append(f"{tot['requests'] - tot['answered']} requests unanswered: {tot['stream_errors']}")
    if tot["divergent_tokens"] or result["host_a"]["divergent_tokens"]:
        bad.append(f"divergent tokens: {tot['divergent_tokens']} (B, C), {result['host_a']['divergent_tokens']} (A)")
    for host, s in result["phases"]["before_loss"].items():
        if s["full_hits"] != s["requests"]:
            bad.append(f"host {host}: {s['requests'] - s['full_hits']} requests before the loss missed "
                       f"part of a prefix host A had computed")
    down = [s for s in result["phases"]["node_down"].values() if s["requests"]]
    if down and all(s["full_hits"] == s["requests"] for s in down) and not replicated(args):
        bad.append("no request missed while a node was down: was anything lost?")
    # With a replica the cluster fails over and both hosts recover; without, the node comes back
    # empty and only C (behind B) finds what B recomputed since then: B's first reads miss.
    must = ("B", "C") if replicated(args) else ("C",)
    if args.loss == "link" and args.tier == "redis":  # host C is cut off; B's view: failover, or the node back whole
        must = ("B",)
    # Mooncake: the master drops the silent segment whatever silenced it, so a lost link loses C's
    # share as a kill does; C (behind B) finds what B recomputed.
    for host in must:
        if result["events"]["recovered_s"][host] is None:
            bad.append(f"host {host}: the hit rate did not recover by the end of the stream (more --prefixes?)")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tier", default="redis", choices=("redis", "mooncake"))
    ap.add_argument("--replicas", type=int, default=0, choices=(0, 1), help="redis: a replica per primary")
    ap.add_argument("--loss", default="kill", choices=("kill", "link"),
                    help="SIGKILL host C's redis primary / mooncake segment holder, or take host C's network "
                         "down (back after --down-s)")
    ap.add_argument("--prefixes", type=int, default=120, help="prefixes (and requests per stream)")
    ap.add_argument("--batch", type=int, default=8, help="host A's requests per generate call")
    ap.add_argument("--lag", type=int, default=4, help="C serves prefix i once B has served prefix i + lag")
    ap.add_argument("--kill-after", type=int, default=30, help="B's requests served before the node is killed")
    ap.add_argument("--down-s", type=float, default=8.0, help="--replicas 0: seconds before the node comes back")
    ap.add_argument("--node-timeout-ms", type=int, default=2000, help="cluster-node-timeout (failover detection)")
    ap.add_argument("--segment-mib", type=int, default=256, help="mooncake: MiB of each host's segment")
    ap.add_argument("--client-ttl-s", type=int, default=10,
                    help="mooncake: seconds after which the master drops a silent segment (its default)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default=None, help="key in the JSON file (default: redis_replicasN / mooncake)")
    args = ap.parse_args()
    reason = namespaces_supported()
    if not reason and args.tier == "redis" and redis_server_binary() is None:
        reason = "redis-server is not installed (apt-get install -y redis-server)"
    if not reason and args.tier == "mooncake":
        from kvtier.local_mooncake import mooncake_binary

        if mooncake_binary("mooncake_master") is None:
            reason = "mooncake_master not found: pip install 'kvtier[mooncake]' (and apt-get install -y libibverbs1)"
    if reason:
        print(f"multihost: cannot run here: {reason}")
        return 2
    # SIGTERM (a timeout, ^C of a wrapper) unwinds like ^C, so the namespaces and servers are removed.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = run(args)
    result["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip()
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    failures = check(result, args)
    result["failures"] = failures
    label = args.label or (f"redis_replicas{args.replicas}" if args.tier == "redis" else "mooncake")
    label += "_link" if args.loss == "link" else ""
    merge_json(args.json, label, result)
    for phase, per_host in result["phases"].items():
        for host, s in per_host.items():
            print(f"{phase:12s} {host}: {s}")
    print(f"events: {result['events']}")
    print(f"totals: {result['totals']}")
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
