"""Three hosts on one machine share one Redis Cluster; a node is lost mid-run (issue 26.3).

Three network namespaces (hosts A, B, C) on a bridge (:mod:`kvtier.local_netns`), a Redis Cluster
with its nodes spread over them, and a vLLM CPU engine with kvtier (``tiers: [cpu, redis]``) on
each host, all on the same tiny random-weight Llama:

1. reference: every request on vLLM alone (root namespace), greedy;
2. host A computes ``--prefixes`` prompts of 4 chunks each (their chunks go to the cluster);
3. B and C serve a stream of requests, one at a time each: prefix ``i`` with a suffix of their
   own, so every prefix is new to the engine (its cpu tier does not hold it) and its hit is what
   came from Redis; C serves prefix ``i`` only once B has served prefix ``i + --lag`` (B is
   always the first of the two to read a prefix);
4. when B has served ``--kill-after`` requests, one Redis primary on host C gets SIGKILL. With
   ``--replicas 0`` (3 primaries) its slots are lost: the tier answers misses for them and the
   engines recompute; after ``--down-s`` seconds the node comes back, empty, and what B recomputes
   from then on is saved again, so C (behind B) finds it whole. With ``--replicas 1`` (3 primaries
   + 3 replicas, each replica on another host than its primary) the cluster fails over and the
   hit rate comes back by itself.

Every output is compared token for token with the reference; each request's hit (prompt tokens
vLLM took from kvtier, its prefix cache reset before each request) and the redis tier's chunk
hits are recorded with their times relative to the kill. ``load_policy: always``: on this CPU
engine recomputing a tiny model's prefix is cheaper than a Redis read, and the run is about which
chunks are found, not whether loading them pays.

Run as root, one engine at a time on the box (three engines inside one lock):

    flock /tmp/kvtier-engine.lock .venv/bin/python benchmarks/multihost.py --replicas 0 \\
        --json benchmarks/results/multihost_cpu2.json
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

from kvtier.local_netns import Hosts, namespaces_supported  # noqa: E402
from kvtier.local_redis import RedisClusterProcs, redis_server_binary  # noqa: E402
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

    def __init__(self, name: str, engine: EngineProc, prompts: list[list[int]], refs: list[list[int]],
                 t0: float, follow: "Stream | None" = None, lag: int = 0) -> None:
        """``follow``, ``lag``: request ``i`` waits until ``follow`` has served ``i + lag`` requests."""
        super().__init__(name=name, daemon=True)
        self.engine, self.prompts, self.refs, self.t0 = engine, prompts, refs, t0
        self.follow, self.lag = follow, lag
        self.rows: list[dict] = []
        self.served = threading.Condition()
        self.error: str | None = None

    def run(self) -> None:
        hits = self.engine.stats()["store"]["redis_hits"]
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
            st = self.engine.stats()["store"]
            row = {"i": i, "start_s": round(t - self.t0, 3), "end_s": round(end - self.t0, 3),
                   "hit_tokens": cached, "redis_chunks": st["redis_hits"] - hits,
                   "divergent_tokens": divergent(out, self.refs[i]), "answered": out is not None,
                   "load_errors_so_far": st["load_errors"]}
            hits = st["redis_hits"]
            with self.served:
                self.rows.append(row)
                self.served.notify_all()

    def wait_served(self, n: int) -> None:
        """Until ``n`` requests are served, or the thread ended (polled: it may end without notifying)."""
        with self.served:
            while not self.served.wait_for(lambda: len(self.rows) >= n or not self.is_alive(), timeout=1.0):
                pass


def primaries(cluster: RedisClusterProcs) -> dict[int, int | None]:
    """Node index -> index of the node it replicates (None for a primary), as a live node sees it."""
    node = next(s for s in cluster.nodes if s.alive())
    with node.client() as c:
        view = c.execute_command("CLUSTER NODES")
    ids = {v["node_id"]: addr for addr, v in view.items()}
    index = {f"{s.host}:{s.port}": i for i, s in enumerate(cluster.nodes)}
    out: dict[int, int | None] = {}
    for addr, v in view.items():
        addr = addr.split("@")[0]
        if "master" in v["flags"] and "fail" not in v["flags"]:
            out[index[addr]] = None
        elif "slave" in v["flags"]:
            out[index[addr]] = index.get(ids.get(v["master_id"], "").split("@")[0])
    return out


def summarize(rows: list[dict], lo: float, hi: float) -> dict:
    """Counts of the requests that ended in [lo, hi) seconds (one that ran across the kill counts after it)."""
    sel = [r for r in rows if lo <= r["end_s"] < hi]
    lat = [round(r["end_s"] - r["start_s"], 3) for r in sel]
    prefix = CHUNK * PREFIX_CHUNKS
    return {"requests": len(sel), "answered": sum(r["answered"] for r in sel),
            "prefix_tokens": prefix * len(sel), "hit_tokens": sum(r["hit_tokens"] for r in sel),
            "redis_hit_tokens": CHUNK * sum(r["redis_chunks"] for r in sel),
            "hit_rate": round(sum(r["hit_tokens"] for r in sel) / (prefix * len(sel)), 3) if sel else None,
            "full_hits": sum(r["hit_tokens"] >= prefix for r in sel),
            "divergent_tokens": sum(r["divergent_tokens"] for r in sel),
            "median_s": round(statistics.median(lat), 3) if lat else None, "max_s": max(lat, default=None)}


def recovered_at(rows: list[dict], after: float, min_streak: int = 8) -> float | None:
    """Start time of the first request from which on every request (started after ``after``) hit in
    full, if at least ``min_streak`` did (a prefix whose chunks all live on other nodes hits in full
    by chance: 4 chunks, 2 of 3 nodes left: 20 %; 8 in a row: 3e-6)."""
    prefix = CHUNK * PREFIX_CHUNKS
    later = sorted((r for r in rows if r["start_s"] >= after), key=lambda r: r["start_s"])
    streak: list[dict] = []
    for r in later:
        streak = streak + [r] if r["hit_tokens"] >= prefix else []
    return streak[0]["start_s"] if len(streak) >= min_streak else None


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kvtier-multihost-"))
    model = make_random_llama(work / "model", "tiny")
    prompts = make_workload(args.prefixes)
    logs = work / "logs"
    logs.mkdir()
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "replicas": args.replicas,
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
        n_nodes = 3 * (1 + args.replicas)
        where = [(hosts.addr(i), hosts.wrap(i)) for i in range(3)]
        with RedisClusterProcs(n_nodes, hosts=where, replicas=args.replicas,
                               node_timeout_ms=args.node_timeout_ms) as cluster:
            roles = primaries(cluster)
            result["cluster"] = {"nodes": [f"{s.host}:{s.port}" for s in cluster.nodes],
                                 "replica_of": {cluster.nodes[i].url: (None if m is None else cluster.nodes[m].url)
                                                for i, m in sorted(roles.items())},
                                 "node_timeout_ms": args.node_timeout_ms}
            # The primary on host C is the one lost.
            victim = next(i for i, m in roles.items() if m is None and cluster.nodes[i].host == hosts.addr(2))
            kvtier = {"chunk_size": CHUNK, "tiers": ["cpu", "redis"], "cpu_bytes": "256MiB",
                      "redis_url": cluster.urls[:3], "redis_cluster": True, "load_policy": "always"}
            result["kvtier"] = kvtier
            engines: dict[str, EngineProc] = {}
            try:
                t = time.monotonic()
                for i, host in enumerate("ABC"):
                    engines[host] = EngineProc(model, ENGINE, kvtier, log_path=str(logs / f"host{host}.log"),
                                               wait=False, timeout=900, wrap=hosts.wrap(i),
                                               env={"VLLM_HOST_IP": hosts.addr(i)})
                for e in engines.values():
                    e.wait_ready()
                result["engines_up_s"] = round(time.monotonic() - t, 1)
                result.update(serve(args, cluster, victim, engines, prompts, refs))
            finally:
                for e in engines.values():
                    e.close()
    return result


def serve(args: argparse.Namespace, cluster: RedisClusterProcs, victim: int, engines: dict[str, EngineProc],
          prompts: dict[str, list[list[int]]], refs: dict[str, list[list[int]]]) -> dict:
    out: dict = {}
    a = engines["A"]
    t = time.monotonic()
    div = 0
    for i in range(0, args.prefixes, args.batch):
        got = a.generate(prompts["A"][i:i + args.batch], MAX_TOKENS, reset=True)["outputs"]
        div += sum(divergent(g, r) for g, r in zip(got, refs["A"][i:i + args.batch]))
    a.call("flush")  # A's chunks written behind: all in the cluster before B and C ask
    st = a.stats()["store"]
    out["host_a"] = {"s": round(time.monotonic() - t, 2), "requests": args.prefixes, "divergent_tokens": div,
                     "saved_chunks": st["saved_chunks"], "redis_puts": st["redis_puts"]}
    print(f"host A: {out['host_a']}", flush=True)

    t0 = time.monotonic()
    b = Stream("B", engines["B"], prompts["B"], refs["B"], t0)
    c = Stream("C", engines["C"], prompts["C"], refs["C"], t0, follow=b, lag=args.lag)
    b.start()
    c.start()
    b.wait_served(args.kill_after)
    cluster.nodes[victim].kill()  # SIGKILL: a crash
    killed = time.monotonic() - t0
    events: dict = {"killed_node": cluster.nodes[victim].url, "kill_s": round(killed, 3)}
    print(f"killed {events['killed_node']} at {killed:.1f} s", flush=True)
    if args.replicas:
        events["failover_s"] = wait_failover(cluster, victim, t0)
        print(f"failover at {events['failover_s']} s", flush=True)
    else:
        time.sleep(args.down_s)
        cluster.nodes[victim].start()  # same port and nodes.conf: it rejoins with its slots, empty
        cluster.wait_ok()
        events["back_s"] = round(time.monotonic() - t0, 3)
        print(f"node back (empty) at {events['back_s']} s", flush=True)
    b.join()
    c.join()
    rows = {"B": b.rows, "C": c.rows}
    both = b.rows + c.rows
    back = events.get("failover_s") or events.get("back_s") or killed
    rec = {h: recovered_at(r, killed) for h, r in rows.items()}
    events["recovered_s"] = rec
    events["recovery_after_kill_s"] = {h: None if t is None else round(t - killed, 3) for h, t in rec.items()}
    end = max(r["end_s"] for r in both) + 1
    out["hit_rate_by_2s"] = {h: [summarize(r, lo, lo + 2)["hit_rate"] for lo in range(0, int(end) + 1, 2)]
                             for h, r in rows.items()}
    out["events"] = events
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


def wait_failover(cluster: RedisClusterProcs, victim: int, t0: float, timeout_s: float = 60.0) -> float | None:
    """Seconds (since ``t0``) at which a replica of ``victim`` became a primary, as the cluster says."""
    deadline = time.monotonic() + timeout_s
    replicas = [i for i, m in primaries(cluster).items() if m == victim]
    while time.monotonic() < deadline:
        try:
            roles = primaries(cluster)
            if any(roles.get(i, 0) is None for i in replicas):
                return round(time.monotonic() - t0, 3)
        except Exception:  # noqa: BLE001 - a node mid-election may not answer
            pass
        time.sleep(0.05)
    return None


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
    if down and all(s["full_hits"] == s["requests"] for s in down) and not args.replicas:
        bad.append("no request missed while a node was down: was anything lost?")
    # With a replica the cluster fails over and both hosts recover; without, the node comes back
    # empty and only C (behind B) finds what B recomputed since then: B's first reads miss.
    must = ("B", "C") if args.replicas else ("C",)
    for host in must:
        if result["events"]["recovered_s"][host] is None:
            bad.append(f"host {host}: the hit rate did not recover by the end of the stream (more --prefixes?)")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=0, choices=(0, 1))
    ap.add_argument("--prefixes", type=int, default=120, help="prefixes (and requests per stream)")
    ap.add_argument("--batch", type=int, default=8, help="host A's requests per generate call")
    ap.add_argument("--lag", type=int, default=4, help="C serves prefix i once B has served prefix i + lag")
    ap.add_argument("--kill-after", type=int, default=30, help="B's requests served before the node is killed")
    ap.add_argument("--down-s", type=float, default=8.0, help="--replicas 0: seconds before the node comes back")
    ap.add_argument("--node-timeout-ms", type=int, default=2000, help="cluster-node-timeout (failover detection)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default=None, help="key in the JSON file (default: replicas0 / replicas1)")
    args = ap.parse_args()
    reason = namespaces_supported()
    if reason or redis_server_binary() is None:
        print(f"multihost: cannot run here: {reason or 'redis-server is not installed (apt-get install redis-server)'}")
        return 2
    # SIGTERM (a timeout, ^C of a wrapper) unwinds like ^C, so the namespaces and servers are removed.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = run(args)
    result["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip()
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    failures = check(result, args)
    result["failures"] = failures
    merge_json(args.json, args.label or f"replicas{args.replicas}", result)
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
